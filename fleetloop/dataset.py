"""Offline demonstration dataset: the on-disk format shared by ``fleetloop demos record`` (actor
side) and ``fleetloop pretrain`` / the learner's offline buffer.

Layout (format ``fleetloop-demos/v1``)::

    DIR/manifest.json
    DIR/episodes/<task_id>/<episode_id>.safetensors

``manifest.json``::

    {"format": "fleetloop-demos/v1", "obs_dim": 39, "act_dim": 4,
     "observation_key": "state", "action_key": "action",
     "episodes": [{"episode_id": "...", "task_id": "reach-v3", "file": "episodes/reach-v3/<id>.safetensors",
                   "length": 87, "outcome": "success", "sha256": "<hex of the file>", "seed": 3}, ...]}

Each episode file holds float32 ``obs`` [T, obs_dim], float32 ``actions`` [T, act_dim], float32
``rewards`` [T] and bool ``interventions`` [T] (all True for a demonstration: every step is the
expert's).

Format ``fleetloop-demos/v2`` (written when the observation is several named tensors, e.g. cameras
plus proprioception) differs only in the observation: the manifest carries
``"observation_specs": [{"name", "dtype", "shape"}, ...]`` (``obs_dim`` is the width of the vector
tensors) and each episode file holds one ``obs.<name>`` array ``[T, *shape]`` per tensor in its own
dtype (camera frames uint8 ``[T, H, W, C]``); :attr:`DemoEpisode.obs` is then a dict. Readers accept
both formats; a v1 episode's ``obs`` stays one float32 array. Episode files are written atomically (temp file, fsync, rename); the manifest is
rewritten atomically after each episode, so a crash never leaves a manifest naming a torn file.
Every file's sha256 is checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

from fleetloop.errors import IntegrityError, InvalidArgument, NotFound
from fleetloop.specs import TensorInfo, flat_tensor, tensor_info

FORMAT = "fleetloop-demos/v1"
FORMAT_V2 = "fleetloop-demos/v2"
FORMATS = (FORMAT, FORMAT_V2)


@dataclass
class DemoEpisode:
    """One demonstration episode, arrays of equal length T."""

    episode_id: str
    task_id: str
    obs: Any  # float32 [T, obs_dim] (v1) or {name: [T, *shape]} (v2)
    actions: np.ndarray
    rewards: np.ndarray
    interventions: np.ndarray
    outcome: str = "success"
    seed: int | None = None

    def __len__(self) -> int:
        return int(self.actions.shape[0])


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class DemoWriter:
    """Appends episodes to a dataset folder (creating it, or extending a compatible one).

    ``obs``: a width (v1: one float32 ``state`` vector) or the observation tensors (v2)."""

    def __init__(self, root: str | Path, obs: "int | Sequence[Any]", act_dim: int) -> None:
        self.root = Path(root)
        self.specs: tuple[TensorInfo, ...] | None = None
        if isinstance(obs, (int, np.integer)):
            self.obs_dim = int(obs)
        else:
            self.specs = tuple(tensor_info(o) for o in obs)
            self.obs_dim = sum(t.size for t in self.specs if not t.is_image)
        self.act_dim = act_dim
        want = {"format": FORMAT if self.specs is None else FORMAT_V2, "obs_dim": self.obs_dim, "act_dim": act_dim}
        if self.specs is not None:
            want["observation_specs"] = [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.specs]
        manifest = self.root / "manifest.json"
        if manifest.exists():
            self.manifest = read_manifest(self.root)
            have = {k: self.manifest.get(k) for k in want}
            if have != want:
                raise InvalidArgument(f"dataset {self.root} holds {have}, not {want}", field="dataset", value=str(self.root))
        else:
            self.manifest = {**want, "observation_key": "state", "action_key": "action", "episodes": []}

    def _obs_arrays(self, ep: DemoEpisode, t: int) -> dict[str, np.ndarray]:
        if self.specs is None:
            obs = np.asarray(ep.obs)
            if obs.shape != (t, self.obs_dim):
                raise InvalidArgument(f"episode {ep.episode_id} obs shape {obs.shape}, want {(t, self.obs_dim)}",
                                      field="episode.obs", value=list(obs.shape))
            return {"obs": np.ascontiguousarray(obs, dtype=np.float32)}
        out = {}
        for spec in self.specs:
            arr = np.asarray(ep.obs.get(spec.name) if isinstance(ep.obs, dict) else None)
            if arr.shape != (t, *spec.shape):
                raise InvalidArgument(f"episode {ep.episode_id} obs[{spec.name}] shape {arr.shape}, want {(t, *spec.shape)}",
                                      field=f"episode.obs[{spec.name}]", value=list(arr.shape))
            out[f"obs.{spec.name}"] = np.ascontiguousarray(arr, dtype=spec.dtype)
        return out

    def add(self, ep: DemoEpisode) -> None:
        """Write one episode file, then the updated manifest (both atomically)."""
        t = len(ep)
        if ep.actions.shape != (t, self.act_dim):
            raise InvalidArgument(f"episode {ep.episode_id} actions shape {ep.actions.shape}",
                                  field="episode", value=ep.episode_id)
        blob = np_save({
            **self._obs_arrays(ep, t),
            "actions": np.ascontiguousarray(ep.actions, dtype=np.float32),
            "rewards": np.ascontiguousarray(ep.rewards, dtype=np.float32),
            "interventions": np.ascontiguousarray(ep.interventions, dtype=np.bool_),
        })
        rel = f"episodes/{ep.task_id}/{ep.episode_id}.safetensors"
        atomic_write(self.root / rel, blob)
        self.manifest["episodes"].append({
            "episode_id": ep.episode_id, "task_id": ep.task_id, "file": rel, "length": t,
            "outcome": ep.outcome, "sha256": hashlib.sha256(blob).hexdigest(), "seed": ep.seed,
        })
        atomic_write(self.root / "manifest.json", json.dumps(self.manifest, indent=1).encode())


def observation_specs(manifest: dict) -> list[TensorInfo]:
    """The observation tensors a dataset's episodes hold (v1: one float32 ``state`` [obs_dim])."""
    if manifest.get("format") == FORMAT_V2:
        return [tensor_info(s) for s in manifest["observation_specs"]]
    return [flat_tensor(int(manifest["obs_dim"]))]


