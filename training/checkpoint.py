"""Checkpoints: safetensors weights plus a JSON card, committed atomically.

A stage's checkpoint in a run folder is the card `stage{N}.json`, which names the weights file
`stage{N}-e{epoch}.safetensors` (and, while training, the resume file with the optimizer state). Every file
is written to a temp name and moved into place with `os.replace`; the card is written last, so it is the
commit point: a reader that finds a card finds complete files with the hashes the card records. Files of
older epochs are deleted only after the new card is in place. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tailwise import UserError, __version__
from tailwise._core import atomic_path, atomic_write_text, sha256_file  # noqa: F401 (re-exported for export/)
from tailwise.format import STAGE_CARDS, stage_card, stage_resume, stage_tensor_files, stage_weights


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> str:
    """Save tensors as safetensors atomically; returns the file's sha256."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        digest = sha256_file(tmp)
    return digest


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: str | os.PathLike, stage: int, model: torch.nn.Module, card: dict,
                    optimizer: torch.optim.Optimizer | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write stage `stage`'s weights (and resume state, if `optimizer` is given) and its card; returns the card path.

    `card` must hold at least "epoch"; this adds tailwise_version, stage, weights, weights_sha256 and resume.
    `extra_tensors` (e.g. the current IP-DPP subset) travel in the resume file.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    epoch = int(card["epoch"])
    weights_name = stage_weights(stage, epoch)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    card = dict(card, tailwise_version=__version__, stage=stage, weights=weights_name)
    card["weights_sha256"] = atomic_save_tensors(run_dir / weights_name, model.state_dict())
    card["resume"] = None
    if optimizer is not None:
        resume_name = stage_resume(stage, epoch)
        tensors, meta = _optimizer_tensors(optimizer)
        tensors.update({f"extra.{k}": v for k, v in (extra_tensors or {}).items()})
        card["resume"] = {"file": resume_name, "sha256": atomic_save_tensors(run_dir / resume_name, tensors),
                          "optimizer": meta}
    card_path = run_dir / stage_card(stage)
    atomic_write_text(card_path, json.dumps(card, indent=2, sort_keys=True))
    keep = {weights_name, card["resume"]["file"] if card["resume"] else None}
    for old in run_dir.glob(stage_tensor_files(stage)):
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return card_path


def card_path_for(path: str | os.PathLike, stage: int | None = None) -> Path:
    """Resolve a run folder or card path to a card: a folder gives its highest-stage card (or `stage`)."""
    path = Path(path)
    if path.is_dir():
        stages = [stage] if stage else [2, 1]
        for s in stages:
            if (path / stage_card(s)).exists():
                return path / stage_card(s)
        raise UserError(f"{path}: no checkpoint card ({stage_card(stages[0])}) in this folder")
    if path.suffix == ".safetensors":
        candidates = list(path.parent.glob(STAGE_CARDS))
        for c in candidates:
            if json.loads(c.read_text()).get("weights") == path.name:
                return c
        raise UserError(f"{path}: no card in {path.parent} names this weights file")
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint")
    return path


def load_card(path: str | os.PathLike, stage: int | None = None) -> dict:
    card_path = card_path_for(path, stage)
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{card_path}: unreadable checkpoint card ({exc})") from exc
    for key in ("stage", "epoch", "weights", "weights_sha256"):
        if key not in card:
            raise UserError(f"{card_path}: not a tailwise checkpoint card (missing {key!r})")
    card["_dir"] = str(card_path.parent)
    return card


def _load_verified(path: Path, expected_sha256: str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise UserError(f"{path}: missing checkpoint file")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise UserError(f"{path}: sha256 {actual[:12]}... does not match its card ({expected_sha256[:12]}...): "
                        "the file is corrupt or was replaced")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise UserError(f"{path}: not a valid safetensors file ({exc})") from exc


def load_weights(card: dict) -> dict[str, torch.Tensor]:
    return _load_verified(Path(card["_dir"]) / card["weights"], card["weights_sha256"])


def load_resume(card: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """The optimizer state_dict and the extra tensors saved with `card`'s checkpoint."""
    if not card.get("resume"):
        raise UserError(f"{card['_dir']}: stage{card['stage']} checkpoint has no resume state")
    tensors = _load_verified(Path(card["_dir"]) / card["resume"]["file"], card["resume"]["sha256"])
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    optim = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    return _optimizer_state(optim, card["resume"]["optimizer"]), extra


def update_card(card: dict, fields: dict) -> None:
    """Add `fields` to the checkpoint card `card` (as load_card returned it) and write it back atomically."""
    stored = {k: v for k, v in card.items() if k != "_dir"}
    stored.update(fields)
    atomic_write_text(Path(card["_dir"]) / stage_card(card["stage"]), json.dumps(stored, indent=2, sort_keys=True))
    card.update(fields)


def load_classifier(path: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """The final classifier of a run folder (or a classifier card/weights file), in eval mode, and its card."""
    card = load_card(path)
    return classifier_from_card(card), card


def classifier_from_card(card: dict) -> torch.nn.Module:
    """The classifier a card (from load_card) describes, its weights verified and loaded, in eval mode."""
    if card.get("kind") != "classifier":
        raise UserError(f"{card['_dir']}: stage{card['stage']} holds a {card.get('kind')} model, not a classifier "
                        "(stage 1 of a BNS run is an encoder: train stage 2 first)")
    model = build_classifier(card)
    model.load_state_dict(load_weights(card))
    return model.eval()


def build_classifier(card: dict) -> torch.nn.Module:
    from tailwise.training.networks import Classifier

    data, cfg = card["data"], card["config"]
    return Classifier(cfg["model"]["arch"], data["channels"], len(data["class_names"]), data["mean"], data["std"],
                      head=card.get("head", "linear"))
