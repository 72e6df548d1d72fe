"""``fleetloop data import`` / ``fleetloop data export``: datasets in and out of fleetloop (LeRobotDataset v3.0).

- ``fleetloop data import --format lerobot PATH [--mapping MAP.yaml] --job-spec JOB.yaml --out DIR
  [--tasks a,b] [--task-map TASKS.yaml] [--quiet]``: :func:`services.data.importer.import_lerobot`.
- ``fleetloop data export --format lerobot JOB OUT [--data-dir DIR] [--vcodec libx264] [--include-open]
  [--fps N] [--quiet]``:
  ``services.data.exporter.export_job``.

Each prints a one-line JSON summary on stdout (exit 0); a refusal prints ``error: ...`` on stderr
(exit 1). The progress bar (stderr) shows when stderr is a terminal, unless ``--quiet``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fleetloop.errors import FleetloopError


def _cmd_import(args: argparse.Namespace) -> int:
    from services.data.importer import import_lerobot

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    try:
        summary = import_lerobot(Path(args.path), Path(args.mapping) if args.mapping else None, Path(args.job_spec), Path(args.out), tasks=tasks,
                                 task_map=Path(args.task_map) if args.task_map else None,
                                 progress=sys.stderr.isatty() and not args.quiet)
    except FleetloopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary), flush=True)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from services.data.exporter import export_job

    try:
        summary = export_job(args.job, Path(args.out), Path(args.data_dir) if args.data_dir else None, args.vcodec,
                             include_open=args.include_open, fps=args.fps,
                             progress=sys.stderr.isatty() and not args.quiet)
    except FleetloopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, default=str), flush=True)
    return 0


def add_data(sub: argparse._SubParsersAction) -> None:
    """Register ``fleetloop data {import,export}``."""
    data = sub.add_parser("data", help="import and export datasets (LeRobotDataset v3.0)")
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    imp = dsub.add_parser("import", help="import a LeRobotDataset v3.0 as a fleetloop demo dataset (a job's offline_dataset)")
    imp.add_argument("--format", choices=["lerobot"], default="lerobot", help="source format")
    imp.add_argument("path", help="the LeRobotDataset folder (meta/info.json, data/, videos/)")
    imp.add_argument("--mapping", default=None, help="YAML: LeRobot feature per job tensor (observations, actions, ...); "
                     "default: the mapping a fleetloop export recorded in meta/fleetloop.json")
    imp.add_argument("--job-spec", required=True, help="the JobSpec (YAML/JSON) whose tensors and tasks the demos are for")
    imp.add_argument("--out", required=True, help="output folder (fleetloop-demos/v1 or v2; appended to when compatible)")
    imp.add_argument("--tasks", default=None, help="job task ids to import (comma-separated; other episodes are skipped)")
    imp.add_argument("--task-map", default=None, help="YAML {LeRobot task string: job task id}")
    imp.add_argument("--quiet", action="store_true", help="no progress bar")
    imp.set_defaults(func=_cmd_import)
    exp = dsub.add_parser("export", help="export a job's data as a LeRobotDataset v3.0")
    exp.add_argument("--format", choices=["lerobot"], default="lerobot", help="target format")
    exp.add_argument("job", help="job id")
    exp.add_argument("out", help="output folder (must not hold a dataset yet)")
    exp.add_argument("--data-dir", default=None, help="where the job's state lives (default: the local data dir)")
    exp.add_argument("--vcodec", default="libx264", help="video encoder for camera features (libx264, libsvtav1, mpeg4)")
    exp.add_argument("--include-open", action="store_true",
                     help="also export episodes whose end never arrived (outcome 'open'); default: skip and count them")
    exp.add_argument("--fps", type=int, default=None, help="frames per second to record (default 10: the robots' "
                     "control rate is not kept in a learner's state dir)")
    exp.add_argument("--quiet", action="store_true", help="no progress bar")
    exp.set_defaults(func=_cmd_export)
