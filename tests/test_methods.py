"""Every row of experiments/methods.toml is wired as its formula says, and the peers' distinctive parts compute
what their papers define, each against a case worked out by hand (numpy, float64), never against our own code."""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_accuracy_runner, write_recipe
from tailwise.training import losses
from tailwise.training.train import stage2_modes, stage_criterion

REPO = Path(__file__).resolve().parents[1]
COUNTS = [400, 100, 25, 5]          # hand-made LT counts: every formula below is worked out on these
RATIO = 2                           # write_recipe's stage2.ratio: IP-DPP / random subsets keep min(n, 2 * 5)
SUBSET = [10, 10, 10, 5]
UNIFORM = [1, 1, 1, 1]

# What each row means, written from its label and paper, not read from methods.toml: stage 1 (method, loss,
# extra settings) and stage 2 (None, or sampler, loss, the counts its loss corrects for, extra settings).
# A row added to methods.toml fails test_every_row_is_described until it is described here.
SUP, BNS = "supervised", "bns"
EXPECTED = {
    "ce": ((SUP, "ce", {}), None),
    "la": ((SUP, "la", {}), None),
    "bsce": ((SUP, "bsce", {}), None),
    "ldam-drw": ((SUP, "ldam-drw", {"ldam_drw_start": 0.8}), None),
    "crt": ((SUP, "ce", {}), ("none", "ce", UNIFORM, {"freeze_encoder": True, "class_balanced": True,
                                                      "reinit_classifier": True})),
    "bns-kdpp": ((BNS, None, {}), ("kdpp", "ce", SUBSET, {"reinit_classifier": True})),
    "bns-random": ((BNS, None, {}), ("random", "ce", SUBSET, {"reinit_classifier": True})),
    "bns-alg1": ((BNS, None, {}), ("paper-alg1", "ce", SUBSET, {"reinit_classifier": True})),
    "bns-none": ((BNS, None, {}), ("none", "ce", COUNTS, {"reinit_classifier": True})),
    "ce-kdpp": ((SUP, "ce", {}), ("kdpp", "ce", SUBSET, {"reinit_classifier": True})),
    "balanced-ce": ((SUP, "ce", {}), None),
    "tailwise-joint": ((BNS, "la", {"sup_loss": "la"}), ("kdpp", "la", SUBSET, {"reinit_classifier": False})),
    "tailwise-la-kdpp": ((SUP, "la", {}), ("kdpp", "la", SUBSET, {"reinit_classifier": False})),
    "tailwise-la-random": ((SUP, "la", {}), ("random", "la", SUBSET, {"reinit_classifier": False})),
    "tailwise-la-none": ((SUP, "la", {}), ("none", "la", COUNTS, {"reinit_classifier": False})),
    "la-restart": ((SUP, "la", {}), ("none", "la", COUNTS, {"reinit_classifier": False})),
    "crt-la": ((SUP, "la", {}), ("none", "ce", UNIFORM, {"freeze_encoder": True, "class_balanced": True,
                                                         "reinit_classifier": True})),
    "weight-balancing": ((SUP, "ce", {"weight_decay": 0.5, "decay_all": True}),
                         ("none", "cb", COUNTS, {"freeze_encoder": True, "reinit_classifier": False,
                                                 "max_norm": 0.1, "weight_decay": 0.5, "class_balanced": False})),
    "mislas": ((SUP, "ce", {"mixup": 1.0}),
               ("none", "las", COUNTS, {"freeze_encoder": True, "reinit_classifier": False, "class_balanced": True,
                                        "shift_bn": True, "smooth_head": 0.3, "smooth_tail": 0.0})),
}
ALIASES = {"bns-kdpp-la": "bns-kdpp"}     # rows that show another row's runs


_runner = load_accuracy_runner


# ----------------------------------------------------------------------------- the formulas, by hand
def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _ce(z, y, weight=None):
    nll = -_log_softmax(z)[np.arange(len(y)), y]
    if weight is None:
        return nll.mean()
    return (weight[y] * nll).sum() / weight[y].sum()          # torch's weighted mean


