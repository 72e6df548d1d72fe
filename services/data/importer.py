"""``fleetloop data import --format lerobot``: a LeRobotDataset v3.0 as a native ``fleetloop-demos``
dataset that a job then names as its ``offline_dataset``.

Contract of :func:`import_lerobot` (everything is checked before anything is written; every refusal
is an :class:`~fleetloop.errors.InvalidArgument` / NotFound naming the field):

- the mapping: ``mapping`` (a file or a FeatureMapping), or, when None, the ``mapping`` that
  ``fleetloop data export`` records in the dataset's ``meta/fleetloop.json`` (InvalidArgument naming
  ``mapping`` when there is none);
- the job's tensors come from its JobSpec file (:meth:`JobSpec.tensor_specs`: the declared
  ``observation_specs`` / ``action_specs``, or the simulated preset); the mapping file
  (:class:`fleetloop.lerobot.FeatureMapping`) is checked against the dataset's features and those
  tensors (``mapping.<group>.<tensor>`` on a refusal);
- tasks: a LeRobot task string maps to the job task ``task_map[string]`` when the task map has it,
  else to itself when it is one of the job's tasks. ``tasks`` (job task ids, each one of the job's:
  ``tasks[i]`` otherwise) keeps only the episodes whose task maps to one of them and skips the rest;
  without it every episode's task must map (``task`` names the first that does not). Task map
  values must be job tasks (``task_map[<string>]``);
- output format: ``fleetloop-demos/v1`` when the job observes exactly one float32 vector named
  ``state`` (what v1 means), else ``fleetloop-demos/v2`` with the job's observation specs. Episodes
  are appended through :class:`fleetloop.dataset.DemoWriter` (a folder holding an incompatible
  dataset is refused by it). Each episode keeps its ``fleetloop.seed`` and ``fleetloop.outcome``
  ``meta/episodes`` columns: an outcome of :data:`OUTCOMES` as it is, none "success" (a
  demonstration), any other value (an export's ``open`` episode) "timeout" (ended without a result);
- returns a summary: ``out``, ``format``, ``episodes``, ``frames`` (steps written), ``skipped``,
  ``tasks`` (episodes per job task).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import ValidationError

from fleetloop.dataset import FORMAT, FORMAT_V2, DemoEpisode, DemoWriter
from fleetloop.errors import InvalidArgument, NotFound
from fleetloop.lerobot import FeatureMapping, LeRobotReader
from fleetloop.lerobot.writer import progress_bar
from fleetloop.specs import DEFAULT_OBS_NAME, TensorInfo, tensor_info
from services.control.jobspec import JobSpec

#: Episode outcomes the learner knows (the wire's ``EpisodeEnd.outcome``).
OUTCOMES = ("success", "failure", "timeout", "aborted")
#: Where ``fleetloop data export`` records provenance and the import mapping, under the dataset root.
PROVENANCE = "meta/fleetloop.json"


def load_job_spec(path: str | Path) -> JobSpec:
    """A JobSpec from a YAML or JSON file; NotFound naming ``job_spec``, InvalidArgument naming
    ``job_spec.<field path>`` of the first problem."""
    from services.control.client import load_spec

    path = Path(path)
    if not path.exists():
        raise NotFound(f"no job spec file {path}", field="job_spec", value=str(path))
    try:
        return JobSpec.model_validate(load_spec(path))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise InvalidArgument(f"job spec {path}: {loc or 'spec'}: {err['msg']}", field=f"job_spec.{loc}" if loc else "job_spec",
                              value=str(path)) from None


def load_task_map(path: str | Path | None) -> dict[str, str]:
    """``{LeRobot task string: job task id}`` from a YAML/JSON file (empty for None)."""
    if path is None:
        return {}
    import yaml

    path = Path(path)
    if not path.exists():
        raise NotFound(f"no task map file {path}", field="task_map", value=str(path))
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise InvalidArgument(f"task map {path} must map LeRobot task strings to job task ids", field="task_map",
                              value=str(path))
    return dict(data)


def resolve_tasks(episode_tasks: Sequence[Sequence[str]], job_tasks: Sequence[str], task_map: Mapping[str, str],
                  only: Sequence[str] | None) -> list[str | None]:
    """Each episode's job task, or None to skip it (contract: the module docstring)."""
    for string, task in task_map.items():
        if task not in job_tasks:
            raise InvalidArgument(f"task_map[{string}] is {task!r}, not one of the job's tasks {list(job_tasks)}",
                                  field=f"task_map[{string}]", value=task)
    for i, task in enumerate(only or ()):
        if task not in job_tasks:
            raise InvalidArgument(f"tasks[{i}] {task!r} is not one of the job's tasks {list(job_tasks)}", field=f"tasks[{i}]",
                                  value=task)
    out: list[str | None] = []
    for i, strings in enumerate(episode_tasks):
        mapped = {task_map.get(s, s if s in job_tasks else None) for s in strings} or {None}
        if len(mapped) > 1:
            raise InvalidArgument(f"episode {i} has tasks {list(strings)} that map to several job tasks {sorted(map(str, mapped))}",
                                  field="task", value=list(strings))
        task = mapped.pop()
        if only is not None:
            out.append(task if task in only else None)
            continue
        if task is None:
            bad = next(s for s in strings if task_map.get(s, s if s in job_tasks else None) is None) if strings else ""
            raise InvalidArgument(f"LeRobot task {bad!r} (episode {i}) is not one of the job's tasks {list(job_tasks)}; map it "
                                  f"with --task-map (YAML {{{bad!r}: <job task>}}) or pick tasks with --tasks", field="task",
                                  value=bad)
        out.append(task)
    return out


