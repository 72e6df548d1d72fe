"""``fleetloop data export --format lerobot JOB OUT``: a job's fleet experience as a LeRobotDataset v3.

Source: the learner state dir's ingest log, read offline and read-only (:mod:`services.data.experience`:
complete episodes, one at a time; open ones only with ``include_open``; LLM group chunks skipped).
``JOB`` is a job id (its state dir ``DATA/jobs/<id>/learner``, ``DATA`` the control plane's data dir,
default ``runs/controlplane`` as ``fleetloop up`` uses) or the path of a learner state dir.

Features (named the LeRobot way):

- observation tensors: the camera images (uint8 ``[H, W, C]``, C in 1/3/4) become
  ``observation.images.<name>`` videos (``vcodec``; a camera a 4:2:0 video cannot hold, C != 3 or an
  odd height or width, is stored as ``image`` frames instead); the other tensors become
  ``observation.state`` when there is exactly one, else ``observation.<name>`` each (their dtype,
  float16 widened to float32, flattened to a vector ``[D]`` as LeRobot features are; a scalar ``(1,)``);
- ``action``: float32, the action tensors flattened and concatenated in name order (the learner's
  layout; ``meta/fleetloop.json`` records each tensor's slice);
- per step: ``next.reward`` float32 (1,), ``next.done`` bool (1,) (the last step of a complete episode,
  or an env terminal flag the actor sent), ``intervention`` bool (1,) (the operator took the step),
  ``policy_version`` int64 (1,) (behaviour policy version of the step's chunk);
- per episode (``meta/episodes``): ``fleetloop.outcome`` (success/failure/timeout/aborted, ``open``
  for an open episode), ``fleetloop.actor_id``, ``fleetloop.episode_id``, ``fleetloop.total_reward``
  (sum of the exported steps' rewards), ``fleetloop.seq_gaps`` (chunks missing, set aside by the actor);
- task: the chunk's task id (the job's task); fps: ``fps`` when given, else 10 — the robots' control
  rate is not recorded in the learner state dir (the job spec lives in the control plane's Redis and
  an actor's ``hz`` only in its handshake), so 10 is the documented default.

``meta/fleetloop.json`` keeps the provenance: job id, state dir, export time, counts (episodes
exported, open ones skipped, empty ones, LLM chunks, invalid chunks, torn tail bytes), the source
tensors, and under ``mapping`` the tensor -> feature mapping in the import mapping's form
(:class:`fleetloop.lerobot.FeatureMapping`: ``observations``, ``actions``, ``reward``,
``intervention``), which ``fleetloop data import`` takes as its default mapping; ``layout`` adds each
action tensor's slice of ``action`` and the per-step feature names.

Errors: InvalidArgument for an empty job or an output folder that is not empty; NotFound naming the
job and the paths looked at when the state dir or its ingest log is missing; FailedPrecondition when
the log holds no episode to export.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fleetloop.dataset import atomic_write
from fleetloop.errors import FailedPrecondition, InvalidArgument, NotFound
from fleetloop.specs import TensorInfo
from services.data.experience import Episode, LogIndex, index_log, iter_episodes, log_path

FORMAT = "fleetloop-lerobot-export/v1"
PROVENANCE = Path("meta") / "fleetloop.json"
DEFAULT_FPS = 10
STEP_FEATURES = {"rewards": "next.reward", "dones": "next.done", "interventions": "intervention",
                 "behavior_version": "policy_version"}
_INFO_KEYS = ("codebase_version", "total_episodes", "total_frames", "total_tasks", "fps")  # of the writer's info.json
EPISODE_COLUMNS = ("fleetloop.outcome", "fleetloop.actor_id", "fleetloop.episode_id", "fleetloop.total_reward",
                   "fleetloop.seq_gaps")


def default_data_dir() -> Path:
    """The control plane's default data dir (``fleetloop up --data``'s default, ``runs/controlplane``)."""
    from services.control.up import UpOptions

    return Path(UpOptions.model_fields["data"].default)


def _looks_like_path(job: str) -> bool:
    return "/" in job or "\\" in job or job.startswith((".", "~"))


def resolve_state_dir(job: str, data_dir: Path | None = None) -> tuple[str | None, Path]:
    """(job id or None when ``job`` was a path, learner state dir) for a job id or a state dir path.

    A job id resolves to ``DATA/jobs/<id>/learner`` (``data_dir`` or :func:`default_data_dir`); a
    value that looks like a path (a separator, ``.``/``~`` first), or an id with no such job whose
    value names an existing folder, is taken as the state dir. NotFound names the job and every path
    looked at; InvalidArgument an empty ``job``."""
    job = (job or "").strip()
    if not job:
        raise InvalidArgument("job must be a job id or a learner state dir path", field="job", value=job)
    given = Path(job).expanduser()
    if _looks_like_path(job):
        if not given.is_dir():
            raise NotFound(f"learner state dir {str(given)!r} (job {job!r}) does not exist", field="job", value=job)
        return None, given
    data = Path(data_dir) if data_dir is not None else default_data_dir()
    state_dir = data / "jobs" / job / "learner"
    if state_dir.is_dir():
        return job, state_dir
    if given.is_dir():
        return None, given
    raise NotFound(f"job {job!r} has no learner state dir {str(state_dir)!r} (data dir {str(data)!r}; pass the data "
                   f"dir or the state dir's path)", field="job", value=job)


def feature_names(idx: LogIndex) -> dict[str, str]:
    """Observation tensor name -> LeRobot feature name (module docstring); InvalidArgument when two
    tensors would share a feature name."""
    cams = [t for t in idx.observations if t.is_image]
    others = [t for t in idx.observations if not t.is_image]
    names = {t.name: f"observation.images.{t.name}" for t in cams}
    if len(others) == 1:
        names[others[0].name] = "observation.state"
    else:
        names.update({t.name: f"observation.{t.name}" for t in others})
    reserved = {"action", *STEP_FEATURES.values()}
    seen: dict[str, str] = {}
    for tensor, feat in names.items():
        if feat in seen or feat in reserved:
            raise InvalidArgument(f"observation tensors {seen.get(feat, feat)!r} and {tensor!r} both map to feature "
                                  f"{feat!r}", field=f"observations[{tensor}]", value=feat)
        seen[feat] = tensor
    return names


def import_mapping(idx: LogIndex, names: dict[str, str]) -> dict[str, Any]:
    """The tensor -> feature mapping in :class:`fleetloop.lerobot.FeatureMapping`'s form (what
    ``fleetloop data import`` reads): observations by tensor, each action tensor -> ``action`` (binds
    as is for a job with one action tensor), ``reward`` and ``intervention``."""
    return {"observations": dict(names), "actions": {t.name: "action" for t in idx.actions},
            "reward": STEP_FEATURES["rewards"], "intervention": STEP_FEATURES["interventions"]}


def action_slices(idx: LogIndex) -> dict[str, list[int]]:
    """Action tensor name -> [start, stop) of its flattened values in the ``action`` feature."""
    out, start = {}, 0
    for t in sorted(idx.actions, key=lambda t: t.name):
        out[t.name] = [start, start + math.prod(t.shape)]
        start += math.prod(t.shape)
    return out


def _value_dtype(t: TensorInfo) -> str:
    """The feature dtype of a non-camera tensor: its own, float16 widened to float32."""
    return t.dtype if t.dtype in ("float32", "float64", "int64", "int32", "bool", "uint8") else "float32"


def visual_dtype(t: TensorInfo) -> str:
    """'video' for an RGB camera with even height and width (4:2:0 video), else 'image' (PNG frames)."""
    h, w, c = t.shape
    return "video" if c == 3 and h % 2 == 0 and w % 2 == 0 else "image"


def build_features(idx: LogIndex, names: dict[str, str]) -> dict[str, Any]:
    """The LeRobot features of the export (:class:`fleetloop.lerobot.Feature` by feature name). A
    non-camera tensor is a vector feature of its flattened size (a scalar ``(1,)``; LeRobot features are
    ``[D]``), its element names ``<tensor>_<i>``."""
    from fleetloop.lerobot import Feature

    feats: dict[str, Any] = {}
    for t in idx.observations:
        if t.is_image:
            feats[names[t.name]] = Feature(names[t.name], visual_dtype(t), t.shape, ["height", "width", "channels"])
        else:
            size = math.prod(t.shape)
            feats[names[t.name]] = Feature(names[t.name], _value_dtype(t), (size,), [f"{t.name}_{i}" for i in range(size)])
    slices = action_slices(idx)
    act_names = [f"{n}_{i}" for n, (a, b) in slices.items() for i in range(b - a)]
    feats["action"] = Feature("action", "float32", (len(act_names),), act_names)
    feats["next.reward"] = Feature("next.reward", "float32", (1,))
    feats["next.done"] = Feature("next.done", "bool", (1,))
    feats["intervention"] = Feature("intervention", "bool", (1,))
    feats["policy_version"] = Feature("policy_version", "int64", (1,))
    return feats


def to_lerobot(ep: Episode, names: dict[str, str], infos: list[TensorInfo]):
    """One :class:`Episode` as a :class:`fleetloop.lerobot.LeRobotEpisode` (features of :func:`build_features`)."""
    from fleetloop.lerobot import LeRobotEpisode

    n = len(ep)
    frames: dict[str, np.ndarray] = {}
    for t in infos:
        arr = ep.obs[t.name]
        frames[names[t.name]] = arr if t.is_image else arr.reshape(n, -1).astype(_value_dtype(t), copy=False)
    frames["action"] = ep.actions
    frames["next.reward"] = ep.rewards.reshape(n, 1)
    frames["next.done"] = ep.dones.reshape(n, 1)
    frames["intervention"] = ep.interventions.reshape(n, 1)
    frames["policy_version"] = ep.versions.reshape(n, 1)
    extra = {"fleetloop.outcome": ep.outcome or "open", "fleetloop.actor_id": ep.actor_id,
             "fleetloop.episode_id": ep.episode_id, "fleetloop.total_reward": float(ep.rewards.sum(dtype=np.float64)),
             "fleetloop.seq_gaps": int(ep.seq_gaps)}
    return LeRobotEpisode(task=ep.task_id, frames=frames, extra=extra)


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True))


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgument(f"output {str(out)!r} exists and is not an empty folder", field="out", value=str(out))


def export_job(job: str, out: Path, data_dir: Path | None = None, vcodec: str = "libx264", *,
               include_open: bool = False, fps: int | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Export ``job``'s experience (a job id or a learner state dir path) to the LeRobotDataset v3
    folder ``out`` (must be missing or empty); returns a JSON-able summary (also written, with the
    mapping, to ``out/meta/fleetloop.json``). ``include_open``: export open episodes too (outcome
    ``open``); ``fps``: the dataset's frame rate (default 10); ``progress``: rich bars on stderr over
    the log and the episodes (None: when stderr is a terminal). See the module docstring for the
    features and errors."""
    job_id, state_dir = resolve_state_dir(job, data_dir)
    path = log_path(state_dir)
    out = Path(out)
    _check_out(out)
    if fps is not None and not 1 <= int(fps) <= 1000:
        raise InvalidArgument(f"fps {fps} must be in 1..1000", field="fps", value=fps)
    rate = int(fps) if fps is not None else DEFAULT_FPS
    counts = {"episodes_exported": 0, "episodes_open_exported": 0, "frames": 0, "seq_gaps": 0, "invalid_chunks": 0}
    with _progress(sys.stderr.isatty() if progress is None else progress) as bar:
        if bar is not None:
            task = bar.add_task(f"index {path.name}", total=path.stat().st_size)
            idx = index_log(path, lambda done: bar.update(task, completed=done))
        else:
            idx = index_log(path)
        job_id = job_id or idx.job_id or state_dir.parent.name
        exportable = [e for e in idx.episodes.values() if e.steps and (e.complete or include_open)]
        if not idx.robot_chunks or not exportable:
            raise FailedPrecondition(
                f"job {job_id!r}: the ingest log {str(path)!r} holds no episode to export ({idx.robot_chunks} robot chunks, "
                f"{idx.open_episodes} open episode(s){'' if include_open else ' skipped without include_open'}, "
                f"{idx.llm_chunks} LLM group chunk(s))", field="job", value=job_id)
        from fleetloop.lerobot import write_dataset

        names = feature_names(idx)
        features = build_features(idx, names)
        ep_task = bar.add_task("export episodes", total=len(exportable)) if bar is not None else None

        def episodes() -> Iterator[Any]:
            for ep in iter_episodes(idx, include_open):
                counts["episodes_exported"] += 1
                counts["episodes_open_exported"] += ep.outcome is None
                counts["frames"] += len(ep)
                counts["seq_gaps"] += ep.seq_gaps
                counts["invalid_chunks"] += ep.invalid_chunks
                yield to_lerobot(ep, names, idx.observations)
                if bar is not None:
                    bar.advance(ep_task)

        written = write_dataset(out, episodes(), features, rate, robot_type=None, vcodec=vcodec, progress=False)
    counts.update(episodes_open_skipped=0 if include_open else sum(1 for e in idx.episodes.values() if e.steps and not e.complete),
                  episodes_empty=idx.empty_episodes, llm_chunks=idx.llm_chunks, records=idx.records,
                  robot_chunks=idx.robot_chunks, unreadable_records=idx.invalid_chunks,
                  torn_tail_bytes=idx.torn_tail_bytes)
    counts["invalid_chunks"] += idx.invalid_chunks
    provenance = {
        "format": FORMAT, "job_id": job_id, "state_dir": str(state_dir.resolve()), "ingest_log": str(path.resolve()),
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fps": rate, "fps_source": "argument" if fps is not None else "default", "include_open": include_open,
        "vcodec": vcodec, "counts": counts,
        "mapping": import_mapping(idx, names),
        "layout": {"action_slices": action_slices(idx), "steps": dict(STEP_FEATURES),
                   "episode_columns": list(EPISODE_COLUMNS)},
        "tensors": {"observations": [_info_json(t) for t in idx.observations],
                    "actions": [_info_json(t) for t in idx.actions]},
    }
    atomic_write(out / PROVENANCE, (json.dumps(provenance, indent=1, sort_keys=True) + "\n").encode())
    return {**{k: provenance[k] for k in ("format", "job_id", "state_dir", "fps", "counts", "mapping")},
            "out": str(out), "dataset": _jsonable({k: written.get(k) for k in _INFO_KEYS})}


def _info_json(t: TensorInfo) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "camera": t.is_image}


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (the writer's summary may hold paths or numpy scalars)."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