def _effective_number_weights(counts, beta=0.9999):
    w = (1 - beta) / (1 - beta ** np.asarray(counts, dtype=np.float64))
    return w / w.sum() * len(counts)


def hand_loss(name, z, y, counts, epoch=0, epochs=10):
    """The loss `name` on logits z [B, C] and labels y, with the class counts `counts`, as its paper writes it."""
    n = np.asarray(counts, dtype=np.float64)
    log_prior = np.log(n / n.sum())
    if name == "ce":
        return _ce(z, y)
    if name in ("la", "bsce"):              # Menon et al.: tau = 1; Ren et al.: + log prior
        return _ce(z + 1.0 * log_prior, y)
    if name == "ldam-drw":                  # margins 0.5 * n^-1/4 / max; scale 30; DRW weights from 0.8 * epochs
        m = n ** -0.25
        m = 0.5 * m / m.max()
        onehot = np.eye(len(n))[y]
        weight = _effective_number_weights(counts) if epoch >= int(0.8 * epochs) else None
        return _ce(30 * (z - onehot * m[y][:, None]), y, weight)
    if name == "cb":                        # Cui et al.: w_y * CE, averaged over the batch
        w = _effective_number_weights(counts)
        return (w[y] * -_log_softmax(z)[np.arange(len(y)), y]).mean()
    if name == "las":                       # MiSLAS, concave: eps = 0 + 0.3 sin(pi/2 (n - n_min)/(n_max - n_min))
        eps = 0.3 * np.sin(np.pi / 2 * (n - n.min()) / (n.max() - n.min()))
        logp = _log_softmax(z)
        e = eps[y]
        return ((1 - e) * -logp[np.arange(len(y)), y] + e * -logp.mean(1)).mean()
    raise AssertionError(name)


@pytest.fixture(scope="module")
def row_configs(tmp_path_factory):
    """The config `experiments/accuracy.py run` trains for every row, on a tiny recipe (budget 2)."""
    from conftest import write_cifar_archive

    tmp = tmp_path_factory.mktemp("rows")
    archive, _, _ = write_cifar_archive(tmp, per_class=40, test_per_class=5)
    recipe = write_recipe(tmp, archive)
    accuracy = _runner()
    args = argparse.Namespace(recipe=str(recipe), imbalance_factor=10, budget=2, overrides=[], device="cpu")
    methods = accuracy.load_methods()
    return {name: accuracy.method_config(name, spec, args, 0) for name, spec in methods.items() if "run" not in spec}


