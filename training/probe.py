"""Linear probe: the paper's representation check for a stage-1 encoder.

Freeze the encoder, take a small class-balanced subset of the LT training images (`per_class` each, fewer for
classes that have fewer), fit a linear classifier on their un-augmented features, and score many/medium/few on
the test set. Features are computed once; the classifier is full-batch multinomial logistic regression.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from tailwise.training import engine
from tailwise.training.data import LTData
from tailwise.training.metrics import evaluate_logits


@torch.no_grad()
def encode(model: torch.nn.Module, images: engine.DeviceImages, indices: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
    """Frozen encoder features (model.normalize then model.encoder) of un-augmented images."""
    model.eval()
    feats = [model.encoder(model.normalize(images(indices[i:i + batch_size]))).float()
             for i in range(0, len(indices), batch_size)]
    return torch.cat(feats)


def stage1_encoder(cfg: dict, data: LTData, weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The network `linear_probe` takes for a config: its encoder (with `weights`' encoder.* tensors, a stage-1
    checkpoint's; randomly initialised without them) behind the data's normalisation."""
    from tailwise.training.networks import ContrastiveModel

    model = ContrastiveModel(cfg["model"]["arch"], data.channels, data.mean, data.std, cfg["model"]["proj_hidden"],
                             cfg["model"]["proj_dim"])
    if weights is not None:
        model.encoder.load_state_dict({k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")})
    return model


def balanced_subset(data: LTData, per_class: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = data.train_source.labels[data.train_idx]
    picks = [rng.permutation(data.train_idx[labels == c])[:per_class] for c in range(len(data.class_names))]
    return np.concatenate(picks)


def fit_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 300,
               weight_decay: float = 1e-4) -> torch.nn.Linear:
    """Full-batch L-BFGS logistic regression on standardised features."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(features.shape[1], num_classes).to(features.device)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(features), labels) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return linear


def linear_probe(model: torch.nn.Module, data: LTData, device: torch.device, per_class: int = 100, seed: int = 0,
                 on: str = "test", say=None) -> dict:
    """Probe `model`'s frozen encoder; returns the report (top1, many, medium, few, per_class, ...) on the test
    set, or on the validation split with `on="val"` (what training may look at)."""
    was_training = model.training
    model = model.to(device)
    train_ids = balanced_subset(data, per_class, seed)
    train_images = engine.DeviceImages(data.train_source, device)
    if on == "val":
        x_eval = encode(model, train_images, data.val_idx)
        y_eval = data.train_source.labels[data.val_idx]
    else:
        x_eval = encode(model, engine.DeviceImages(data.test_source, device), np.arange(len(data.test_source)))
        y_eval = data.test_source.labels
    x_train = encode(model, train_images, train_ids)
    model.train(was_training)
    if say is not None:
        say(f"fitting the linear classifier on {len(train_ids)} encoded training images ...")
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    y_train = torch.as_tensor(data.train_source.labels[train_ids], device=device)
    with torch.enable_grad():
        linear = fit_linear((x_train - mean) / std, y_train, len(data.class_names))
    with torch.no_grad():
        logits = linear((x_eval - mean) / std).cpu().numpy()
    report = evaluate_logits(logits, y_eval, data.counts, data.groups)
    report["probe_train_per_class"] = np.bincount(data.train_source.labels[train_ids],
                                                  minlength=len(data.class_names)).tolist()
    return report


def probe_encoder(run: str | None = None, *, random_init: str | None = None, per_class: int = 100, on: str = "test",
                  device: str = "auto", seed: int = 0, progress: bool = True) -> dict:
    """`tailwise probe`: the linear probe of a run's stage-1 encoder (`run`: its folder), or of a randomly
    initialised encoder of the recipe `random_init` (one of the two). `progress`: say on stderr what it is
    doing while it works."""
    from tailwise import OptionError
    from tailwise.training.checkpoint import load_card, load_weights
    from tailwise.training.config import load_config
    from tailwise.training.data import rebuild_lt_data

    if bool(run) == bool(random_init):
        raise OptionError("give a run folder or {random_init} (one of them)", "random_init")
    if on not in ("test", "val"):
        raise OptionError(f"{{on}} must be test or val, got {on!r}", "on")
    if per_class < 1:
        raise OptionError(f"{{per_class}} must be >= 1, got {per_class}", "per_class")

    def say(message: str) -> None:
        if progress:
            print(f"tailwise probe: {message}", file=sys.stderr, flush=True)

    if run:
        card = load_card(run, stage=1)
        cfg = card["config"]
        build = card["data"]["build_args"]
        say(f"reading the data {run} was trained on ({build.get('dataset')} at "
            f"{build.get('root') or 'its default root'}) ...")
        data = rebuild_lt_data(build, card["data"]["index_sha256"], card["_dir"])
    else:
        from tailwise.training.train import data_from_config

        cfg = load_config(random_init)
        say(f"reading the data of recipe {random_init} ({cfg['data']['dataset']}) ...")
        data = data_from_config(cfg)
    torch.manual_seed(seed)
    model = stage1_encoder(cfg, data, load_weights(card) if run else None)
    resolved = engine.resolve_device(device)
    n_eval = len(data.val_idx) if on == "val" else (0 if data.test_source is None else len(data.test_source))
    say(f"encoding {n_eval} {'validation' if on == 'val' else 'test'} images and up to {per_class} training "
        f"images per class on {resolved} ...")
    return linear_probe(model, data, resolved, per_class=per_class, seed=seed, on=on, say=say)
