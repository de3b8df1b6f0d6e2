"""engine.fit: a non-finite loss stops training before that epoch's checkpoint (every step on CPU, every
CHECK_EVERY steps on a GPU, where reading the loss waits for the queued steps)."""

import numpy as np
import pytest
import torch

from training import engine


def nan_after(steps: int, device: str, run_dir):
    """A stage whose loss turns NaN at step `steps` of the first epoch; returns (stage, calls made)."""
    model = torch.nn.Linear(4, 2).to(device)
    calls = []

    def step_fn(x, y, epoch):
        calls.append(1)
        loss = model(x.float().flatten(1)).square().mean()
        return loss * float("nan") if len(calls) > steps else loss

    class Source:
        images = torch.zeros(64, 1, 2, 2, dtype=torch.uint8)
        labels = np.zeros(64, dtype=np.int64)

    cfg = {"epochs": 2, "batch_size": 2, "warmup_epochs": 0, "lr": 1e-3, "lr_scale_batch": 0, "weight_decay": 0.0,
           "betas": [0.9, 0.95]}
    stage = engine.Stage(number=1, cfg=cfg, model=model, optimizer=engine.make_optimizer(model, cfg), step_fn=step_fn,
                         train_indices=lambda epoch: np.arange(64), labels=Source.labels,
                         images=engine.DeviceImages(Source, torch.device(device)), card=lambda epoch, last: {})
    return stage, calls


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])])
def test_non_finite_loss_stops_before_the_checkpoint(tmp_path, device):
    stage, calls = nan_after(3, device, tmp_path)
    with pytest.raises(FloatingPointError, match="epoch 1 step"):
        engine.fit(stage, tmp_path, seed=0, d=engine.Dist(), progress=False)
    assert len(calls) == (4 if device == "cpu" else engine.CHECK_EVERY)
    assert not (tmp_path / "stage1.json").exists()