def test_every_row_is_described():
    methods = _runner().load_methods()
    assert set(methods) == set(EXPECTED) | set(ALIASES)
    assert {name: spec["run"] for name, spec in methods.items() if "run" in spec} == ALIASES


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_row_trains_what_its_formula_says(name, row_configs):
    """The stage settings a row selects, and the loss of each stage on a hand-made batch (prior, tau, margins,
    re-weighting, the stage-2 prior) against the formula computed by hand."""
    cfg = row_configs[name]
    (method1, loss1, extra1), stage2 = EXPECTED[name]
    assert cfg["stage1"]["method"] == method1
    tuned = _runner().load_methods()[name].get("tuned", {})
    scale = {"weight_decay": tuned.get("wd", 1.0)}          # a tuned weight-decay multiplier (Weight Balancing)
    for key, value in extra1.items():
        assert cfg["stage1"][key] == (pytest.approx(value * scale[key]) if key in scale else value), key
    if name == "balanced-ce":
        assert cfg["data"]["profile"] == "none"
    if method1 == BNS and loss1 is None:
        assert cfg["stage1"]["sup_loss"] == "none"
    rng = np.random.default_rng(7)
    z = rng.normal(0, 2, size=(12, 4))
    y = np.array([0, 1, 2, 3] * 3)
    zt, yt = torch.tensor(z, dtype=torch.float32), torch.tensor(y)
    if loss1:
        crit = stage_criterion(cfg, 1, COUNTS, torch.device("cpu"))
        epochs = cfg["stage1"]["epochs"]
        for epoch in (0, epochs - 1):
            assert crit(zt, yt, epoch).item() == pytest.approx(hand_loss(loss1, z, y, COUNTS, epoch, epochs), rel=1e-5)
    assert cfg["stage2"]["enabled"] == (stage2 is not None)
    if stage2 is None:
        return
    sampler, loss2, prior, extra2 = stage2
    assert cfg["stage2"]["sampler"] == sampler and cfg["stage2"]["loss"] == loss2
    defaults = {"freeze_encoder": False, "class_balanced": False, "max_norm": 0.0, "shift_bn": False}
    for key, value in {**defaults, **extra2}.items():
        assert cfg["stage2"][key] == (pytest.approx(value * scale[key]) if key in scale else pytest.approx(value)), key
    crit = stage_criterion(cfg, 2, COUNTS, torch.device("cpu"))
    assert crit(zt, yt, 0).item() == pytest.approx(hand_loss(loss2, z, y, prior), rel=1e-5)
    if name == "la-restart":        # the second cycle runs at the table recipe's stage-1 batch and learning rate
        from tailwise.training.config import load_config

        base = load_config("fmnist-lt-r32")["stage1"]
        mult = _runner().load_methods()[name].get("tuned", {}).get("lr", 1.0)
        assert (cfg["stage2"]["batch_size"], cfg["stage2"]["lr_scale_batch"]) == (base["batch_size"], base["lr_scale_batch"])
        assert cfg["stage2"]["lr"] == pytest.approx(base["lr"] * mult)


def test_the_la_row_fails_this_test_if_its_tau_were_zero(row_configs):
    """The check above tells LA (tau 1) from plain CE on this batch: the LA row trained with tau 0 would fail."""
    z = np.random.default_rng(7).normal(0, 2, size=(12, 4))
    y = np.array([0, 1, 2, 3] * 3)
    assert abs(hand_loss("la", z, y, COUNTS) - hand_loss("ce", z, y, COUNTS)) > 0.1
    assert abs(hand_loss("la", z, y, COUNTS) - hand_loss("la", z, y, SUBSET)) > 0.1     # and the stage-2 prior


# ----------------------------------------------------------------------------- the peers' distinctive parts
def test_max_norm_projects_long_class_weights_onto_the_ball():
    """Weight Balancing's MaxNorm: row norms 5, 1, 2; radius 1 + 0.1 * (5 - 1) = 1.4; only rows above it shrink."""
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]])
    radius = losses.max_norm_threshold(w, 0.1)
    assert radius == pytest.approx(1.4)
    losses.max_norm_(w, radius)
    assert torch.allclose(w, torch.tensor([[0.84, 1.12], [0.0, 1.0], [0.0, 1.4]]))


def test_label_aware_smoothing_by_hand():
    """MiSLAS: counts 100, 10, 1, head 0.3, tail 0: eps = 0.3, 0.3 sin(pi/2 * 9/99), 0; one sample of class 1
    with logits (2, 0, 0): loss = (1 - eps_1) * (-log p_1) + eps_1 * mean_c(-log p_c)."""
    eps = losses.label_aware_smoothing([100, 10, 1], 0.3, 0.0)
    assert eps.tolist() == pytest.approx([0.3, 0.3 * math.sin(math.pi / 2 * 9 / 99), 0.0], rel=1e-6)
    e1 = 0.3 * math.sin(math.pi / 2 * 9 / 99)
    norm = math.log(math.exp(2) + 2)
    expected = (1 - e1) * norm + e1 * ((norm - 2) + 2 * norm) / 3
    got = losses.label_aware_smoothing_ce(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([1]), eps)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # the rarest class gets no smoothing: plain CE
    got = losses.label_aware_smoothing_ce(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([2]), eps)
    assert got.item() == pytest.approx(norm, rel=1e-6)


