"""Both stages of BNS + IP-DPP, and the supervised baselines, on top of `training.engine.fit`.

Stage 1 learns the representation: BNS (contrastive, no labels in the loss beyond positives/negatives) or a
supervised classifier (`stage1.method = "supervised"`, the baselines). Stage 2 puts a new linear classifier on
the stage-1 encoder and re-trains on the IP-DPP subset, redrawn every `redraw_every` epochs from the current
model's probabilities on un-augmented images. The final classifier is scored on the test set once, at the end.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tailwise import OptionError, UserError
from tailwise import format as fmt
from tailwise.training import checkpoint, engine
from tailwise.training.augment import BatchAugment
from tailwise.training.config import reproduce_command, validate_config
from tailwise.training.data import LTData, build_lt_data, check_same_data, rebuild_lt_data
from tailwise.training.dataspec import DataSpec
from tailwise.training.metrics import evaluate_logits, format_evaluation, save_report
from tailwise.training.networks import Classifier, ContrastiveModel

LA_TAU_GRID = tuple(round(0.25 * i, 2) for i in range(9))   # post-hoc logit adjustment: 0, 0.25, ..., 2


def data_from_config(cfg: dict) -> LTData:
    """Build the LT data set a config's [data] table describes."""
    return build_lt_data(DataSpec.from_config(cfg["data"]))


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: engine.DeviceImages, indices: np.ndarray,
                   batch_size: int = 1024) -> torch.Tensor:
    """Logits of a classifier on un-augmented images, in eval mode (restores the previous mode)."""
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    out = [_logits(model(images(indices[i:i + batch_size]))).float() for i in range(0, len(indices), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _logits(output) -> torch.Tensor:
    """A classifier's logits; a jointly trained contrastive model returns (embeddings, logits)."""
    return output[1] if isinstance(output, tuple) else output


def _card_base(cfg: dict, data: LTData, kind: str, head: str = "linear") -> dict:
    return {"config": cfg, "data": data.card(), "kind": kind, "head": head, "finished": False}


def _resume_or_none(run_dir: Path, stage: int, resume: bool) -> dict | None:
    path = run_dir / fmt.stage_card(stage)
    if not path.exists():
        return None
    if not resume:
        raise OptionError(f"{path} exists: pass {{resume=True}} to continue this run, or choose another {{out}}",
                          "resume", "out")
    return checkpoint.load_card(path)


def _check_same_data(card: dict, data: LTData) -> None:
    check_same_data(data, card["data"]["index_sha256"], card["_dir"])
    trained = (card["data"]["channels"], *card["data"]["image_size"])
    if trained != (data.channels, *data.image_size):
        raise UserError(f"{card['_dir']}: checkpoint was trained on {trained[0]} x {trained[1]} x {trained[2]} images, "
                        f"these are {data.channels} x {data.image_size[0]} x {data.image_size[1]} "
                        "(data.channels / data.image_size differ)")


def _wrap_ddp(model: torch.nn.Module, d: engine.Dist, device: torch.device) -> torch.nn.Module:
    if d.world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class EpochGenerator:
    """The augmentation generator of an epoch (engine.Streams.augment): a resumed run draws the same views."""

    def __init__(self, device: torch.device, streams: engine.Streams, stage: int, rank: int):
        self.device, self.streams, self.stage, self.rank = device, streams, stage, rank
        self.epoch, self.gen = None, None

    def __call__(self, epoch: int) -> torch.Generator:
        if epoch != self.epoch:
            self.epoch, self.gen = epoch, torch.Generator(device=self.device)
            self.gen.manual_seed(self.streams.augment(self.stage, epoch, self.rank))
        return self.gen


def validation_report(model, data: LTData, images: engine.DeviceImages) -> dict:
    logits = predict_logits(model, images, data.val_idx)
    return evaluate_logits(logits.cpu().numpy(), data.train_source.labels[data.val_idx], data.counts, data.groups)


def _val_metrics(model, data, images) -> dict:
    if len(data.val_idx) == 0:
        return {}
    report = validation_report(model, data, images)
    return {"val_top1": report["top1"], "val_mean_per_class": report["mean_per_class"],
            "val_many": report["many"], "val_medium": report["medium"], "val_few": report["few"]}


# ----------------------------------------------------------------------------- losses of supervised stages
def supervised_criterion(name: str, counts: list[int], epochs: int, drw_start: float, device: torch.device,
                         smoothing: tuple[float, float] = (0.3, 0.0)):
    """(logits, labels, epoch) -> loss, for ce | la (logit-adjusted, tau 1) | bsce (balanced softmax) | ldam-drw |
    cb (class-balanced CE, effective-number weights) | las (label-aware smoothing, `smoothing` = head, tail)."""
    from tailwise.training import losses

    prior = torch.tensor(fmt.log_prior(counts), dtype=torch.float32, device=device)   # of the LA and BS losses
    if name == "cb":
        weights = losses.drw_weights(counts).to(device)
        return lambda logits, y, epoch: losses.class_balanced_ce(logits, y, weights)
    if name == "las":
        eps = losses.label_aware_smoothing(counts, *smoothing).to(device)
        return lambda logits, y, epoch: losses.label_aware_smoothing_ce(logits, y, eps)
    if name == "ce":
        return lambda logits, y, epoch: F.cross_entropy(logits, y)
    if name == "la":
        return lambda logits, y, epoch: losses.logit_adjusted_ce(logits, y, prior, tau=1.0)
    if name == "bsce":
        return lambda logits, y, epoch: losses.balanced_softmax_ce(logits, y, prior)
    if name == "ldam-drw":
        ldam = losses.LDAMLoss(counts).to(device)
        weights = losses.drw_weights(counts).to(device)
        drw_epoch = int(drw_start * epochs)

        def ldam_drw(logits, y, epoch):
            ldam.set_weight(weights if epoch >= drw_epoch else None)
            return ldam(logits, y)
        return ldam_drw
    raise UserError(f"unknown loss {name!r} (expected ce, la, bsce, ldam-drw, cb or las)")


def stage2_prior_counts(s: dict, counts: list[int]) -> list[int]:
    """The class counts stage 2's balanced losses correct for: its pool's (the LT set, or the subset's targets),
    all equal when it samples class-balanced."""
    from tailwise.training.ipdpp import class_targets

    pool = list(counts) if s["sampler"] == "none" else class_targets(counts, s["ratio"])
    return [1] * len(pool) if s["class_balanced"] else pool


def stage_criterion(cfg: dict, stage: int, counts: list[int], device: torch.device):
    """The supervised loss a config trains `stage` with (stage 1: the classifier's, or the joint classifier's
    with BNS), given the LT class counts. Label-aware smoothing is by the LT counts (MiSLAS), the other
    balanced losses by what the stage trains on (stage2_prior_counts)."""
    if stage == 1:
        s = cfg["stage1"]
        name = s["loss"] if s["method"] == "supervised" else s["sup_loss"]
        return supervised_criterion(name, counts, s["epochs"], s["ldam_drw_start"], device)
    s = cfg["stage2"]
    prior = list(counts) if s["loss"] == "las" else stage2_prior_counts(s, counts)
    return supervised_criterion(s["loss"], prior, s["epochs"], cfg["stage1"]["ldam_drw_start"], device,
                                (s["smooth_head"], s["smooth_tail"]))


def stage2_modes(model: torch.nn.Module, s: dict) -> None:
    """Train mode, except a frozen encoder's BatchNorm layers: they keep stage 1's statistics (eval mode), or with
    `shift_bn` (MiSLAS) re-estimate them as running averages over the stage-2 batches (weights stay frozen)."""
    model.train()
    if s["freeze_encoder"] and not s["shift_bn"]:
        model.encoder.eval()


# ----------------------------------------------------------------------------- stage 1
def train_stage1(cfg: dict, data: LTData, run_dir: Path, device: torch.device, d: engine.Dist,
                 resume: bool = False, progress: bool = True) -> dict:
    """Stage 1: BNS representation learning, or a supervised classifier (baselines). Returns the last metrics."""
    s = cfg["stage1"]
    card0 = _resume_or_none(run_dir, 1, resume)
    if card0 and card0.get("finished"):
        _check_same_data(card0, data)
        return card0.get("metrics", {})
    num_classes = len(data.class_names)
    joint = s["method"] == "bns" and s["sup_loss"] != "none"
    if s["method"] == "bns":
        model = ContrastiveModel(cfg["model"]["arch"], data.channels, data.mean, data.std, cfg["model"]["proj_hidden"],
                                 cfg["model"]["proj_dim"], num_classes=num_classes if joint else 0)
        kind, head = "contrastive", "linear" if joint else "none"
    elif s["method"] == "supervised":
        head = "cosine" if s["loss"] == "ldam-drw" else "linear"
        model, kind = Classifier(cfg["model"]["arch"], data.channels, num_classes, data.mean, data.std, head=head), "classifier"
    else:
        raise UserError(f"stage1.method {s['method']!r}: expected bns or supervised")
    engine.to_device(model, device)
    optimizer = engine.make_optimizer(model, s)
    start = 0
    if card0:
        _check_same_data(card0, data)
        model.load_state_dict(checkpoint.load_weights(card0))
        optimizer.load_state_dict(checkpoint.load_resume(card0)[0])
        start = card0["epoch"]
    net = _wrap_ddp(model, d, device)
    images = engine.DeviceImages(data.train_source, device)
    aug = BatchAugment(data.channels, tuple(data.image_size), strength=s["aug_strength"], kind=s["aug"])
    generator = EpochGenerator(device, engine.Streams(cfg["seed"]), 1, d.rank)

    if kind == "contrastive":
        from tailwise.training import losses

        sup = stage_criterion(cfg, 1, data.counts, device) if joint else None

        def step_fn(x, y, epoch):
            g = generator(epoch)
            views = torch.cat([aug(x, g), aug(x, g)])
            labels2 = torch.cat([y, y])
            with autocast(device, s["amp"]):
                out = net(views)
            z = F.normalize((out[0] if joint else out).float(), dim=1)
            if s["loss_form"] == "released":
                loss = losses.bns_loss_released(z, labels2, tau=s["tau"])
            elif s["loss_form"] == "paper":
                half = len(x)
                loss = losses.bns_loss_paper(z[:half], z[half:], y, tau=s["tau"], m=s["m"], generator=g)
            else:
                raise UserError(f"stage1.loss_form {s['loss_form']!r}: expected released or paper")
            if joint:    # the classifier on the encoder features learns from both views, with a balanced loss
                loss = loss + s["sup_weight"] * sup(out[1].float(), labels2, epoch)
            return loss

        def on_epoch_end(epoch):
            metrics = _val_metrics(model, data, images) if joint else {}
            if s["probe_every"] and (epoch + 1) % s["probe_every"] == 0 and len(data.val_idx):
                from tailwise.training.probe import linear_probe

                probe = linear_probe(model, data, device, on="val")     # encoder quality, on validation
                metrics.update({f"val_probe_{k}": probe[k] for k in ("top1", "many", "medium", "few")})
            return metrics
    else:
        from tailwise.training import losses

        criterion = stage_criterion(cfg, 1, data.counts, device)

        def step_fn(x, y, epoch):
            x, crit = aug(x, generator(epoch)), criterion
            if s["mixup"]:
                x, perm, lam = losses.mixup(x, s["mixup"], generator(epoch))
                crit = losses.mixup_criterion(criterion, perm, lam)
            with autocast(device, s["amp"]):
                logits = net(x).float()
            return crit(logits, y, epoch)

        def on_epoch_end(epoch):
            return _val_metrics(model, data, images)

    stage = engine.Stage(
        number=1, cfg=s, model=net, optimizer=optimizer, step_fn=step_fn,
        train_indices=lambda epoch: data.train_idx, labels=data.train_source.labels, images=images,
        card=lambda epoch, last: dict(_card_base(cfg, data, kind, head), metrics=last,
                                      finished=epoch == s["epochs"]),
        on_epoch_end=on_epoch_end)
    return engine.fit(stage, run_dir, cfg["seed"], d, start_epoch=start, progress=progress)


# ----------------------------------------------------------------------------- stage 2
def train_stage2(cfg: dict, data: LTData, run_dir: Path, device: torch.device, d: engine.Dist,
                 resume: bool = False, progress: bool = True) -> dict:
    """Stage 2: stage-1 encoder + new linear classifier, trained on the (redrawn) IP-DPP subset."""
    from tailwise.training import losses

    s = cfg["stage2"]
    card1 = checkpoint.load_card(run_dir, stage=1)
    if not card1.get("finished"):
        raise UserError(f"{run_dir}: stage 1 has not finished (epoch {card1['epoch']}/{card1['epochs']})")
    _check_same_data(card1, data)
    card0 = _resume_or_none(run_dir, 2, resume)
    if card0 and card0.get("finished"):
        return card0.get("metrics", {})

    head = "linear" if s["reinit_classifier"] or card1["kind"] != "classifier" else card1.get("head", "linear")
    model = Classifier(cfg["model"]["arch"], data.channels, len(data.class_names), data.mean, data.std, head=head)
    stage1_weights = checkpoint.load_weights(card1)
    if card1["kind"] == "classifier" and not s["reinit_classifier"]:
        model.load_state_dict(stage1_weights)
    elif not s["reinit_classifier"] and "fc.weight" in stage1_weights:     # BNS trained jointly with a classifier
        model.load_state_dict({k: v for k, v in stage1_weights.items() if k.split(".")[0] in ("normalize", "encoder", "fc")})
    else:
        model.encoder.load_state_dict({k[len("encoder."):]: v for k, v in stage1_weights.items()
                                       if k.startswith("encoder.")})
    # MaxNorm (Weight Balancing): the radius comes from the classifier stage 2 starts from, also on resume
    radius = losses.max_norm_threshold(model.fc.weight, s["max_norm"]) if s["max_norm"] else None
    engine.to_device(model, device)
    if s["freeze_encoder"]:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        params = [{"params": list(model.fc.parameters()), "weight_decay": s["weight_decay"]}]
    else:
        params = None
    optimizer = engine.make_optimizer(model, s, params)
    if radius is not None:      # projected gradient descent: every step ends on the ball
        optimizer.register_step_post_hook(lambda *_: losses.max_norm_(model.fc.weight.data, radius))

    streams = engine.Streams(cfg["seed"])
    images = engine.DeviceImages(data.train_source, device)
    pool = SubsetRedraw(s, data, model, images, streams, run_dir / fmt.REDRAWS_LOG if d.main else None)
    start = 0
    if card0:
        _check_same_data(card0, data)
        model.load_state_dict(checkpoint.load_weights(card0))
        optim_state, extra = checkpoint.load_resume(card0)
        optimizer.load_state_dict(optim_state)
        pool.subset = extra["subset"].numpy() if "subset" in extra else None
        start = card0["epoch"]
    net = _wrap_ddp(model, d, device)
    aug = BatchAugment(data.channels, tuple(data.image_size), strength=s["aug_strength"], kind=s["aug"])
    pool_size = int(sum(stage2_prior_counts(dict(s, class_balanced=False), data.counts)))
    # a balanced loss (la, bsce, ldam-drw, cb) corrects for the class frequencies of what stage 2 trains on
    criterion = stage_criterion(cfg, 2, data.counts, device)
    steps = max(1, pool_size // s["batch_size"])
    generator = EpochGenerator(device, streams, 2, d.rank)

    def step_fn(x, y, epoch):
        stage2_modes(model, s)
        with autocast(device, s["amp"]):
            logits = net(aug(x, generator(epoch)))
        return criterion(logits.float(), y, epoch)

    stage = engine.Stage(
        number=2, cfg=s, model=net, optimizer=optimizer, step_fn=step_fn,
        train_indices=pool.indices, labels=data.train_source.labels, images=images,
        card=lambda epoch, last: dict(_card_base(cfg, data, "classifier", head), metrics=last,
                                      finished=epoch == s["epochs"], train_distribution=pool.class_counts()),
        on_epoch_start=pool.start_epoch, on_epoch_end=lambda epoch: _val_metrics(model, data, images),
        extra_state=pool.resume_state, steps_per_epoch=steps)
    return engine.fit(stage, run_dir, cfg["seed"], d, start_epoch=start, progress=progress)


class SubsetRedraw:
    """Stage 2's training pool, epoch by epoch: the IP-DPP subset of the LT set (or a random one), redrawn every
    `redraw_every` epochs from the current model's probability of the true class on un-augmented images
    (engine.Streams.redraw); sampler "none": the whole LT set. The current subset travels in the resume file and
    each draw's statistics go to `log_path` (stage2_redraws.jsonl)."""

    def __init__(self, s: dict, data: LTData, model: torch.nn.Module, images: engine.DeviceImages,
                 streams: engine.Streams, log_path: Path | None):
        self.s, self.data, self.model, self.images, self.streams, self.log_path = s, data, model, images, streams, log_path
        self.subset: np.ndarray | None = None

    def start_epoch(self, epoch: int) -> dict:
        from tailwise.training.ipdpp import select_subset

        if self.s["sampler"] == "none":
            self.subset = self.data.train_idx
            return {}
        if self.subset is not None and epoch % self.s["redraw_every"] != 0:
            return {}
        lt_labels = self.data.train_source.labels[self.data.train_idx]
        probs = torch.softmax(predict_logits(self.model, self.images, self.data.train_idx), dim=1)
        p_true = probs[torch.arange(len(lt_labels)), torch.as_tensor(lt_labels, device=probs.device)]
        chosen, stats = select_subset(p_true.cpu().numpy().astype(np.float64), lt_labels, self.s["sampler"],
                                      self.s["ratio"], self.streams.redraw(epoch))
        self.subset = self.data.train_idx[chosen]
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"epoch": epoch, "sampler": self.s["sampler"], **stats}, default=float) + "\n")
        return {"redraw": True, "subset_size": int(len(chosen))}

    def indices(self, epoch: int) -> np.ndarray:
        return self.subset

    def class_counts(self) -> list[int]:
        labels = self.data.train_source.labels
        return np.bincount(labels[self.subset], minlength=self.data.num_classes).tolist() if self.subset is not None else []

    def resume_state(self) -> dict:
        return {"subset": torch.as_tensor(self.subset)}


