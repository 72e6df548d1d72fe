"""``fleetloop`` command line: the composition root.

Subcommands, one module per group: ``demo`` (the main job; ``demo llm``: GRPO with vLLM rollout
servers), ``eval``, ``experiment`` (:mod:`.harness`); ``learner``, ``pretrain`` (:mod:`.learner`);
``actor``, ``demos record`` (:mod:`.actor`); control plane: ``up``, ``api``, ``job ...``, ``certs
init``, ``admin create-key`` (:mod:`.control`); ``data import`` / ``data export`` (LeRobotDataset v3.0,
:mod:`.data`); ``policy export`` / ``policy keep`` (:mod:`.policy`). Other installed packages add subcommands through the
``fleetloop.cli`` entry point group: ``bench ingest`` / ``bench weights`` / ``bench load`` / ``bench
async`` / ... come from :func:`bench.cli.add_commands` that way (services never import bench).
"""

from __future__ import annotations

import argparse
import os
from importlib.metadata import entry_points

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")

from services.cli import actor, control, data, harness, learner, policy  # noqa: E402  (after the environment defaults)
from services.cli.common import DEFAULT_TASKS  # noqa: E402
from services.cli.learner import learner_config  # noqa: E402

__all__ = ["DEFAULT_TASKS", "PLUGIN_GROUP", "add_plugin_commands", "build_parser", "learner_config", "main"]

#: entry point group of subcommands from other packages: ``name = "module:add_commands"``, called with the
#: top-level subparsers (``[project.entry-points."fleetloop.cli"]`` in their pyproject)
PLUGIN_GROUP = "fleetloop.cli"


def add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Let every installed ``fleetloop.cli`` entry point add its subcommands (``bench``: bench.cli)."""
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        ep.load()(sub)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetloop", description="Fleet post-training: actors -> gRPC -> Ray learner -> weights -> actors.")
    sub = p.add_subparsers(dest="cmd", required=True)
    harness.add_demo(sub)
    learner.add_learner(sub)
    actor.add_actor(sub)
    actor.add_demos(sub)
    learner.add_pretrain(sub)
    harness.add_eval(sub)
    harness.add_experiment(sub)
    data.add_data(sub)
    policy.add_policy_commands(sub)
    add_plugin_commands(sub)
    control.add_control_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