def test_class_balanced_ce_by_hand():
    """w = (1 - b) / (1 - b^n), normalised to sum to C; loss = mean_i w_yi * CE_i."""
    counts, b = [100, 10], 0.9999
    w = [(1 - b) / (1 - b ** n) for n in counts]
    w = [x / sum(w) * 2 for x in w]
    z, y = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1])
    ce0, ce1 = math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))
    got = losses.class_balanced_ce(z, y, losses.drw_weights(counts))
    assert got.item() == pytest.approx((w[0] * ce0 + w[1] * ce1) / 2, rel=1e-5)


def test_mixup_mixes_images_and_pairs_labels():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    g = torch.Generator().manual_seed(0)
    mixed, perm, lam = losses.mixup(x, 1.0, g)
    assert 0 <= lam <= 1 and sorted(perm.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])
    again = losses.mixup(x, 1.0, torch.Generator().manual_seed(0))
    assert again[2] == lam and torch.equal(again[1], perm)        # reproducible from the generator


def test_mixup_loss_weighs_both_labels_of_each_mixed_image(row_configs):
    """MiSLAS's stage 1 on a mixed batch: lam * CE(z, y) + (1 - lam) * CE(z, y[perm]), by hand."""
    z = np.random.default_rng(3).normal(0, 2, size=(4, 4))
    y, perm, lam = np.array([0, 1, 2, 3]), np.array([2, 0, 3, 1]), 0.3
    crit = losses.mixup_criterion(stage_criterion(row_configs["mislas"], 1, COUNTS, torch.device("cpu")),
                                  torch.tensor(perm), lam)
    got = crit(torch.tensor(z, dtype=torch.float32), torch.tensor(y), 0).item()
    assert got == pytest.approx(lam * _ce(z, y) + (1 - lam) * _ce(z, y[perm]), rel=1e-5)
    assert abs(got - _ce(z, y)) > 0.05                                # the second label counts


def test_weight_decay_on_every_parameter_for_weight_balancing():
    """decay_all (Weight Balancing's stage 1): biases and BatchNorm weights decay too; the default decays only
    weight matrices and kernels; frozen parameters are in no group."""
    from tailwise.training.networks import param_groups

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Linear(2, 3))
    net[0].bias.requires_grad_(False)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in param_groups(net, 0.5)}
    assert by_decay == {0.5: {id(net[0].weight), id(net[2].weight)},
                        0.0: {id(net[1].weight), id(net[1].bias), id(net[2].bias)}}
    (group,) = param_groups(net, 0.5, decay_all=True)
    assert group["weight_decay"] == 0.5 and {id(p) for p in group["params"]} == {
        id(p) for p in net.parameters() if p.requires_grad}
    from tailwise.training.engine import make_optimizer    # what training builds from a stage's config

    stage = {"weight_decay": 0.5, "lr": 1e-3, "batch_size": 8, "lr_scale_batch": 0, "betas": [0.9, 0.95]}
    assert [len(g["params"]) for g in make_optimizer(net, {**stage, "decay_all": True}).param_groups] == [5]
    assert [len(g["params"]) for g in make_optimizer(net, stage).param_groups] == [2, 3]