# ----------------------------------------------------------------------------- final classifier: LA and test
def choose_logit_adjustment(model, data: LTData, device: torch.device, counts: list[int], prior: str) -> dict:
    """Pick tau for the served logits - tau * log_prior(counts) (tailwise.format.adjust_logits) on the validation
    split (balanced accuracy); never the test set. `prior` names the counts (tailwise.format.PRIORS: the stage-2
    subset's class counts, or the training counts) and is recorded with them."""
    if prior not in fmt.PRIORS:
        raise ValueError(f"prior {prior!r}: expected one of {fmt.PRIORS}")
    images = engine.DeviceImages(data.train_source, device)
    logits = predict_logits(model, images, data.val_idx).cpu().numpy()
    labels = data.train_source.labels[data.val_idx]
    prior_logs = fmt.log_prior(counts)
    scores = {}
    for tau in LA_TAU_GRID:
        report = evaluate_logits(fmt.adjust_logits(logits, tau, prior_logs), labels, data.counts, data.groups)
        scores[tau] = report["mean_per_class"]
    best = max(LA_TAU_GRID, key=lambda t: (scores[t], -t))
    return {"tau": best, "log_prior": prior_logs, "prior": prior, "val_mean_per_class": scores}


def evaluate_run(run_dir: Path, device: torch.device, data: LTData | None = None, out_dir: Path | None = None) -> dict:
    """Score a run's final classifier on the test set; write report.json + per_class.png; return the report."""
    model, card = checkpoint.load_classifier(run_dir)
    if data is None:
        data = rebuild_lt_data(card["data"]["build_args"], card["data"]["index_sha256"], card["_dir"])
    return score_classifier(model, card, data, device, card.get("logit_adjustment"), out_dir)