def exported_mapping(root: Path) -> FeatureMapping:
    """The import mapping ``fleetloop data export`` stored in ``root/meta/fleetloop.json``."""
    path = Path(root) / PROVENANCE
    data = json.loads(path.read_text()) if path.exists() else {}
    if not isinstance(data, Mapping) or "mapping" not in data:
        raise InvalidArgument(f"no --mapping given and {root} has no {PROVENANCE} mapping (only datasets exported by "
                              "fleetloop have one): write a mapping file", field="mapping", value=None)
    return FeatureMapping.from_dict(data["mapping"])


def output_format(observations: Sequence[TensorInfo]) -> str:
    """``fleetloop-demos/v1`` for exactly one float32 vector ``state``, else ``fleetloop-demos/v2``."""
    if len(observations) == 1:
        o = observations[0]
        if o.name == DEFAULT_OBS_NAME and o.dtype == "float32" and len(o.shape) == 1:
            return FORMAT
    return FORMAT_V2


def import_lerobot(path: str | Path, mapping: str | Path | FeatureMapping | None, job_spec: str | Path | JobSpec, out: str | Path,
                   tasks: Sequence[str] | None = None, task_map: str | Path | Mapping[str, str] | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """Import the LeRobotDataset at ``path`` into ``out`` (contract: the module docstring)."""
    spec = job_spec if isinstance(job_spec, JobSpec) else load_job_spec(job_spec)
    if mapping is None:
        fmap = exported_mapping(Path(path))
    else:
        fmap = mapping if isinstance(mapping, FeatureMapping) else FeatureMapping.load(mapping)
    tmap = dict(task_map) if isinstance(task_map, Mapping) else load_task_map(task_map)
    obs_specs, act_specs = spec.tensor_specs()
    observations = sorted((tensor_info(s) for s in obs_specs), key=lambda t: t.name)
    actions = sorted((tensor_info(s) for s in act_specs), key=lambda t: t.name)
    reader = LeRobotReader(Path(path))
    bound = fmap.bind(reader.features, observations, actions)
    targets = resolve_tasks(reader.episode_tasks(), spec.tasks, tmap, list(tasks) if tasks is not None else None)
    fmt = output_format(observations)
    act_dim = sum(a.size for a in actions)
    obs_arg: Any = observations[0].size if fmt == FORMAT else \
        [{"name": o.name, "dtype": o.dtype, "shape": list(o.shape)} for o in observations]
    writer = DemoWriter(Path(out), obs_arg, act_dim)
    counts = {t: 0 for t in spec.tasks}
    frames = skipped = 0
    bar = progress_bar(progress, len(reader), "import lerobot")
    try:
        for i, task in enumerate(targets):
            if task is None:
                skipped += 1
            else:
                ep = bound.convert(reader.episode(i, bound.feature_names))
                obs = ep.obs[observations[0].name] if fmt == FORMAT else ep.obs
                seed, outcome = ep.extra.get("fleetloop.seed"), ep.extra.get("fleetloop.outcome")
                outcome = "success" if outcome is None else outcome if outcome in OUTCOMES else "timeout"
                writer.add(DemoEpisode(uuid.uuid4().hex, task, obs, ep.actions, ep.rewards, ep.interventions, outcome,
                                       int(seed) if seed is not None else None))
                counts[task] += 1
                frames += len(ep.actions)
            if bar is not None:
                bar.update(bar.task_ids[0], advance=1)
    finally:
        if bar is not None:
            bar.stop()
    return {"out": str(out), "format": fmt, "episodes": sum(counts.values()), "frames": frames, "skipped": skipped,
            "tasks": {t: n for t, n in counts.items() if n}}
