"""Live terminal view of a running demo (rich), or plain log lines when not a terminal."""

from __future__ import annotations

import sys
import time

from services.harness.report import fleet_summary


def staleness_text(status: dict) -> str:
    """The staleness the bound applies to (autonomous frames) beside the bound, and separately the
    oldest operator correction trained on (expert labels are admitted at any age, so that number
    grows with the job and is not a violation)."""
    auto = status.get("staleness_max_autonomous", status.get("staleness_max", 0))
    return (f"staleness max {auto} (bound {status.get('staleness_bound')}; "
            f"corrections, admitted at any age: max {status.get('staleness_max', 0)})")


class LiveView:
    """Per task: episodes, success and no-intervention success over the last 50 episodes,
    intervention share; header: policy version, learner step, staleness, ingest rate, robots."""

    def __init__(self, tasks: list[str], duration_s: float, live: bool = True) -> None:
        self.tasks, self.duration = tasks, duration_s
        self.live = live and sys.stdout.isatty()
        self._live = None
        self._last_print = 0.0
        self._last_steps = (time.time(), 0)
        self.rate = 0.0

    def __enter__(self) -> "LiveView":
        if self.live:
            from rich.live import Live
            self._live = Live(refresh_per_second=2)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def update(self, status: dict, episodes: list[dict], elapsed: float, robots_running: int) -> None:
        now = time.time()
        t_prev, s_prev = self._last_steps
        steps = status.get("ingested_steps", 0)
        if now > t_prev:
            self.rate = (steps - s_prev) / (now - t_prev)
        self._last_steps = (now, steps)
        header = (f"elapsed {elapsed / 60:5.1f}/{self.duration / 60:.1f} min | policy v{status['version']} "
                  f"(step {status['step']}) | {staleness_text(status)} | "
                  f"ingest {self.rate:7.0f} steps/s | robots {robots_running}")
        rows = [(t, fleet_summary(episodes, t)) for t in self.tasks]
        if self._live is not None:
            from rich.table import Table
            table = Table(title=header, title_justify="left")
            for col in ("task", "episodes", "success (last 50)", "no-intervention success", "intervention share (last 50)"):
                table.add_column(col, justify="right")
            for task, s in rows:
                table.add_row(task, str(s["episodes"]), f"{s['fleet_success_last50']:.2f}", f"{s['autonomous_success_last50']:.2f}",
                              f"{s['intervention_share_last50']:.2f}")
            self._live.update(table)
        elif now - self._last_print >= 15:
            self._last_print = now
            print(header + " | " + " ".join(f"{t}: n={s['episodes']} auto={s['autonomous_success_last50']:.2f} "
                                            f"int={s['intervention_share_last50']:.2f}" for t, s in rows), flush=True)