def score_classifier(model, card: dict, data: LTData, device: torch.device, logit_adjustment: dict | None,
                     out_dir: Path | None = None) -> dict:
    """The test report of a classifier: plain, and with `logit_adjustment` ({"tau", "log_prior", ...}: the
    served adjustment, tailwise.format.adjust_logits) when there is one
    (also when validation picked tau = 0, so the adjusted row always exists). Written to out_dir (default:
    the run's eval/)."""
    if data.test_source is None:
        raise UserError(f"{card['_dir']}: its data has no test set (train with --test DIR or data.test_split)")
    model.to(device)
    images = engine.DeviceImages(data.test_source, device)
    logits = predict_logits(model, images, np.arange(len(data.test_source))).cpu()
    report = evaluate_logits(logits.numpy(), data.test_source.labels, data.counts, data.groups)
    la = logit_adjustment
    if la:
        adjusted = fmt.adjust_logits(logits.numpy(), la["tau"], la["log_prior"])
        report["logit_adjusted"] = evaluate_logits(adjusted, data.test_source.labels, data.counts, data.groups)
        report["logit_adjusted"]["tau"] = la["tau"]
    save_report(report, out_dir or Path(card["_dir"]) / fmt.EVAL_DIR, data.class_names,
                title=f"{card['config']['name']} (stage {card['stage']}, epoch {card['epoch']})")
    return report


