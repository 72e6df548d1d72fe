"""The evaluation protocol: a frozen policy on fixed held-out seeds, no operator, never sent to a learner.

* :func:`evaluate_file` runs ``trials`` episodes per task (seeds fixed by :mod:`actor.evaluate`) on
  worker processes (one task each) and returns per task: success rate, mean episode length and
  throughput (episodes per hour at the robot's pace ``hz``, resets excluded).
* :func:`read_bundle` reads an export folder (``fleetloop policy export``: ``model.safetensors`` +
  ``fleetloop-policy.json``, sha256 verified): the weights file and the policy description (factory,
  kwargs, tasks, tensor specs) it carries, so a machine without the job's state evaluates it;
  :func:`policy_view` turns a description's specs into the simulated robot's observation options.
* :func:`resolve_weights` finds the weights to evaluate: a safetensors file, a version number in a
  job's state dir (``STATE/weights/v<N>.safetensors``, sha256 checked against the weight store's
  ``index.json``), or a learner checkpoint (``STATE/checkpoints`` or one ``ckpt-*`` folder: its
  policy tensors are written to a safetensors file).
* :class:`EvalPool` keeps evaluation worker processes alive across evaluations (imports paid once);
  :class:`PeriodicEvaluator` evaluates snapshots of the newest version during a run.

Evaluation workers hold no learner address and open no connection: their episodes cannot reach a
learner (the experiment harness also checks that the learner received exactly the robots' steps).
``guidance_beta`` (classifier-free guidance of an indicator-conditioned policy, RECAP) is passed to
the policy runner through the RunConfig's ``inference`` settings; unconditioned policies ignore it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fleetloop.logs import event, get_logger

log = get_logger("evaluation")
DEFAULT_FACTORY = "fleetloop.policies:mlp_policy"
POLICY_FILE = "policy.json"  # optional, in a learner state dir: {"policy_factory", "policy_kwargs", "tasks"}


def _run_config(tasks: list[str], policy_factory: str, policy_kwargs: dict, guidance_beta: float | None = None,
                max_steps: int = 200):
    from fleetloop import wire_settings
    inference = {} if guidance_beta is None else {"guidance_beta": float(guidance_beta)}
    return wire_settings.run_config(policy_factory=policy_factory, policy_kwargs=policy_kwargs, task_ids=tasks,
                                    max_episode_steps=max_steps, inference=inference)


def _worker_init(nice: int) -> None:
    import torch
    torch.set_num_threads(1)
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass


def _eval_one(path: str, all_tasks: list[str], task: str, trials: int, max_steps: int, policy_factory: str,
              policy_kwargs: dict, hz: float, guidance_beta: float | None = None, view: dict | None = None) -> dict:
    import torch

    torch.set_num_threads(1)
    from actor.evaluate import evaluate
    from actor.main import robot_specs
    from actor.policy_runner import PolicyRunner
    from fleetloop.client.weight_client import VerifiedWeights
    from fleetloop.weights import load_verified, sha256_hex

    blob = Path(path).read_bytes()
    digest = sha256_hex(blob)
    obs_specs, act_specs = robot_specs(**(view or {}))
    runner = PolicyRunner(_run_config(all_tasks, policy_factory, policy_kwargs, guidance_beta, max_steps), obs_specs, act_specs)
    runner.load(VerifiedWeights(-1, digest, load_verified(blob, digest), len(blob), 0.0, 0.0))
    return evaluate(runner, [task], trials, max_episode_steps=max_steps, hz=hz, view=view)[task]


class EvalPool:
    """Evaluation worker processes (spawned, ``nice``d, one torch thread each), reused across
    evaluations. ``submit`` returns one future per task. Close with :meth:`close` (or ``with``)."""

    def __init__(self, workers: int = 1, nice: int = 0) -> None:
        self.workers = max(1, int(workers))
        self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                         initializer=_worker_init, initargs=(int(nice),))

    def submit(self, path: Path, tasks: list[str], trials: int, *, max_steps: int = 200,
               policy_factory: str = DEFAULT_FACTORY, policy_kwargs: dict | None = None, hz: float = 30.0,
               guidance_beta: float | None = None, view: dict | None = None) -> dict[str, Future]:
        """Evaluate ``path`` on every task (one job per task); returns {task: future of the task's result}.
        ``view``: the robots' observation options (``observations``, ``cameras``, ``image_size``)."""
        return {t: self._pool.submit(_eval_one, str(path), list(tasks), t, int(trials), int(max_steps), policy_factory,
                                     dict(policy_kwargs or {}), float(hz), guidance_beta, view) for t in tasks}

    def evaluate(self, path: Path, tasks: list[str], trials: int, **kwargs: Any) -> dict[str, dict]:
        """Blocking :meth:`submit`: {task: result}."""
        futures = self.submit(path, tasks, trials, **kwargs)
        return {t: f.result() for t, f in futures.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "EvalPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def evaluate_file(path: Path, tasks: list[str], trials: int, workers: int = 2, max_steps: int = 200,
                  policy_factory: str = DEFAULT_FACTORY, policy_kwargs: dict | None = None,
                  hz: float = 30.0, guidance_beta: float | None = None, view: dict | None = None) -> dict[str, dict]:
    """Per-task success rate, mean length and episodes/hour of the policy in ``path`` (no operator)."""
    with EvalPool(min(workers, len(tasks))) as pool:
        return pool.evaluate(path, tasks, trials, max_steps=max_steps, policy_factory=policy_factory,
                             policy_kwargs=policy_kwargs, hz=hz, guidance_beta=guidance_beta, view=view)


def summarize(results: dict[str, dict]) -> dict[str, float]:
    """Means over tasks (each task weighs the same): success, episode length, episodes per hour."""
    n = max(1, len(results))
    return {"mean_success": sum(r["success_rate"] for r in results.values()) / n,
            "mean_episode_length": sum(r["mean_length"] for r in results.values()) / n,
            "mean_episodes_per_hour": sum(r["episodes_per_hour"] for r in results.values()) / n}


# -- which weights -----------------------------------------------------------------------------
def read_policy_file(state_dir: Path) -> dict[str, Any]:
    """The job's policy description saved beside its learner state (``policy.json``), or {}."""
    p = Path(state_dir) / POLICY_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def read_bundle(folder: Path) -> tuple[Path, dict[str, Any]]:
    """(weights file, policy description) of an export folder, after its sha256 checked out
    (IntegrityError naming ``model.safetensors`` otherwise); InvalidArgument for an LLM bundle."""
    from fleetloop.errors import InvalidArgument
    from fleetloop.policy_bundle import WEIGHTS_FILE, verify_bundle

    meta = verify_bundle(folder)
    if meta["kind"] != "robot":
        raise InvalidArgument(f"{folder} is an {meta['kind']} policy: it is evaluated by its own tasks, not on Meta-World",
                              field="weights", value=str(folder))
    return Path(folder) / WEIGHTS_FILE, meta


def policy_view(saved: dict[str, Any]) -> dict | None:
    """The simulated robot's observation options for a policy description with tensor specs (None:
    state, or no specs recorded); InvalidArgument when the specs are no simulated layout."""
    if not saved.get("observation_specs"):
        return None
    from fleetloop.policy_bundle import simulator_view
    return simulator_view(saved)


def _version_file(state_dir: Path, version: int) -> Path:
    from fleetloop.errors import IntegrityError, NotFound
    from fleetloop.weights import sha256_hex

    weights = Path(state_dir) / "weights"
    path = weights / f"v{version}.safetensors"
    if not path.is_file():
        have = sorted(int(p.stem[1:]) for p in weights.glob("v*.safetensors") if p.stem[1:].isdigit())
        raise NotFound(f"version {version} is not in {weights} (on disk: {have[:3]}...{have[-3:]})", field="version",
                       value=version)
    index = weights / "index.json"
    if index.is_file():
        known = {int(v["version"]): v["sha256"] for v in json.loads(index.read_text()).get("versions", [])}
        if version in known and sha256_hex(path.read_bytes()) != known[version]:
            raise IntegrityError(f"{path} does not match its sha256 in {index}", field="version", value=version)
    return path


def _checkpoint_file(checkpoint: Path, out_dir: Path) -> Path:
    from fleetloop.dataset import atomic_write
    from fleetloop.errors import NotFound
    from fleetloop.weights import state_dict_to_blob
    from learner.checkpoint import load_one, load_latest

    checkpoint = Path(checkpoint)
    if (checkpoint / "state.json").is_file():  # one ckpt-<step> folder
        step, state = int(checkpoint.name.split("-")[-1]), load_one(checkpoint)
    else:  # a checkpoints folder (or a state dir holding one): its newest intact checkpoint
        root = checkpoint / "checkpoints" if (checkpoint / "checkpoints").is_dir() else checkpoint
        found = load_latest(root)
        if found is None:
            raise NotFound(f"no intact checkpoint in {root}", field="checkpoint", value=str(checkpoint))
        step, state = found
    policy = state["algorithm"]["policy"]
    out = Path(out_dir) / f"checkpoint-step{step}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, state_dict_to_blob(policy, metadata={"fleetloop": "checkpoint", "step": str(step)}))
    return out


def resolve_weights(*, weights: Path | None = None, state_dir: Path | None = None, version: int | str | None = None,
                    checkpoint: Path | None = None, scratch: Path = Path("runs/eval")) -> Path:
    """The safetensors file to evaluate: exactly one of ``weights``; ``state_dir`` + ``version`` (an
    integer or ``latest``); ``checkpoint`` (its policy written under ``scratch``)."""
    from fleetloop.errors import InvalidArgument

    given = [weights is not None, version is not None, checkpoint is not None]
    if sum(given) != 1:
        raise InvalidArgument("give exactly one of --weights, --version (with --state-dir) or --checkpoint",
                              field="weights", value=str(given))
    if weights is not None:
        return Path(weights)
    if checkpoint is not None:
        return _checkpoint_file(Path(checkpoint), scratch)
    if state_dir is None:
        raise InvalidArgument("--version needs --state-dir (the job's learner state folder)", field="state_dir", value=None)
    if str(version) == "latest":
        have = [int(p.stem[1:]) for p in (Path(state_dir) / "weights").glob("v*.safetensors") if p.stem[1:].isdigit()]
        if not have:
            raise InvalidArgument(f"no versions in {state_dir}/weights", field="state_dir", value=str(state_dir))
        version = max(have)
    return _version_file(Path(state_dir), int(version))


# -- periodic evaluation during a run ---------------------------------------------------------------
@dataclass
class _Pending:
    t: float
    version: int
    context: dict[str, Any]
    futures: dict[str, Future]
    started: float


@dataclass
class PeriodicEvaluator:
    """Evaluates the newest published version every ``interval_s`` seconds of run time on an
    :class:`EvalPool`, one evaluation at a time, never blocking the run loop.

    ``snapshot()`` returns ``(version, blob)`` of the newest version; the blob is copied to
    ``snap_dir`` at snapshot time (so pruning in the weight store cannot remove it) and evaluated
    there. A version already evaluated is not run again: its result is repeated with ``reused``.
    Each finished evaluation appends a point to ``series``: ``t`` (run time of the snapshot),
    ``version``, ``mean``, ``tasks`` (success per task), ``trials``, ``eval_seconds`` and the
    ``context`` the caller gave at snapshot time (robot steps, interventions, learner step).

    ``deferred=True`` (the scaling protocol): :meth:`poll` only takes the snapshots (a file copy, no
    evaluation while robots and learner run, so evaluations never compete with them for CPU and the
    time resolution is ``interval_s`` however long an evaluation takes); :meth:`finish` evaluates them
    afterwards, in time order, searching for the first snapshot whose mean reaches ``target``:
    every ``coarse_stride``-th snapshot (and the last) until one reaches it, then the snapshots of the
    gap before that one, in order, up to the first that reaches it (with ``coarse_stride`` 1 this is
    every snapshot up to the first hit: time-to-target exact on the snapshot grid; a larger stride
    assumes no earlier gap holds a hit its coarse neighbours missed, and costs far fewer evaluations).
    After the hit only about ``curve_points_after`` evenly spaced snapshots plus the last are
    evaluated (the curve's shape). Snapshots not evaluated are counted in ``skipped``."""

    pool: EvalPool
    snapshot: Callable[[], tuple[int, bytes]]
    snap_dir: Path
    tasks: list[str]
    trials: int
    interval_s: float
    eval_kwargs: dict[str, Any] = field(default_factory=dict)
    series: list[dict[str, Any]] = field(default_factory=list)
    episodes: int = 0  # evaluation episodes run (never sent anywhere)
    deferred: bool = False
    target: float | None = None
    curve_points_after: int = 6
    coarse_stride: int = 1
    skipped: int = 0  # deferred snapshots not evaluated (between coarse points, or on the curve after the hit)
    _pending: _Pending | None = None
    _snapshots: list[tuple[float, int, dict[str, Any], Path]] = field(default_factory=list)
    _next_t: float = 0.0
    _done: dict[int, dict[str, Any]] = field(default_factory=dict)

    def known(self, version: int, results: dict[str, dict]) -> None:
        """Results of ``version`` obtained elsewhere (the start policy's protocol evaluation): reused."""
        self._done[int(version)] = results

    def poll(self, t: float, context: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Collect a finished evaluation, then start one when due. Returns the points added now."""
        added = self._collect()
        if self._pending is None and t >= self._next_t:
            self._start(t, context or {})
        return added

    def _start(self, t: float, context: dict[str, Any]) -> None:
        version, blob = self.snapshot()
        self._next_t = t + self.interval_s
        if version in self._done:
            point = self._add(t, version, context, self._done[version], reused=True, seconds=0.0)
            if self.deferred:
                point["deferred"] = True
            return
        self.snap_dir.mkdir(parents=True, exist_ok=True)
        path = self.snap_dir / f"v{version}.safetensors"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, path)
        if self.deferred:
            self._snapshots.append((t, version, dict(context), path))
            return
        self._pending = _Pending(t, version, context, self.pool.submit(path, self.tasks, self.trials, **self.eval_kwargs),
                                 time.monotonic())

    def _collect(self, wait: bool = False) -> list[dict[str, Any]]:
        p = self._pending
        if p is None or (not wait and not all(f.done() for f in p.futures.values())):
            return []
        self._pending = None
        results = {task: f.result() for task, f in p.futures.items()}
        self._done[p.version] = results
        self.episodes += sum(r["trials"] for r in results.values())
        return [self._add(p.t, p.version, p.context, results, reused=False, seconds=time.monotonic() - p.started)]

    def _add(self, t: float, version: int, context: dict[str, Any], results: dict[str, dict], reused: bool,
             seconds: float) -> dict[str, Any]:
        point = {"t": t, "version": version, "mean": summarize(results)["mean_success"],
                 "tasks": {k: r["success_rate"] for k, r in results.items()},
                 "trials": min((int(r["trials"]) for r in results.values()), default=0), "reused": reused,
                 "eval_seconds": seconds, **context}
        self.series.append(point)
        self.series.sort(key=lambda p: p["t"])
        event(log, "periodic_eval", version=version, t=round(t, 1), mean=round(point["mean"], 3), reused=reused)
        return point

    def finish(self, on_progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
        """Wait for the evaluation in flight (if any); deferred: evaluate the snapshots taken (see the
        class docstring; ``on_progress(evaluated, planned)`` after each). Returns the series."""
        self._collect(wait=True)
        snaps, self._snapshots = self._snapshots, []
        if not snaps:
            return self.series
        evaluated: dict[int, float] = {}  # snapshot index -> mean

        def run(i: int) -> bool:
            if i not in evaluated:
                t, version, context, path = snaps[i]
                if version in self._done:
                    point = self._add(t, version, context, self._done[version], reused=True, seconds=0.0)
                else:
                    self._pending = _Pending(t, version, context,
                                             self.pool.submit(path, self.tasks, self.trials, **self.eval_kwargs),
                                             time.monotonic())
                    point = self._collect(wait=True)[0]
                point["deferred"] = True
                evaluated[i] = point["mean"]
                if on_progress is not None:
                    on_progress(len(evaluated), len(snaps))
            return self.target is not None and evaluated[i] >= self.target

        last, stride = len(snaps) - 1, max(1, int(self.coarse_stride))
        hit = None
        for i in list(range(0, last + 1, stride)) + ([last] if last % stride else []):  # coarse scan to the first hit
            if run(i):
                hit = i
                break
        if hit is not None:
            for i in range(max(0, hit - stride + 1), hit):  # refine the gap before the coarse hit, in time order
                if run(i):
                    hit = i
                    break
            rest = list(range(hit + 1, last + 1))
            step = max(1, -(-len(rest) // max(1, self.curve_points_after)))
            for k, i in enumerate(rest):  # after the target: a sparse curve, evenly spaced, plus the last snapshot
                if (k + 1) % step == 0 or i == last:
                    run(i)
        self.skipped = len(snaps) - len(evaluated)
        return self.series
