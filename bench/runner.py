"""The one way every bench's ``main`` runs: check the
arguments (exit code 2 on a bad one, naming it), run with SIGTERM as SystemExit, write the JSON, print
the table (:func:`run_reported`)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any, Callable

from bench.common import log_progress, print_table, write_json


def add_model_arguments(p: argparse.ArgumentParser, model) -> None:
    """One ``--flag-name`` per field of the pydantic ``model`` (type and default from the field, help
    from its description), plus ``--out``."""
    for name, field in model.model_fields.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(field.default), default=field.default,
                       help=field.description)
    p.add_argument("--out", required=True, help="result JSON path")


def model_from_args(model, args: argparse.Namespace):
    """``model`` validated from the flags in ``args``; ValueError naming the flag and value when one is bad."""
    from pydantic import ValidationError

    try:
        return model(**{k: getattr(args, k) for k in model.model_fields if hasattr(args, k)})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"--{str(err['loc'][0]).replace('_', '-')} {err.get('input')!r}: {err['msg']}") from None


def _with_sigterm_as_exit(job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``job`` with SIGTERM raising SystemExit, so the benches' cleanup (children stopped by pid,
    servers stopped, temp folders removed) also runs when the bench is terminated."""
    if threading.current_thread() is not threading.main_thread():
        return job()

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, _exit)
    try:
        return job()
    finally:
        signal.signal(signal.SIGTERM, old)


def run_reported(name: str, args: argparse.Namespace, plan_fn: Callable[[argparse.Namespace], Callable[[], dict[str, Any]]],
                 table: Callable[[dict[str, Any]], None] = print_table) -> int:
    """``fleetloop bench NAME``: ``plan_fn(args)`` checks the arguments (ValueError naming the bad one:
    printed, exit code 2, nothing written) and returns the run; the run goes under
    :func:`_with_sigterm_as_exit`; its result is written to ``args.out`` first (a table that fails to
    print must not lose a measurement), then printed with ``table``. Returns 0."""
    try:
        job = plan_fn(args)
    except ValueError as exc:
        print(f"fleetloop bench {name}: {exc}", file=sys.stderr)
        return 2
    result = _with_sigterm_as_exit(job)
    path = write_json(result, args.out)
    table(result)
    log_progress(f"wrote {path}")
    return 0