def training_record(run_dir: Path, device: torch.device, d: engine.Dist) -> dict:
    """Hardware and time of a run, for its model card (seconds summed over the epochs of every stage)."""
    import os
    import platform

    seconds = {}
    for stage in (1, 2):
        path = run_dir / fmt.stage_metrics_log(stage)
        if path.exists():
            seconds[f"stage{stage}"] = round(sum(json.loads(x)["seconds"] for x in path.read_text().splitlines()), 1)
    if device.type == "cuda":
        hardware = f"{d.world} x {torch.cuda.get_device_name(device)}"
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
            else platform.processor()
        hardware = f"CPU: {cpu}, {torch.get_num_threads()} threads, {d.world} process(es), {os.cpu_count()} cores"
    return {"hardware": hardware, "torch": torch.__version__, "seconds": seconds,
            "total_seconds": round(sum(seconds.values()), 1)}


def _stage_card(run_dir: Path, stage: int) -> dict | None:
    path = run_dir / fmt.stage_card(stage)
    return checkpoint.load_card(path) if path.exists() else None


def check_start(cfg: dict, run_dir: Path, stages: tuple[int, ...], resume: bool) -> bool:
    """Refuse a start that cannot work, before any data loads; True when --resume finds nothing left to do."""
    todo = [s for s in stages if s == 1 or cfg["stage2"]["enabled"]]
    cards = {s: _stage_card(run_dir, s) for s in (1, 2)}
    if not resume:
        for s in todo:
            if cards[s]:
                raise OptionError(f"{run_dir / fmt.stage_card(s)} exists: pass {{resume=True}} to continue this run, "
                                  "or choose another {out}", "resume", "out")
    if 2 in todo and 1 not in stages and not (cards[1] and cards[1].get("finished")):
        raise OptionError(f"{run_dir}: stage 2 needs a finished stage 1 there ({fmt.stage_card(1)} "
                          + (f"is at epoch {cards[1]['epoch']}/{cards[1]['epochs']}" if cards[1] else "is missing")
                          + "); train it first with {stage=1}", "stage")
    if not (resume and todo and all(cards[s] and cards[s].get("finished") for s in todo)):
        return False
    final = cards[max(todo)]
    return final.get("kind") != "classifier" or "test" in final   # killed while scoring: score it now


