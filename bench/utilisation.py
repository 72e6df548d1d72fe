"""Learner utilisation and staleness: the real learner training while a fleet streams, vs the same learner with no fleet.

``fleetloop bench utilisation`` runs the real learner (``LearnerCore`` with HG-DAgger on the default
MLP policy, its gRPC server and training thread, in this process, CPU) under two synthetic fleets of
real actor processes (``FleetClient`` + ``EpisodeRecorder`` + spool + ``Sender``, swapping to each new
verified version between episodes, as robots do), both on the same job configuration:

- **(a) fast**: ``fast_actors`` actors recording as fast as their uplink allows, every step an
  operator correction: fresh trainable steps arrive at thousands per second (data suffices);
- **(b) slow**: ``slow_actors`` robots paced at ``slow_hz``, one step in three an operator
  correction (HG-DAgger trains on corrections only): tens of trainable steps per second, far fewer
  than the learner samples (``batch_size`` per update), starting from an empty buffer.

Per scenario, over a window that starts ``warmup_s`` after the fleet starts, read from the learner:

- **idle share**: time the training loop waited (``fleetloop_learner_idle_seconds_total``: no
  eligible data, ``min_online_steps`` not reached, or the ``max_updates_per_s`` gate) plus time the
  training thread waited for the ingest lock (the lock is wrapped by the bench to time it), over the
  window; also the share inside ``Algorithm.update`` (the maths) and the rest (sampling, batch
  assembly, staleness gate, publishing, waiting for the GIL);
- updates/s, samples/s (batch rows trained on), trainable steps arriving per second, the replay
  ratio (samples/s over trainable steps/s: how often a step is reused), versions published per s;
- the staleness histogram at training time: learner version minus behaviour version of every online
  sample the learner drew (``StalenessGate.at_training`` wrapped by the bench; kept and dropped).

Baselines (same run, same process, same replay data as scenario (a), no fleet): ``train_step`` in a
tight loop (the learner's own step: sample, gate, update, publish every K) and ``Algorithm.update``
alone on batches captured from those steps (the physical limit of the maths on this machine).
Goal: learner idle < 10% in (a). A cProfile of the training thread under (a) (a separate short run,
so the profiler's overhead does not touch the figures) shows where a learner step's time goes.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bench.common import (EPISODE_STEPS, JOB, TASK, Children, cpu_seconds, load_average, log_progress, machine_info,
                          quiet_fleetloop_logs, row)

TRAIN_THREAD = "fleetloop-train"


class UtilisationConfig(BaseModel):
    """Flags of ``fleetloop bench utilisation`` (validated; a bad value names the flag)."""

    model_config = ConfigDict(extra="forbid")

    fast_actors: int = Field(2, ge=1, le=64, description="Scenario (a): unpaced actors, every step a correction.")
    slow_actors: int = Field(4, ge=1, le=64, description="Scenario (b): robots paced at slow_hz, 1 step in 3 a correction.")
    slow_hz: float = Field(30.0, gt=0, le=1000, description="Scenario (b): steps per second per robot.")
    seconds: float = Field(20.0, gt=0, le=300, description="Measured window per scenario.")
    warmup_s: float = Field(3.0, ge=0, le=120, description="Fleet start -> window start.")
    baseline_seconds: float = Field(8.0, gt=0, le=120, description="Tight-loop baseline time (train_step; update alone gets half).")
    batch_size: int = Field(256, ge=1, le=65536, description="Samples per learner step (the learner default).")
    publish_every: int = Field(25, ge=1, description="Publish every K learner steps (the learner default).")
    min_online_steps: int = Field(1000, ge=0, description="The learner trains once this many online steps arrived.")
    profile_seconds: float = Field(8.0, ge=0, le=120, description="cProfile run of the training thread under (a); 0 = none.")


class Probe:
    """Bench-side instruments on one LearnerCore, through its public :class:`~learner.api.LearnerHooks`
    (installed before training starts): ingest-lock wait of the training thread, time and rows in
    ``Algorithm.update`` (and, on request, the batches it saw), staleness of online samples at
    training time."""

    def __init__(self) -> None:
        self.core = None  # set by start_training_learner once the learner is built
        self.lock_wait_s = 0.0
        self.update_s, self.updates, self.samples = 0.0, 0, 0
        self.capture: list | None = None
        self.staleness_kept: dict[int, int] = {}
        self.staleness_dropped: dict[int, int] = {}
        self.record_staleness = False

    def hooks(self, profiler=None):
        """The learner hooks feeding this probe; ``profiler`` (a cProfile.Profile) wraps the training loop."""
        from learner.api import LearnerHooks

        def profiled(loop):
            def profiled_loop():
                profiler.enable()
                try:
                    loop()
                finally:
                    profiler.disable()
            return profiled_loop

        return LearnerHooks(on_update=self._on_update, on_gate=self._on_gate, on_lock_wait=self._on_lock_wait,
                            wrap_training=profiled if profiler is not None else None)

    def _on_lock_wait(self, seconds: float) -> None:
        if threading.current_thread().name == TRAIN_THREAD:  # the training thread's waits, not a baseline's
            self.lock_wait_s += seconds

    def _on_update(self, batch, seconds: float) -> None:
        self.update_s += seconds
        self.updates += 1
        self.samples += len(batch)
        if self.capture is not None and len(self.capture) < 32:
            self.capture.append(batch)

    def _on_gate(self, version, versions, interventions, sources, result) -> None:
        if not self.record_staleness:
            return
        import numpy as np

        keep, _weights, staleness = result
        online = np.asarray(sources) == 0
        for mask, into in ((online & keep, self.staleness_kept), (online & ~keep, self.staleness_dropped)):
            vals, counts = np.unique(staleness[mask], return_counts=True)
            for v, c in zip(vals.tolist(), counts.tolist()):
                into[int(v)] = into.get(int(v), 0) + int(c)

    def snapshot(self) -> dict[str, float]:
        core, reg, labels = self.core, self.core.metrics.registry, {"job": JOB}
        return {"t": time.perf_counter(), "cpu_s": cpu_seconds(), "steps": float(core.step),
                "idle_s": reg.get_sample_value("fleetloop_learner_idle_seconds_total", labels) or 0.0,
                "lock_wait_s": self.lock_wait_s, "update_s": self.update_s, "updates": float(self.updates),
                "samples": float(self.samples), "ingested": float(core.ingestor.steps_total),
                "trainable_in": reg.get_sample_value("fleetloop_learner_intervention_steps_total",
                                                     {"job": JOB, "task": TASK}) or 0.0,
                "version": float(core.version)}


def start_training_learner(state_dir: Path, cfg: UtilisationConfig, profiler=None):
    """The real learner (``build_learner``: LearnerCore + gRPC server; the training thread is left to the
    caller) on a free loopback port, with a :class:`Probe` on its hooks (``profiler`` wraps the training
    loop); returns (learner process, probe)."""
    from learner.config import LearnerConfig
    from learner.process import build_learner

    lc = LearnerConfig(job_id=JOB, host="127.0.0.1", port=0, metrics_port=None, state_dir=state_dir, tasks=[TASK],
                       max_episode_steps=EPISODE_STEPS, min_online_steps=cfg.min_online_steps, max_updates_per_s=None,
                       batch_size=cfg.batch_size, publish_every=cfg.publish_every, checkpoint_every_s=1e6, device="cpu")
    probe = Probe()
    proc = build_learner(lc, hooks=probe.hooks(profiler)).serve(train=False)
    probe.core = proc.core
    return proc, probe


def _stop(proc) -> None:
    proc.stop(checkpoint=False, grace_s=1.0, wait_s=10.0, announce=False)


def _rates(a: dict[str, float], b: dict[str, float]) -> dict[str, Any]:
    dt = b["t"] - a["t"]
    d = {k: b[k] - a[k] for k in a}
    trainable = d["trainable_in"] / dt
    samples = d["samples"] / dt
    idle = (d["idle_s"] + d["lock_wait_s"]) / dt
    return {"window_s": dt, "updates_per_s": d["steps"] / dt, "samples_per_s": samples,
            "idle_share": idle, "idle_wait_share": d["idle_s"] / dt, "lock_wait_share": d["lock_wait_s"] / dt,
            "update_share": d["update_s"] / dt, "other_share": max(0.0, 1.0 - idle - d["update_s"] / dt),
            "steps_in_per_s": d["ingested"] / dt, "trainable_in_per_s": trainable,
            "replay_ratio": samples / trainable if trainable else None, "versions_per_s": d["version"] / dt,
            "process_cpu_util": d["cpu_s"] / dt, "update_ms": d["update_s"] / d["updates"] * 1e3 if d["updates"] else None}


def _fleet_cmds(cfg: UtilisationConfig, scenario: str, port: int, tmp: Path, seconds: float) -> list[dict[str, Any]]:
    fast = scenario == "fast"
    n = cfg.fast_actors if fast else cfg.slow_actors
    return [{"mode": "fleet", "target": f"127.0.0.1:{port}", "spool": str(tmp / f"spool-{scenario}-{i}-{time.time_ns()}"),
             "prefix": f"util-{scenario}", "hz": 0.0 if fast else cfg.slow_hz, "seconds": seconds, "base": time.time(),
             "chunk_steps": 50, "intervene": "all" if fast else "third", "swap": True, "stamp": False, "flush_s": 30.0}
            for i in range(n)]


def scenario(pool, cfg: UtilisationConfig, name: str, tmp: Path, profile: bool = False) -> dict[str, Any]:
    """Run one fleet scenario against a fresh learner; returns its figures (and the core for the baselines)."""
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    proc, probe = start_training_learner(tmp / f"learner-{name}{'-prof' if profile else ''}", cfg, profiler=prof)
    core, port = proc.core, proc.port
    core.start_training()
    window = cfg.profile_seconds if profile else cfg.seconds
    run_s = cfg.warmup_s + window + 1.0
    answer: dict[str, Any] = {}
    cmds = _fleet_cmds(cfg, "fast" if name == "fast" or profile else "slow", port, tmp, run_s)

    def run_fleet() -> None:
        try:
            answer["actors"] = pool.run(cmds, run_s + 180.0)
        except Exception as exc:  # re-raised in the bench's thread after the join
            answer["error"] = exc

    fleet = threading.Thread(target=run_fleet, name="bench-fleet", daemon=True)
    try:
        t_go = time.perf_counter()
        fleet.start()
        first_update = None
        while time.perf_counter() - t_go < cfg.warmup_s:
            if first_update is None and core.step > 0:
                first_update = time.perf_counter() - t_go
            time.sleep(0.01)
        probe.record_staleness = True
        a = probe.snapshot()
        while time.perf_counter() - t_go < cfg.warmup_s + window:
            if first_update is None and core.step > 0:
                first_update = time.perf_counter() - t_go
            time.sleep(0.01)
        b = probe.snapshot()
        probe.record_staleness = False
        fleet.join(run_s + 200.0)
        if "error" in answer:
            raise RuntimeError(f"scenario {name}: the fleet failed: {answer['error']!r}")
        if fleet.is_alive():
            raise TimeoutError(f"scenario {name}: the fleet did not finish within {run_s + 200.0:.0f} s")
        out = {"scenario": name, "rates": _rates(a, b), "first_update_after_s": first_update,
               "loadavg_1m_at_end": load_average(), "staleness_kept": dict(sorted(probe.staleness_kept.items())),
               "staleness_dropped": dict(sorted(probe.staleness_dropped.items())),
               "gate": core.gate.stats(), "final_version": core.version, "learner_steps": core.step,
               "actors": [{k: v for k, v in a.items() if k != "puts"} for a in answer.get("actors") or []]}
        if prof is not None:
            core.stop_training(30.0)
            out["profile"] = prof
        return out | {"_proc": proc, "_probe": probe}
    except BaseException:
        _stop(proc)
        raise


def baselines(core, probe: Probe, seconds: float) -> dict[str, Any]:
    """No fleet: ``train_step`` in a tight loop on scenario (a)'s replay, then ``Algorithm.update``
    alone on batches captured from those steps. Both run in a fresh thread, as the learner's
    training thread does: measured here, the same loop in the bench's main thread ran ~5x slower
    after the training thread had used torch (25 vs 123 steps/s), which would make the baseline lie."""
    core.stop_training(30.0)
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out.update(_tight_loops(core, probe, seconds))
        except Exception as exc:  # re-raised below
            out["error"] = exc

    worker = threading.Thread(target=run, name="fleetloop-bench-baseline", daemon=True)
    worker.start()
    worker.join(3 * seconds + 120.0)
    if "error" in out or worker.is_alive():
        raise RuntimeError(f"no-fleet baseline failed: {out.get('error', 'did not finish')!r}")
    return out


def _tight_loops(core, probe: Probe, seconds: float) -> dict[str, Any]:
    probe.capture = []
    for _ in range(20):  # warm-up
        core.train_step()
    n, t0 = 0, time.perf_counter()
    s0 = probe.samples
    while time.perf_counter() - t0 < seconds:
        core.train_step()
        n += 1
    dt = time.perf_counter() - t0
    loop = {"updates_per_s": n / dt, "samples_per_s": (probe.samples - s0) / dt, "seconds": dt}
    batches, probe.capture = probe.capture or [], None
    m, t0 = 0, time.perf_counter()
    while batches and time.perf_counter() - t0 < seconds / 2:
        core.algorithm.update(batches[m % len(batches)])
        m += 1
    dt = time.perf_counter() - t0
    pure = {"updates_per_s": m / dt, "samples_per_s": m * len(batches[0]) / dt if batches else None, "seconds": dt}
    return {"train_step_loop": loop, "update_only": pure}


def profile_top(prof, n: int = 15) -> tuple[float, list[list[Any]]]:
    """(total seconds, [[function, cumulative s, share of total], ...]) of a cProfile.Profile."""
    import pstats

    st = pstats.Stats(prof)
    total = max((v[3] for k, v in st.stats.items() if k[2] == "_loop"), default=st.total_tt) or st.total_tt
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][3], reverse=True)
    out = []
    for (fname, line, func), (cc, nc, tt, ct, callers) in rows:
        where = fname.split("/work/main/")[-1].split("site-packages/")[-1]
        out.append([f"{where}:{line}({func})", round(ct, 3), round(ct / total, 3) if total else None])
        if len(out) >= n:
            break
    return total, out


def run_utilisation(cfg: UtilisationConfig) -> dict[str, Any]:
    """Scenarios (a) and (b), the no-fleet baselines, and the profile; returns the result document."""
    import tempfile

    from bench.fleet_pool import READY_TIMEOUT_S, Pool

    t0 = time.monotonic()
    res: dict[str, Any] = {}
    with quiet_fleetloop_logs(), tempfile.TemporaryDirectory(prefix="fleetloop-bench-util-") as tmpdir, \
            Children() as children:
        tmp = Path(tmpdir)
        hard = READY_TIMEOUT_S + 3 * (cfg.warmup_s + cfg.seconds + 240) + cfg.profile_seconds + 2 * cfg.baseline_seconds
        pool = Pool(children, max(cfg.fast_actors, cfg.slow_actors), hard)
        try:
            log_progress(f"utilisation: (a) fast fleet, {cfg.fast_actors} unpaced actor(s), {cfg.seconds:g} s window")
            fast = scenario(pool, cfg, "fast", tmp)
            log_progress(f"utilisation: no-fleet baselines on (a)'s data, {cfg.baseline_seconds:g} s")
            try:
                fast["baselines"] = baselines(fast["_proc"].core, fast["_probe"], cfg.baseline_seconds)
            finally:
                _stop(fast.pop("_proc"))
                fast.pop("_probe")
            log_progress(f"utilisation: (b) slow fleet, {cfg.slow_actors} robot(s) at {cfg.slow_hz:g} Hz")
            slow = scenario(pool, cfg, "slow", tmp)
            _stop(slow.pop("_proc"))
            slow.pop("_probe")
            prof = None
            if cfg.profile_seconds > 0:
                log_progress(f"utilisation: cProfile of the training thread under (a), {cfg.profile_seconds:g} s")
                p = scenario(pool, cfg, "fast", tmp, profile=True)
                _stop(p.pop("_proc"))
                prof = profile_top(p["profile"])
                res["profiled_run"] = {k: v for k, v in p.items() if k not in ("profile", "_probe")}
        finally:
            pool.close()
    return _document(cfg, fast, slow, prof, time.monotonic() - t0, res)


def _document(cfg: UtilisationConfig, fast: dict, slow: dict, prof, wall: float, extra: dict) -> dict[str, Any]:
    base = fast["baselines"]
    loop, pure = base["train_step_loop"], base["update_only"]
    rows = []
    for tag, sc in (("(a) fast", fast), ("(b) slow", slow)):
        r = sc["rates"]
        k = cfg.fast_actors if sc is fast else cfg.slow_actors
        rows += [row(f"updates/s {tag}", "updates/s", k, r["updates_per_s"], pure["updates_per_s"], "higher",
                     "baseline: Algorithm.update alone on captured batches, no fleet"),
                 row(f"updates/s {tag} vs train_step loop", "updates/s", k, r["updates_per_s"], loop["updates_per_s"],
                     "higher", "baseline: LearnerCore.train_step in a tight loop, no fleet"),
                 row(f"samples/s {tag}", "samples/s", k, r["samples_per_s"], pure["samples_per_s"], "higher",
                     "baseline: Algorithm.update alone"),
                 row(f"busy share {tag}", "share", k, 1.0 - r["idle_share"], 1.0, "higher",
                     "1 - (loop waits + ingest-lock wait) / window; baseline: a loop that never waits")]
    rows.append(row("train_step loop vs update alone (no fleet)", "updates/s", 0, loop["updates_per_s"],
                    pure["updates_per_s"], "higher", "the learner step's own overhead: sampling, assembly, gate, publish"))
    fa = fast["rates"]
    goal = {"goal": "learner idle < 10% when data suffices (scenario a)", "target": 0.10, "measured": fa["idle_share"],
            "unit": "share", "met": fa["idle_share"] < 0.10, "limit": ""}
    if not goal["met"]:
        goal["limit"] = (f"idle {fa['idle_share']:.1%}: loop waits {fa['idle_wait_share']:.1%}, ingest-lock wait "
                         f"{fa['lock_wait_share']:.1%}; see the profile")
    notes = [
        f"(a): {fa['trainable_in_per_s']:,.0f} trainable steps/s in, {fa['samples_per_s']:,.0f} samples/s trained, replay "
        f"ratio {fa['replay_ratio'] or 0:.2f}; time split: update {fa['update_share']:.0%}, idle {fa['idle_share']:.1%}, "
        f"rest (sampling, assembly, gate, publishing, GIL) {fa['other_share']:.0%}",
        f"(b): {slow['rates']['trainable_in_per_s']:,.0f} trainable steps/s in, replay ratio "
        f"{slow['rates']['replay_ratio'] or 0:.0f}; first update {slow['first_update_after_s'] or float('nan'):.1f} s after "
        f"the fleet started (min_online_steps={cfg.min_online_steps}); idle {slow['rates']['idle_share']:.1%}",
        "updates/s under a fleet vs the no-fleet loop: both share 2 CPUs with the actor processes and gRPC ingest, so the "
        "ratio shows the CPU the fleet takes as much as anything in the learner",
        "idle = time the training loop slept (no eligible data / below min_online_steps / rate gate) + time it waited for "
        "the ingest lock; the learner never waits for fresh data once min_online_steps is reached: it re-samples its "
        "replay (the replay ratio says how often)",
    ]
    notes.append(_supply_note(fa))
    ks = sorted(set(fast["staleness_kept"]) | set(slow["staleness_kept"]))
    tot_f, tot_s = sum(fast["staleness_kept"].values()) or 1, sum(slow["staleness_kept"].values()) or 1
    plots = {"staleness_histogram": {"x": ks, "xlabel": "staleness at training (versions)", "ylabel": "share of online samples",
                                     "series": {"(a) fast": [fast["staleness_kept"].get(k, 0) / tot_f for k in ks],
                                                "(b) slow": [slow["staleness_kept"].get(k, 0) / tot_s for k in ks]}}}
    doc = {"bench": "utilisation", "machine": machine_info(), "config": cfg.model_dump() | {
               "algorithm": "hg_dagger (defaults: staleness bound 8, drop autonomous past it)", "policy": "mlp_policy (256, 256)",
               "device": "cpu", "task": TASK, "episode_steps": EPISODE_STEPS, "chunk_steps": 50},
           "command": _command(cfg), "wall_s": round(wall, 1), "rows": rows, "goals": [goal],
           "scenarios": {"fast": fast, "slow": slow}, "plots": plots, "notes": notes} | extra
    if prof is not None:
        doc["profile"] = {"what": f"cProfile of the training thread (LearnerCore._loop) during a separate {cfg.profile_seconds:g} s "
                                  f"run of scenario (a); cumulative seconds and share of the loop's time",
                          "total_s": round(prof[0], 3), "top": prof[1]}
    return doc


def _supply_note(fa: dict[str, Any]) -> str:
    """Whether scenario (a) really out-produced the learner (replay ratio < 1) on this run."""
    rr = fa["replay_ratio"] or 0.0
    if rr < 1.0:
        return (f"(a) out-produced the learner: {fa['trainable_in_per_s']:,.0f} trainable steps/s in vs "
                f"{fa['samples_per_s']:,.0f} samples/s trained (replay ratio {rr:.2f} < 1)")
    return (f"(a) did not strictly out-produce the learner on this run: {fa['trainable_in_per_s']:,.0f} trainable steps/s in "
            f"vs {fa['samples_per_s']:,.0f} samples/s trained (replay ratio {rr:.2f} >= 1): on 2 CPUs more unpaced actors "
            f"take CPU from the learner; data still sufficed (the buffer was past min_online_steps within "
            f"the warm-up, so the loop never waited for data)")


def _command(cfg: UtilisationConfig) -> str:
    return (f"fleetloop bench utilisation --fast-actors {cfg.fast_actors} --slow-actors {cfg.slow_actors} "
            f"--slow-hz {cfg.slow_hz:g} --seconds {cfg.seconds:g} --out F.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``fleetloop bench utilisation``."""
    from bench.runner import add_model_arguments

    add_model_arguments(p, UtilisationConfig)


def config_from_args(args: argparse.Namespace) -> UtilisationConfig:
    """The validated config (ValueError naming the flag and value)."""
    from bench.runner import model_from_args

    return model_from_args(UtilisationConfig, args)


def main(args: argparse.Namespace) -> int:
    """Run, write the JSON, print the table; 2 on a bad flag."""
    from bench.runner import run_reported

    return run_reported("utilisation", args, lambda a: (lambda cfg=config_from_args(a): run_utilisation(cfg)))
