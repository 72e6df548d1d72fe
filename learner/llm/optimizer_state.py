"""Optimizer state of the LLM learner: checkpointed beside the weights, restored on restart.

Files: ``STATE_DIR/llm/optimizer/ckpt-<learner step>/`` in :mod:`learner.checkpoint` format (safetensors +
JSON, atomic, a torn one is skipped for the previous one), the newest :data:`OPTIMIZER_KEEP` kept. A
checkpoint holds the optimizer's ``state_dict`` (AdamW: ``exp_avg`` and ``exp_avg_sq`` per parameter, 2x the
trainable parameters in float32), the optimizer step counter (``algorithm.step``, which also seeds GRPO's
minibatch shuffling), the learner step and the version it was taken at. The policy weights are not in it:
they are the newest published version.

When it is written and what it costs: :class:`OptimizerCheckpointer`. Restoring
(:func:`restore_optimizer`) checks the algorithm, the parameter count and every moment's shape,
re-applies the current config's ``lr`` / ``betas`` / ``weight_decay`` (a config change takes effect) and
restores the optimizer step counter; any problem (missing, torn, corrupt, another model, newer than the
weights) logs ``optimizer_fresh`` with the reason and leaves a fresh optimizer: it never stops the learner.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from fleetloop.logs import event, get_logger

log = get_logger("learner.llm.optimizer_state")

#: Optimizer checkpoints kept (the newest two: one may be torn by a crash mid-write).
OPTIMIZER_KEEP = 2


def optimizer_state(algorithm, learner_step: int, version: int, snapshot: bool) -> dict[str, Any]:
    """What an optimizer checkpoint holds: the optimizer's state_dict (tensors cloned to the CPU when
    ``snapshot``, so training may go on while it is written), the optimizer step counter and the learner step."""
    import torch
    sd = algorithm.optimizer.state_dict()
    if snapshot:
        sd = {"state": {k: {n: (v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v)
                            for n, v in st.items()} for k, st in sd["state"].items()},
              "param_groups": [dict(g, params=list(g["params"])) for g in sd["param_groups"]]}
    return {"format": 1, "algorithm": algorithm.name, "learner_step": int(learner_step), "version": int(version),
            "algorithm_step": int(algorithm.step), "optimizer": sd}


class OptimizerCheckpointer:
    """Writes the optimizer state to ``root`` (:mod:`learner.checkpoint` format, newest :data:`OPTIMIZER_KEEP` kept).

    :meth:`maybe_save` (the training thread, after a published step, under the training lock): when the
    optimizer took a step since the last save and ``every_s`` seconds passed, snapshot the state (a CPU copy:
    2x the trainable parameters in float32, 1-2 s per GB on this machine) and write it in a background thread (one at a
    time; a save that is due while one is writing waits for the next step), so training does not wait for the
    serialise + sha256 + fsync (~100 MiB/s on this machine: ~11 s for SmolLM2-135M's 1.1 GB). :meth:`save_now`
    writes synchronously (checkpoint, clean stop). A failed write is logged and retried when next due.
    """

    def __init__(self, root: Path, algorithm, every_s: float) -> None:
        self.root = Path(root)
        self.algorithm = algorithm
        self.every_s = float(every_s)
        self._thread: threading.Thread | None = None
        self._saved_step = algorithm.step        # optimizer steps of the newest snapshot
        self._saved_at = time.monotonic()
        self.saves = 0
        self.failures = 0
        self.last_seconds: float | None = None

    def maybe_save(self, learner_step: int, version: int) -> bool:
        """Start a background save if one is due (see the class docstring). True when one was started."""
        if self.algorithm.step == self._saved_step or time.monotonic() - self._saved_at < self.every_s:
            return False
        if self._thread is not None and self._thread.is_alive():
            return False
        state = optimizer_state(self.algorithm, learner_step, version, snapshot=True)
        self._saved_step, self._saved_at = self.algorithm.step, time.monotonic()
        self._thread = threading.Thread(target=self._write, args=(state,), name="fleetloop-llm-optimizer-ckpt",
                                        daemon=True)
        self._thread.start()
        return True

    def save_now(self, learner_step: int, version: int, force: bool = False) -> Path | None:
        """Wait for a background save, then write the current state (if it changed, or ``force``); the caller
        holds the training lock. Returns the checkpoint folder, None when nothing was written."""
        self.wait()
        if not force and self.algorithm.step == self._saved_step:
            return None
        self._saved_step, self._saved_at = self.algorithm.step, time.monotonic()
        return self._write(optimizer_state(self.algorithm, learner_step, version, snapshot=False))

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the background save in flight (if any)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _write(self, state: dict[str, Any]) -> Path | None:
        from learner.checkpoint import save_checkpoint
        t0 = time.perf_counter()
        try:
            path = save_checkpoint(self.root, state["learner_step"], state, keep=OPTIMIZER_KEEP)
        except Exception as exc:
            self.failures += 1
            self._saved_step = -1  # retried when next due
            event(log, "optimizer_checkpoint_failed", level=30, step=state["learner_step"], error=repr(exc)[:300])
            return None
        self.saves += 1
        self.last_seconds = time.perf_counter() - t0
        event(log, "optimizer_checkpointed", step=state["learner_step"], version=state["version"],
              optimizer_steps=state["algorithm_step"], seconds=self.last_seconds, path=str(path))
        return path

    def stats(self) -> dict[str, Any]:
        return {"every_s": self.every_s, "saves": self.saves, "failures": self.failures,
                "last_seconds": self.last_seconds, "writing": self._thread is not None and self._thread.is_alive()}


def _check_fits(optimizer, saved: dict[str, Any]) -> None:
    """ValueError naming what differs when ``saved`` (an optimizer state_dict) is not for ``optimizer``'s params."""
    groups, saved_groups = optimizer.param_groups, saved.get("param_groups", [])
    if len(groups) != len(saved_groups):
        raise ValueError(f"param_groups: {len(saved_groups)} saved, {len(groups)} in the optimizer")
    state = saved.get("state", {})
    for g, sg in zip(groups, saved_groups):
        if len(g["params"]) != len(sg["params"]):
            raise ValueError(f"param_groups.params: {len(sg['params'])} saved, {len(g['params'])} in the model")
        for p, pid in zip(g["params"], sg["params"]):
            for name, value in state.get(pid, {}).items():
                if hasattr(value, "shape") and value.dim() > 0 and tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"state[{pid}].{name} has shape {tuple(value.shape)}, the parameter "
                                     f"{tuple(p.shape)}")