def _first_bn(model):
    return next(m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("shift", [True, False])
def test_shifted_bn_statistics(shift):
    """MiSLAS's shifted BN: with the encoder frozen, a stage-2 forward pass moves the BatchNorm running mean to
    (1 - 0.1) * old + 0.1 * batch mean and the variance likewise (unbiased batch variance); without shift_bn the
    statistics stay as stage 1 left them. The weights never change either way."""
    from tailwise.training.networks import Classifier

    torch.manual_seed(0)
    model = Classifier("resnet32", 3, 4, (0.5,) * 3, (0.25,) * 3)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    bn = _first_bn(model)
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    seen = {}
    bn.register_forward_pre_hook(lambda module, inputs: seen.update(x=inputs[0].detach().double()))
    stage2_modes(model, {"freeze_encoder": True, "shift_bn": shift})
    assert model.fc.training and bn.training == shift
    weights = bn.weight.clone()
    model(torch.rand(8, 3, 8, 8))
    x = seen["x"]
    n = x.numel() / x.shape[1]
    mean = x.mean((0, 2, 3))
    var = ((x - mean.view(1, -1, 1, 1)) ** 2).sum((0, 2, 3)) / (n - 1)
    if shift:
        assert torch.allclose(bn.running_mean.double(), 0.9 * 0.5 + 0.1 * mean, atol=1e-5)
        assert torch.allclose(bn.running_var.double(), 0.9 * 2.0 + 0.1 * var, atol=1e-5)
    else:
        assert torch.all(bn.running_mean == 0.5) and torch.all(bn.running_var == 2.0)
    assert torch.equal(bn.weight, weights)


# ----------------------------------------------------------------------------- the peers, trained for real
def _train_two_stages(tmp_path, cifar_archive, stage1: dict, stage2: dict):
    from tailwise.training import checkpoint
    from tailwise.training.config import load_config
    from tailwise.training.train import run

    archive, _, _ = cifar_archive(per_class=40, test_per_class=5)
    recipe = write_recipe(tmp_path, archive, stage1={"method": "supervised", "epochs": 1, **stage1},
                          stage2={"epochs": 1, "sampler": "none", **stage2})
    out = tmp_path / "run"
    run(load_config(str(recipe)), out, progress=False)
    w1 = checkpoint.load_weights(checkpoint.load_card(out / "stage1.json"))
    w2 = checkpoint.load_weights(checkpoint.load_card(out / "stage2.json"))
    return w1, w2


@pytest.mark.slow
def test_weight_balancing_stage2_keeps_every_class_weight_on_the_max_norm_ball(tmp_path, cifar_archive):
    w1, w2 = _train_two_stages(tmp_path, cifar_archive, {"loss": "ce", "weight_decay": 0.5},
                               {"freeze_encoder": True, "reinit_classifier": False, "loss": "cb", "max_norm": 0.1,
                                "lr": 0.05})
    norms1 = w1["fc.weight"].double().norm(dim=1)
    radius = norms1.min() + 0.1 * (norms1.max() - norms1.min())
    norms2 = w2["fc.weight"].double().norm(dim=1)
    assert torch.all(norms2 <= radius + 1e-5)
    assert (norms2 - radius).abs().min() < 1e-5                        # the projection was active
    assert torch.equal(w1["encoder.conv1.weight"], w2["encoder.conv1.weight"])   # frozen encoder


@pytest.mark.slow
def test_mislas_stage2_shifts_bn_statistics_of_the_frozen_encoder(tmp_path, cifar_archive):
    w1, w2 = _train_two_stages(tmp_path, cifar_archive, {"loss": "ce", "mixup": 1.0},
                               {"freeze_encoder": True, "reinit_classifier": False, "class_balanced": True,
                                "loss": "las", "shift_bn": True})
    stats = [k for k in w1 if k.startswith("encoder.") and k.endswith("running_mean")]
    assert stats and all(not torch.equal(w1[k], w2[k]) for k in stats)     # re-estimated on stage-2 batches
    frozen = [k for k in w1 if k.startswith("encoder.") and k.endswith("weight")]
    assert all(torch.equal(w1[k], w2[k]) for k in frozen)
    assert not torch.equal(w1["fc.weight"], w2["fc.weight"])


@pytest.mark.slow
def test_crt_stage2_leaves_bn_statistics_alone(tmp_path, cifar_archive):
    w1, w2 = _train_two_stages(tmp_path, cifar_archive, {"loss": "la"},
                               {"freeze_encoder": True, "class_balanced": True})
    stats = [k for k in w1 if k.startswith("encoder.") and ("running" in k)]
    assert stats and all(torch.equal(w1[k], w2[k]) for k in stats)