def _with_stage1_as_trained(cfg: dict, run_dir: Path) -> dict:
    """cfg with the model and stage1 sections of the run's stage-1 card: stage 2 builds on what was trained."""
    card1 = checkpoint.load_card(run_dir, stage=1)
    trained = {k: card1["config"][k] for k in ("model", "stage1")}
    differs = [f"{section}.{k}" for section in trained for k in trained[section]
               if cfg[section].get(k) != trained[section][k]]
    if differs:
        print(f"tailwise: stage 2 builds on {card1['_dir']}/{fmt.stage_card(1)}, trained with its own "
              + ", ".join(f"{f}={json.dumps(card1['config'][f.split('.')[0]][f.split('.')[1]])}" for f in differs[:4])
              + (" ..." if len(differs) > 4 else "") + " (recorded as such)", flush=True)
    return dict(cfg, **copy.deepcopy(trained))


def run(cfg: dict, run_dir: Path, stages: tuple[int, ...] = (1, 2), resume: bool = False, progress: bool = True,
        data: LTData | None = None) -> dict:
    """Train the configured stages, then (on rank 0) choose logit adjustment on validation and score the test set.

    The config is validated and the run folder checked before any data loads; a start that fails before its
    first checkpoint leaves no run folder behind. With `resume` on a finished run nothing is retrained or
    re-scored (the stored test report is returned). `data`, when given, must be what data_from_config(cfg)
    builds (it saves building it twice)."""
    validate_config(cfg)
    if check_start(cfg, run_dir, stages, resume):
        final = checkpoint.load_card(run_dir)
        print(f"tailwise: {run_dir} is already finished (stage {final['stage']}: epoch {final['epoch']}/"
              f"{final['epochs']}); nothing to train. Its test report is in {run_dir / fmt.EVAL_DIR}; "
              f"`tailwise evaluate {run_dir}` scores it again.", flush=True)
        return final.get("test", {})
    device = engine.resolve_device(cfg["device"])
    d = engine.init_distributed(device)
    engine.seed_everything(engine.Streams(cfg["seed"]).init(d.rank))
    data = data if data is not None else data_from_config(cfg)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return _train_and_score(cfg, data, run_dir, device, d, stages, resume, progress)
    except BaseException:
        if created and d.main and not list(run_dir.glob(fmt.STAGE_CARDS)):  # nothing to resume from: leave no folder
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _train_and_score(cfg, data, run_dir, device, d, stages, resume, progress) -> dict:
    if d.main:
        print(f"tailwise: {cfg['name']} on {device} ({d.world} process(es)), {data.name}: "
              f"{len(data.train_idx)} train / {len(data.val_idx)} val / "
              f"{0 if data.test_source is None else len(data.test_source)} test, "
              f"index sha256 {data.index_sha256[:16]}", flush=True)
        report = data.skipped_report()
        if report:
            print("tailwise: " + "\n".join(report), flush=True)
    trained = [s for s in (1, 2) if s in stages and (s == 1 or cfg["stage2"]["enabled"])]
    result: dict = {}
    for stage in trained:
        if stage == 1:
            train_stage1(cfg, data, run_dir, device, d, resume, progress)
        else:
            cfg = _with_stage1_as_trained(cfg, run_dir)
            train_stage2(cfg, data, run_dir, device, d, resume, progress)
        if d.main:
            result = finish_stage(cfg, data, run_dir, device, d, stage, stages, last=stage == trained[-1])
        if d.world > 1:
            torch.distributed.barrier()        # stage 2 reads the finalised stage-1 card
    if not trained and d.main:                 # `--stage 2` with stage 2 disabled: score what the run holds
        result = finish_stage(cfg, data, run_dir, device, d, None, stages, last=True)
    return result