def restore_optimizer(root: Path, algorithm, latest_step: int) -> dict[str, Any]:
    """Load the newest intact optimizer checkpoint at or below ``latest_step`` into ``algorithm`` (see the module
    docstring). Returns ``{"restored": bool, "step", "behind_steps", "reason"}``; never raises."""
    from learner.checkpoint import load_latest
    try:
        found = load_latest(Path(root))
    except Exception as exc:
        found, reason = None, f"unreadable: {exc!r}"[:300]
    else:
        reason = "no intact optimizer checkpoint"
    if found is not None:
        step, state = found
        try:
            if state.get("algorithm") != algorithm.name:
                raise ValueError(f"algorithm {state.get('algorithm')!r} is not {algorithm.name!r}")
            if int(state["learner_step"]) > latest_step:
                raise ValueError(f"learner_step {state['learner_step']} is newer than the published weights' "
                                 f"{latest_step}")
            saved = state["optimizer"]
            _check_fits(algorithm.optimizer, saved)
            algorithm.optimizer.load_state_dict(saved)
            c = algorithm.config
            for g in algorithm.optimizer.param_groups:  # the current config's hyperparameters win
                g["lr"], g["betas"], g["weight_decay"] = c.lr, tuple(c.betas), c.weight_decay
            algorithm.step = int(state["algorithm_step"])
            saved_step = int(state["learner_step"])
            return {"restored": True, "step": saved_step, "behind_steps": latest_step - saved_step, "reason": "ok"}
        except Exception as exc:
            algorithm.optimizer = algorithm.make_optimizer()
            reason = f"checkpoint {step} unusable: {exc!r}"[:300]
    if latest_step > 0 or reason != "no intact optimizer checkpoint":
        event(log, "optimizer_fresh", level=30, root=str(root), learner_step=latest_step, reason=reason,
              action="training continues from the newest weights with a fresh optimizer")
    return {"restored": False, "step": None, "behind_steps": None, "reason": reason}
