"""``python -m tests.chaos.learner_process --config CFG.json --final FINAL.json``

The learner's Ray-actor body (:func:`learner.process.build_learner`: LearnerCore, gRPC
server, training thread, control agent when configured) in a plain process, so a chaos test can
SIGKILL exactly the process that holds the learner's state, and restart it in seconds without a
Ray cluster around it (``RayLearner`` serves the same ``LearnerProcess`` under ``ray.remote``).

Prints ``LEARNER_READY {"port", "pid", "version", "step", ...}`` once serving. On SIGTERM it stops
the way ``fleetloop learner`` does (final checkpoint, log closed) and writes FINAL.json: the status,
the exactly-once audit, the online buffers' contents (per task and episode id, the stored step
indices and their behaviour versions) and the learner's Prometheus samples.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path


def buffer_contents(core) -> dict:
    """{task: {episode_id: {"steps": [...], "versions": [...]}}} of the online buffers."""
    names = {v: episode for (_actor, episode), v in core.ingestor.episode_keys().items()}
    out: dict = {}
    with core.ingestor.lock:
        for task in core.cfg.tasks:
            arr = core.replay.export(task, "online")
            per: dict = {}
            for key, step, version in zip(arr["episode_keys"].tolist(), arr["steps"].tolist(), arr["versions"].tolist()):
                rec = per.setdefault(names.get(int(key), f"?{key}"), {"steps": [], "versions": []})
                rec["steps"].append(int(step))
                rec["versions"].append(int(version))
            out[task] = per
    return out


def metric_samples(core) -> list[dict]:
    """Every sample of the learner's registry as {name, labels, value}."""
    rows = []
    for family in core.metrics.registry.collect():
        for s in family.samples:
            rows.append({"name": s.name, "labels": dict(s.labels), "value": float(s.value)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="LearnerConfig as JSON")
    p.add_argument("--final", required=True, help="where to write the final report at SIGTERM")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from learner.process import build_learner

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    impl = build_learner(Path(args.config).read_text()).serve()
    core = impl.core
    print("LEARNER_READY " + json.dumps({"port": impl.port, "pid": os.getpid(), "metrics_port": impl.metrics_port,
                                         "version": core.version, "step": core.step,
                                         "replayed_steps": core.ingestor.steps_total,
                                         "restored": core.restored}), flush=True)
    stop.wait()
    status = impl.stop()
    final = {"status": status, "audit": core.audit(), "buffer": buffer_contents(core), "metrics": metric_samples(core),
             "versions": [{"version": v.version, "sha256": v.sha256, "step": v.learner_step} for v in core.weights.versions()]}
    tmp = Path(args.final).with_suffix(".tmp")
    tmp.write_text(json.dumps(final, default=str))
    os.replace(tmp, args.final)
    print("LEARNER_STOPPED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
