"""``fleetloop actor`` (one stateless actor: a simulated robot or an LLM rollout server) and
``fleetloop demos record`` (scripted-expert demonstrations)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.cli.common import DEFAULT_TASKS


def _cmd_actor(args: argparse.Namespace) -> int:
    if args.kind == "llm":
        from actor.llm.main import main as llm_main
        return llm_main(args)
    from actor.main import main
    return main(args)


def _cmd_demos_record(args: argparse.Namespace) -> int:
    from actor.demos import record_demos
    counts = record_demos(args.tasks.split(","), args.episodes, Path(args.out), seed=args.seed, action_noise=args.noise,
                          max_episode_steps=args.max_steps)
    print(json.dumps(counts))
    return 0


def add_actor(sub: argparse._SubParsersAction) -> None:
    from actor.main import add_arguments
    ac = sub.add_parser("actor", help="run one stateless actor: a simulated robot, or (--kind llm) an LLM rollout server")
    add_arguments(ac)
    ac.set_defaults(func=_cmd_actor)


def add_demos(sub: argparse._SubParsersAction) -> None:
    dm = sub.add_parser("demos", help="offline demonstrations")
    dsub = dm.add_subparsers(dest="demos_cmd", required=True)
    rec = dsub.add_parser("record", help="record scripted-expert demonstrations into a dataset folder")
    rec.add_argument("--tasks", default=DEFAULT_TASKS)
    rec.add_argument("--episodes", type=int, default=2, help="successful episodes per task")
    rec.add_argument("--out", required=True)
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--noise", type=float, default=0.1, help="Gaussian noise on executed expert actions")
    rec.add_argument("--max-steps", type=int, default=200)
    rec.set_defaults(func=_cmd_demos_record)