def finish_stage(cfg: dict, data: LTData, run_dir: Path, device: torch.device, d: engine.Dist, stage: int | None,
                 stages: tuple[int, ...], last: bool) -> dict:
    """The one place a run's cards are finalised, on rank 0, right after a stage has trained. The stage's card gains
    what it records of how it was trained (`trained`: epochs, recipe, the `tailwise train` command that repeats
    it; stage 2's also stage 1's record). After the last stage this command trains, the run's final classifier (its
    highest finished card) also gains the logit adjustment chosen on validation, hardware and time (`training`)
    and its test report (`test`). One read and one write per card. Returns the test report ({} when nothing was
    scored: no test set, or the run ends with an encoder)."""
    updates: dict[int, dict] = {}
    cards: dict[int, dict] = {}
    if stage is not None:
        cards[stage] = card = checkpoint.load_card(run_dir, stage=stage)
        if card.get("finished") and str(stage) not in card.get("trained", {}):
            records = dict(checkpoint.load_card(run_dir, stage=1).get("trained", {})) if stage == 2 else {}
            records[str(stage)] = {"epochs": card["epoch"], "recipe": cfg["name"],
                                   "command": reproduce_command(cfg, str(run_dir),
                                                                stage=stage if stages == (stage,) else None)}
            updates[stage] = {"trained": records}
    result: dict = {}
    if last:
        final_stage = 2 if (run_dir / fmt.stage_card(2)).exists() else 1
        final = cards.get(final_stage) or checkpoint.load_card(run_dir, stage=final_stage)
        cards[final_stage] = final
        if final.get("finished") and final.get("kind") == "classifier":
            result, scored = _score_final(cfg, data, final, device, d)
            updates.setdefault(final_stage, {}).update(scored)
    for number, fields in updates.items():
        checkpoint.update_card(cards[number], fields)
    return result