def read_manifest(root: str | Path) -> dict:
    """Load and check ``manifest.json``; NotFound / InvalidArgument name the path."""
    path = Path(root) / "manifest.json"
    if not path.exists():
        raise NotFound(f"no dataset at {root} (missing manifest.json)", field="dataset", value=str(root))
    manifest = json.loads(path.read_text())
    if manifest.get("format") not in FORMATS:
        raise InvalidArgument(f"dataset format {manifest.get('format')!r} is not one of {list(FORMATS)}",
                              field="dataset.format", value=manifest.get("format"))
    return manifest


def iter_episodes(root: str | Path, tasks: list[str] | None = None) -> Iterator[DemoEpisode]:
    """Yield the dataset's episodes (optionally only ``tasks``), verifying each file's sha256."""
    root = Path(root)
    manifest = read_manifest(root)
    for entry in manifest["episodes"]:
        if tasks is not None and entry["task_id"] not in tasks:
            continue
        blob = (root / entry["file"]).read_bytes()
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise IntegrityError(f"episode file {entry['file']} fails its sha256", field="file", value=entry["file"])
        arrays = np_load(blob)
        obs = arrays["obs"] if "obs" in arrays else {k[4:]: v for k, v in arrays.items() if k.startswith("obs.")}
        yield DemoEpisode(entry["episode_id"], entry["task_id"], obs, arrays["actions"],
                          arrays["rewards"], arrays["interventions"], entry.get("outcome", "success"), entry.get("seed"))


def task_counts(root: str | Path) -> dict[str, int]:
    """Episodes per task in the dataset (0 for a missing dataset)."""
    try:
        manifest = read_manifest(root)
    except NotFound:
        return {}
    counts: dict[str, int] = {}
    for entry in manifest["episodes"]:
        counts[entry["task_id"]] = counts.get(entry["task_id"], 0) + 1
    return counts
