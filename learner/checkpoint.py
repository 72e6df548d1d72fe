"""Atomic learner checkpoints without pickle.

A checkpoint is one folder ``DIR/ckpt-<step>/`` holding ``tensors.safetensors`` (every tensor of the
state, keyed by its path) and ``state.json`` (the rest of the nested structure, with tensors
replaced by ``{"__tensor__": key}``, plus the sha256 of the tensor file). It is written to a temp
folder, fsynced and renamed, then ``DIR/LATEST`` is atomically updated. On load, a checkpoint whose
files are missing or whose digest fails (a torn write) is skipped for the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fleetloop.dataset import atomic_write
from fleetloop.logs import event, get_logger
from fleetloop.weights import sha256_hex

log = get_logger("learner.checkpoint")


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{path}.k{i}", tensors), _flatten(v, f"{path}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint cannot store {type(obj).__name__} at {path or 'root'}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def save_checkpoint(root: Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` atomically as checkpoint ``step``; keep the newest ``keep``. Returns its folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    blob = st_save(tensors)
    final = root / f"ckpt-{step:012d}"
    tmp = root / f".tmp-ckpt-{step:012d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    atomic_write(tmp / "tensors.safetensors", blob)
    atomic_write(tmp / "state.json", json.dumps({"step": step, "sha256": sha256_hex(blob), "state": skeleton}).encode())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(root / "LATEST", final.name.encode())
    for old in sorted(p for p in root.glob("ckpt-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_one(folder: Path) -> dict[str, Any]:
    """The state saved in one checkpoint folder (``state.json`` + ``tensors.safetensors``); raises
    when the folder is torn or its tensors do not load (:func:`load_latest` skips such folders)."""
    meta = json.loads((folder / "state.json").read_text())
    blob = (folder / "tensors.safetensors").read_bytes()
    if sha256_hex(blob) != meta["sha256"]:
        raise ValueError(f"checkpoint {folder.name} tensor file fails its sha256")
    return _unflatten(meta["state"], st_load(blob))


def load_latest(root: Path) -> tuple[int, dict[str, Any]] | None:
    """Newest intact checkpoint as (step, state), skipping torn ones; None if there is none.

    Called once when a learner starts (the only writer of ``root``): it also deletes the temp
    folders of checkpoints a killed process never finished (``.tmp-ckpt-*``), which nothing else
    would ever remove."""
    root = Path(root)
    for partial in root.glob(".tmp-ckpt-*"):
        shutil.rmtree(partial, ignore_errors=True)
        event(log, "checkpoint_partial_removed", folder=partial.name)
    candidates = sorted((p for p in root.glob("ckpt-*") if p.is_dir()), reverse=True)
    for folder in candidates:
        try:
            state = load_one(folder)
            return int(folder.name.split("-")[1]), state
        except Exception as exc:  # torn or partial: fall back to the previous one
            event(log, "checkpoint_skipped", folder=folder.name, error=repr(exc)[:200])
    return None