def _score_final(cfg: dict, data: LTData, card: dict, device: torch.device, d: engine.Dist) -> tuple[dict, dict]:
    """(test report, card fields) of the run's final classifier: logit adjustment chosen on validation (prior: what
    the classifier last trained on, the LT counts for a stage-1 classifier; `stage2.logit_adjust` switches it off),
    hardware and time, and the test report when there is a test set."""
    model = checkpoint.classifier_from_card(card).to(device)
    fields = {}
    if cfg["stage2"]["logit_adjust"] and len(data.val_idx):     # every final classifier, single-stage included
        if card["stage"] == 2:
            counts, prior = card["train_distribution"], fmt.PRIOR_STAGE2_SUBSET
        else:
            counts, prior = data.counts, fmt.PRIOR_TRAIN
        fields["logit_adjustment"] = choose_logit_adjustment(model, data, device, counts, prior)
    fields["training"] = training_record(Path(card["_dir"]), device, d)
    if data.test_source is None:
        print("tailwise: no test set (give one with --test DIR, or data.test_split): nothing scored", flush=True)
        return {}, fields
    result = score_classifier(model, card, data, device, fields.get("logit_adjustment", card.get("logit_adjustment")))
    fields["test"] = {k: result[k] for k in ("num_samples", "top1", "many", "medium", "few", "mean_per_class",
                                             "per_class", "nll", "ece")}
    if "logit_adjusted" in result:
        fields["test"]["logit_adjusted"] = {k: result["logit_adjusted"][k] for k in
                                            ("top1", "many", "medium", "few", "mean_per_class", "per_class", "tau")}
    print(format_evaluation(result, data.class_names), flush=True)
    return result, fields
