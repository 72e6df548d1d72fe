"""``fleetloop learner`` (a learner on Ray until signalled) and ``fleetloop pretrain`` (behaviour cloning)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from services.cli.common import DEFAULT_TASKS


def learner_config(args: argparse.Namespace) -> Any:
    """The learner config of ``fleetloop learner``: :func:`learner.settings.load_learner_config` over the
    ``--config`` file (its ``kind`` picks the model: "llm" an :class:`~learner.llm.config.LlmLearnerConfig`,
    a GRPO job on LLM rollouts; anything else a robot :class:`~learner.config.LearnerConfig`), the
    ``FLEETLOOP_LEARNER_*`` environment (deployments, secrets) and the flags; precedence flags >
    environment > file. Bad values raise InvalidArgument naming the file (or variable) and the field."""
    from learner.settings import load_learner_config

    serving = {k: v for k, v in {"port": args.port, "host": args.host, "metrics_port": args.metrics_port}.items()
               if v is not None}
    flags: dict[str, Any] = {"serving": serving} if serving else {}
    if args.state_dir is not None:
        flags["state_dir"] = args.state_dir
    return load_learner_config(Path(args.config) if args.config else None, flags)


def _cmd_learner(args: argparse.Namespace) -> int:
    import signal
    import threading

    from learner.ray_learner import start_learner

    cfg = learner_config(args)
    handle = start_learner(cfg, ray_address=args.ray_address)
    print(json.dumps({"target": handle.target, "metrics_port": handle.metrics_port, "job": cfg.job_id}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    print(json.dumps(handle.stop(), default=str)[:2000], flush=True)
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from learner.pretrain import pretrain
    factory = {"policy_factory": "fleetloop.policies:recap_mlp_policy"} if args.algorithm == "recap" else {}
    info = pretrain(Path(args.dataset), args.tasks.split(","), Path(args.out), steps=args.steps, seed=args.seed,
                    algorithm=args.algorithm, **factory)
    print(json.dumps(info))
    return 0


def add_learner(sub: argparse._SubParsersAction) -> None:
    lr = sub.add_parser("learner", help="run a learner (gRPC server + training) on Ray until signalled")
    lr.add_argument("--config", default=None, help="TOML/YAML/JSON LearnerConfig file")
    lr.add_argument("--ray-address", default=None, help="existing Ray cluster (default: start Ray locally)")
    lr.add_argument("--host", default=None)
    lr.add_argument("--port", type=int, default=None)
    lr.add_argument("--metrics-port", type=int, default=None)
    lr.add_argument("--state-dir", default=None)
    lr.set_defaults(func=_cmd_learner)


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    pt = sub.add_parser("pretrain", help="behaviour-clone the initial policy from a demo dataset")
    pt.add_argument("--dataset", required=True)
    pt.add_argument("--tasks", default=DEFAULT_TASKS)
    pt.add_argument("--out", required=True, help="output safetensors file")
    pt.add_argument("--steps", type=int, default=3000)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--algorithm", choices=["hg_dagger", "recap"], default="hg_dagger",
                    help="recap: also pretrain the value function (OUT.value.safetensors) and the indicator-conditioned policy")
    pt.set_defaults(func=_cmd_pretrain)
