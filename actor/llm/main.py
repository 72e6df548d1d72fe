"""``fleetloop actor --kind llm``: one LLM rollout server (a vLLM engine) for a GRPO job.

    fleetloop actor --kind llm --learner HOST:PORT --job J --token T [--engine inprocess|server]
                    [--minutes M] [--max-groups N] [--metrics-port P] [--spool DIR] [--tasks a,b]

The job's rollout settings (model recipe, tasks, group size, sampling, eta) come from the learner at
the handshake; flags only say how this server runs. SIGTERM / SIGINT finish the current turn,
flush the spool (bounded) and exit 0 (3 when groups were left unacknowledged in the spool; they
are resent by the next process on the same spool folder).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time

from fleetloop.logs import event, get_logger

log = get_logger("actor.llm.main")


def add_llm_arguments(p: argparse.ArgumentParser) -> None:
    """Flags only ``--kind llm`` uses (the shared ones are defined by :func:`actor.main.add_arguments`)."""
    g = p.add_argument_group("LLM actors (--kind llm)")
    g.add_argument("--engine", choices=["inprocess", "server"], default="inprocess",
                   help="vLLM in this process, or an OpenAI-compatible vLLM server subprocess it supervises")
    g.add_argument("--model-dir", default=None, help="Hugging Face folder to serve instead of the job's model recipe")
    g.add_argument("--model-cache", default=os.environ.get("FLEETLOOP_MODEL_CACHE", "/tmp/fleetloop-models"),
                   help="where the job's 'tiny' / 'smollm2' base model is built (or $FLEETLOOP_MODEL_CACHE)")
    g.add_argument("--rollouts", type=int, default=2, help="admission tickets asked per Admit (prompts per generate call)")
    g.add_argument("--max-groups", type=int, default=None, help="stop after this many groups")
    g.add_argument("--weight-timeout", type=float, default=120.0, help="seconds a live weight update may take")
    g.add_argument("--weight-wait", type=float, default=30.0,
                   help="seconds to wait for the admitted version's weights before generating on older ones")
    g.add_argument("--max-num-seqs", type=int, default=None, help="engine batch limit (default: the engine's)")


def main(args: argparse.Namespace) -> int:
    """Connect, run rollouts until the deadline / signal / job stop, flush the spool, exit."""
    from actor.llm.runtime import LlmActor, LlmActorOptions
    actor_id = args.actor_id or f"llm-{os.getpid()}"
    tasks = [t for t in (args.tasks or "").split(",") if t]
    opts = LlmActorOptions(learner=args.learner, job_id=args.job, actor_id=actor_id, credential=args.token,
                           spool_dir=args.spool, tasks=tasks, engine=args.engine, model_dir=args.model_dir,
                           model_cache_dir=args.model_cache, rollouts_per_admit=args.rollouts,
                           weight_timeout_s=args.weight_timeout, weight_wait_s=args.weight_wait,
                           max_num_seqs=args.max_num_seqs, seed=args.seed if args.seed is not None else os.getpid(),
                           tls_ca_file=args.tls_ca, tls_cert_file=args.tls_cert, tls_key_file=args.tls_key)
    actor = LlmActor(opts)
    if args.metrics_port is not None:
        event(log, "metrics", actor=actor_id, port=actor.metrics.serve(args.metrics_port, args.metrics_host))
    stop = threading.Event()
    actor.connect()  # retries until the learner answers; a signal here just ends the process (spool is on disk)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
    try:
        stats = actor.run(should_stop=stop.is_set, deadline=deadline, max_groups=args.max_groups)
        flushed = actor.flush(30.0)
    finally:
        actor.close(flush_timeout=0)
    # versions: JSON [[engine version, groups generated on it], ...] without quotes or spaces, so the value
    # stays one unquoted log token
    pairs = sorted([int(v), n] for v, n in stats.versions.items())
    event(log, "actor_done", job=args.job, actor=actor_id, version=actor.version, flushed=flushed,
          spooled=len(actor.spool), **{k: v for k, v in stats.as_dict().items() if k != "versions"},
          versions=json.dumps(pairs, separators=(",", ":")))
    return 0 if flushed else 3
