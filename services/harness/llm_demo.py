"""``fleetloop demo llm``: GRPO post-training of a small LLM by a fleet of vLLM rollout servers.

    fleetloop demo llm --minutes 12 --out runs/llm-demo            # SmolLM2-135M-Instruct, 2 servers
    fleetloop demo llm --tiny --out runs/llm-tiny                  # random tiny Llama, CI-sized

Runs one :func:`services.harness.llm_fleet.run_session` (an in-process LLM learner + ``servers`` rollout
server processes pinned to separate cores) for ``minutes`` after every engine is up, with a rich
progress bar, then writes ``OUT/report.json`` and ``OUT/reward.png`` (reward and accuracy per
learner step against wall time; learner and server versions on a second axis).

Presets (:data:`PRESETS`, every field overridable): ``smollm2`` is chosen so reward can rise
within ~10-15 minutes on a 2-core CPU: single-digit addition (``arith``, digits=1, ops='+'; the
base model is sometimes right), G=8, 2 groups per step (16 completions: a GRPO step on 135M
parameters takes a minute or more on this CPU), 24 new tokens at temperature 1.0 (top_p 1: exact
behaviour log-probs), AdamW lr 2e-5 (high for GRPO, so a handful of steps can show a change),
eta 1, one group per Admit (each server generates one group per call). Completions that run
out of tokens before ``Answer:`` are scored by the task's fallback (the last number in the text),
so brevity is part of what GRPO learns. ``format_credit`` stays 0 (off). ``tiny`` (``--tiny``) is
plumbing only: a random model never answers, reward stays 0 and GRPO skips its updates, while
versions still advance.

Report contract (``report.json``): ``kind``, ``command``, ``config`` (spec + learner config),
``machine``, ``timings``, ``summary`` (first/last reward and accuracy, means over the first and
last ``k`` steps, versions published, idle shares, admitted/blocked), ``steps`` (per learner step:
t, version, reward_mean, accuracy, staleness, loss, ...), ``timeline`` (about one sample a second:
learner version, each server's version, queue, admission counters), ``per_second`` (reward and
accuracy of the newest step at each whole second), ``staleness_histogram``, ``admission``,
``learner``, ``servers`` (idle shares, versions reached, groups by version, counters), ``versions``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fleetloop.logs import event, get_logger
from services.harness.llm_fleet import LlmSessionSpec, package_versions, run_session

log = get_logger("services.llm_demo")

#: Defaults per model (see the module docstring for why).
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2": {"model": "smollm2", "task": "arith", "task_params": {"digits": 1, "ops": "+"}, "group_size": 8,
                "batch_groups": 2, "max_new_tokens": 24, "temperature": 1.0, "lr": 2e-5, "rollouts_per_admit": 1},
    "tiny": {"model": "tiny", "task": "arith", "task_params": {"digits": 1, "ops": "+"}, "group_size": 4,
             "batch_groups": 2, "max_new_tokens": 8, "temperature": 1.0, "lr": 1e-3, "rollouts_per_admit": 1},
}


class LlmDemoOptions(BaseModel):
    """Options of ``fleetloop demo llm`` (None = the model preset's value)."""

    model_config = ConfigDict(extra="forbid")
    minutes: float = Field(12.0, gt=0, le=24 * 60, description="Length of the run after every engine is up.")
    out: Path = Field(Path("runs/llm-demo"), description="Output folder (report.json, reward.png, logs, learner state).")
    model: str = Field("smollm2", description="'smollm2', 'tiny' or a Hugging Face folder.")
    task: str = Field("arith", description="Built-in task (arith, reverse, sort, count).")
    task_params: dict[str, Any] | None = Field(None, description="Task parameters (None = preset).")
    servers: int = Field(2, ge=1, le=64, description="Rollout servers (one vLLM engine each).")
    eta: int = Field(1, ge=0, le=64, description="Max staleness in versions.")
    group_size: int | None = Field(None, ge=2, description="G (None = preset).")
    batch_groups: int | None = Field(None, ge=1, description="Groups per learner step (None = preset).")
    max_new_tokens: int | None = Field(None, ge=1, description="Tokens per completion (None = preset).")
    temperature: float | None = Field(None, gt=0, description="Sampling temperature (None = preset).")
    lr: float | None = Field(None, gt=0, description="Learning rate (None = preset).")
    seed: int = Field(0, description="Seed of the learner and the servers.")
    live: bool = Field(True, description="Rich progress bar (plain log lines when False or not a terminal).")

    def spec(self) -> LlmSessionSpec:
        preset = dict(PRESETS["tiny" if self.model == "tiny" else "smollm2"])
        preset["model"] = self.model
        if self.task != preset["task"]:
            preset["task"], preset["task_params"] = self.task, {}
        for name in ("task_params", "group_size", "batch_groups", "max_new_tokens", "temperature", "lr"):
            if getattr(self, name) is not None:
                preset[name] = getattr(self, name)
        return LlmSessionSpec(**preset, eta=self.eta, servers=self.servers, seed=self.seed, minutes=self.minutes)


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Headline figures of a session: reward/accuracy at the start and the end, versions, idle shares."""
    steps = [s for s in result["steps"] if s["reward_mean"] is not None]
    k = max(1, min(3, len(steps) // 3)) if steps else 0
    first, last = steps[:k], steps[-k:] if k else []
    r0, r1 = _mean([s["reward_mean"] for s in first]), _mean([s["reward_mean"] for s in last])
    return {
        "steps": len(result["steps"]), "k": k,
        "reward_first_k": r0, "reward_last_k": r1,
        "reward_delta": None if r0 is None or r1 is None else r1 - r0,
        "accuracy_first_k": _mean([s["accuracy"] for s in first]), "accuracy_last_k": _mean([s["accuracy"] for s in last]),
        "reward_max": max((s["reward_mean"] for s in steps), default=None),
        "versions_published": result["versions"]["published"],
        "server_versions": result["versions"]["servers"],
        "learner_idle_share": result["learner"]["idle_share"], "rollout_idle_share": result["rollout_idle_share"],
        "admitted": result["admission"]["admitted"], "blocked": result["admission"]["blocked"],
        "staleness_histogram": result["staleness_histogram"], "dropped_stale": result["dropped_stale"],
        "window_s": result["timings"]["window_s"],
    }


def per_second(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Reward and accuracy of the newest learner step at each whole second of the window."""
    steps = result["steps"]
    out, i, cur = [], 0, None
    for sec in range(int(result["timings"]["window_s"]) + 1):
        while i < len(steps) and steps[i]["t"] <= sec:
            cur = steps[i]
            i += 1
        out.append({"t": sec, "step": cur["step"] if cur else None, "version": cur["version"] if cur else None,
                    "reward_mean": cur["reward_mean"] if cur else None, "accuracy": cur["accuracy"] if cur else None})
    return out


def plot(report: dict[str, Any], path: Path) -> Path:
    """reward.png: reward and accuracy per learner step vs wall minutes; versions on the right axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s in report["steps"] if s["reward_mean"] is not None]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    t = [s["t"] / 60 for s in steps]
    ax.plot(t, [s["reward_mean"] for s in steps], "o-", color="tab:blue", label="mean reward (per step)")
    ax.plot(t, [s["accuracy"] for s in steps], "s--", color="tab:green", label="accuracy (per step)", alpha=0.8)
    ax.set_xlabel("wall minutes since all rollout servers were up")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax2 = ax.twinx()
    tl = report["timeline"]
    ax2.step([x["t"] / 60 for x in tl], [x["version"] for x in tl], where="post", color="black", alpha=0.6,
             label="learner version")
    for sid in sorted({k for x in tl for k in x["servers"]}):
        ax2.step([x["t"] / 60 for x in tl], [x["servers"].get(sid) if x["servers"].get(sid) is not None else float("nan")
                                             for x in tl], where="post", alpha=0.5, linestyle=":", label=f"{sid} version")
    ax2.set_ylabel("policy version")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    cfg = report["config"]["spec"]
    ax.set_title(f"fleetloop demo llm: {cfg['model']} on {cfg['task']} {cfg['task_params']}, G={cfg['group_size']}, "
                 f"{cfg['batch_groups']} groups/step, eta={cfg['eta']}, {cfg['servers']} servers", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class _Progress:
    """A rich progress bar over the window (plain log lines every 15 s when not live)."""

    def __init__(self, live: bool, total_s: float) -> None:
        self.live = live and sys.stderr.isatty()
        self.total_s, self.last_line = total_s, 0.0
        self.bar = self.task = None
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                TimeElapsedColumn(), transient=False)
            self.task = self.bar.add_task("starting", total=total_s, info="")
            self.bar.start()

    def phase(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=msg)
        else:
            print(f"[demo llm] {msg}", file=sys.stderr, flush=True)

    def tick(self, tick: dict[str, Any]) -> None:
        r, a = tick["reward_mean"], tick["accuracy"]
        info = (f"step {tick['step']} v{tick['version']} reward {'-' if r is None else f'{r:.2f}'} "
                f"acc {'-' if a is None else f'{a:.2f}'} servers "
                + ",".join(f"v{v}" for v in tick["servers"].values()) + f" queued {tick['queued']} "
                f"in-flight {tick['in_flight']} blocked {tick['blocked']}")
        if self.bar is not None:
            self.bar.update(self.task, completed=min(tick["t"], self.total_s), info=info)
        elif time.monotonic() - self.last_line >= 15:
            self.last_line = time.monotonic()
            print(f"[demo llm] t={tick['t']:.0f}s {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_llm_demo(opts: LlmDemoOptions, command: str = "fleetloop demo llm") -> dict[str, Any]:
    """Run the demo, write ``OUT/report.json`` and ``OUT/reward.png``; returns the report."""
    from services.harness.machine import load_average, machine_info
    spec = opts.spec()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    progress = _Progress(opts.live, opts.minutes * 60)
    try:
        result = run_session(spec, out, on_tick=progress.tick, on_phase=progress.phase)
    finally:
        progress.close()
    machine["loadavg_1m_at_end"] = load_average()
    machine["packages"].update(package_versions())
    report = {"kind": "llm-demo", "command": command, "config": {"spec": result["spec"],
                                                                  "learner": result["learner_config"]},
              "machine": machine, "timings": result["timings"], "stop_reason": result["stop_reason"],
              "summary": summarize(result), "steps": result["steps"], "timeline": result["timeline"],
              "per_second": per_second(result), "staleness_histogram": result["staleness_histogram"],
              "admission": result["admission"], "learner": result["learner"], "servers": result["servers"],
              "versions": result["versions"], "format_credit": spec.task_params.get("format_credit", 0.0)}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    plot(report, out / "reward.png")
    s = report["summary"]
    event(log, "demo_done", job="llm", version=s["versions_published"], steps=s["steps"], reward_first=s["reward_first_k"],
          reward_last=s["reward_last_k"], out=str(out))
    _print_summary(report)
    return report


def _print_summary(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    s = report["summary"]
    t = Table(title="fleetloop demo llm")
    t.add_column("figure")
    t.add_column("value", justify="right")
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    for k in ("steps", "reward_first_k", "reward_last_k", "reward_delta", "accuracy_first_k", "accuracy_last_k",
              "versions_published", "learner_idle_share", "rollout_idle_share", "admitted", "blocked", "dropped_stale",
              "window_s"):
        t.add_row(k, fmt(s[k]))
    t.add_row("staleness histogram", json.dumps(s["staleness_histogram"]))
    t.add_row("server versions (final/max)", json.dumps(s["server_versions"]))
    Console(stderr=True).print(t)
