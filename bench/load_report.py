"""The report of ``fleetloop bench load``: phase summaries, the comparison rows, the verdict and the table.

Pure functions of what :func:`bench.load.run_phase` collected (the actors' results and the server
samples): :func:`summarize` turns one phase into its figures (errors by RPC and code, ack latency
percentiles and windows, ingest rates at the actors and the server, server RSS and CPU, and for the
learner phase the counter deltas and the exactly-once check), :func:`comparison_rows` and
:func:`load_verdict` compare and judge the two phases, :func:`print_load_table` prints them. Rates
and latency percentiles exclude the first ``warmup_s``; errors count over the whole phase.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from bench.common import _fmt as _fmt_float
from bench.common import row
from bench.load_stats import counter_delta, latency_summary, latency_windows, rss_summary

if TYPE_CHECKING:
    from bench.load import LoadConfig

L = "fleetloop_learner_"


def summarize(cfg: LoadConfig, phase: dict[str, Any], warmup_s: float, server_final: dict | None) -> dict[str, Any]:
    """Every figure of one phase (see :mod:`bench.load`'s docstring)."""
    res, samples = phase["results"], phase["samples"]
    t_go, t_stop = phase["t_go"], phase["t_stop"]
    t0 = t_go + warmup_s
    window = t_stop - t0
    counters = {k: sum(r["counters"][k] for r in res) for k in res[0]["counters"]}
    counters["max_backlog"] = max(r["counters"]["max_backlog"] for r in res)
    errors: dict[str, int] = {}
    details: dict[str, str] = {}
    for r in res:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, v in r.get("error_details", {}).items():
            details.setdefault(k, v)
    by_code: dict[str, int] = {}
    for k, v in errors.items():
        by_code[k.split(":", 1)[1]] = by_code.get(k.split(":", 1)[1], 0) + v
    t_ack = np.concatenate([np.frombuffer(r["ack_time"], "d") for r in res])
    lat = np.concatenate([np.frombuffer(r["latency"], "d") for r in res])
    in_window = (t_ack >= t0) & (t_ack <= t_stop)
    steps_per_chunk = counters["acked_steps"] / counters["acked"] if counters["acked"] else None
    out: dict[str, Any] = {
        "actors_connected": phase["connected"], "processes": phase["plans"], "seconds": round(t_stop - t_go, 3),
        "window_s": round(window, 3), "warmup_s": warmup_s, "counters": counters,
        "errors_total": sum(errors.values()), "errors_by_rpc_code": errors, "errors_by_code": by_code,
        "error_examples": details,
        "ack_latency": latency_summary(lat[in_window]), "ack_latency_all": latency_summary(lat),
        "ack_latency_windows": latency_windows(t_ack, lat, t_go, t_stop, max(5.0, (t_stop - t_go) / 30)),
        "actors_chunks_per_s": int(in_window.sum()) / window if window > 0 else None,
        "actors_steps_per_s": int(in_window.sum()) * steps_per_chunk / window if window > 0 and steps_per_chunk else None,
        "mean_steps_per_chunk": steps_per_chunk,
        "mean_bytes_per_chunk": counters["written_bytes"] / counters["written"] if counters["written"] else None,
        "intervention_share": float(np.mean([r["intervention_share"] for r in res])),
        "load_process_cpu_s": sum(r["cpu_s"] for r in res),
        "rss": rss_summary(samples, t_go, t_stop),
        "rss_series": [{"t_s": round(s["t"] - t_go, 2), "rss_mb": s["rss_mb"]} for s in samples if s["rss_mb"] is not None],
    }
    cpu = [(s["t"], s["cpu_s"]) for s in samples if s.get("cpu_s") is not None and t0 <= s["t"] <= t_stop]
    names = ((f"{L}ingested_steps_total", f"{L}ingested_chunks_total", f"{L}ingested_bytes_total")
             if phase["mode"] == "learner" else (None, "fleetloop_bench_raw_messages_total", "fleetloop_bench_raw_bytes_total"))
    chunks = counter_delta(samples, names[1], t0, t_stop)
    steps = counter_delta(samples, names[0], t0, t_stop) if names[0] else None
    nbytes = counter_delta(samples, names[2], t0, t_stop)
    out["server_chunks_per_s"] = chunks[0] / chunks[1] if chunks and chunks[1] > 0 else None
    out["server_steps_per_s"] = (steps[0] / steps[1] if steps and steps[1] > 0 else
                                 (out["server_chunks_per_s"] * steps_per_chunk if out["server_chunks_per_s"] and steps_per_chunk and not names[0] else None))
    out["server_mb_per_s"] = nbytes[0] / nbytes[1] / 1e6 if nbytes and nbytes[1] > 0 else None
    if len(cpu) >= 2 and chunks and chunks[0] > 0:
        out["server_cpu_util"] = (cpu[-1][1] - cpu[0][1]) / (cpu[-1][0] - cpu[0][0])
        out["server_cpu_us_per_chunk"] = (cpu[-1][1] - cpu[0][1]) / chunks[0] * 1e6
    if phase["mode"] == "learner":
        out["learner"] = _learner_figures(samples, t_go, counters, server_final)
        if cfg.learner is None:  # the started learner: its ring capacity is known
            from learner.config import FlowControlConfig

            cap = (cfg.online_capacity or FlowControlConfig.model_fields["online_capacity"].default) * len(cfg.tasks)
            full = [p["t_s"] for p in out["learner"].get("series", []) if (p["stored_steps"] or 0) >= cap]
            out["learner"]["replay"] = {
                "online_capacity_steps": cap, "full_at_s": full[0] if full else None,
                "full_before_second_half": bool(full) and full[0] <= (t_stop - t_go) / 2,
                "how": "stored steps (tasks sent evenly) reach online_capacity x tasks: the rings stop growing"}
    return out


def _learner_figures(samples: list[dict], t_go: float, counters: dict[str, int], final: dict | None) -> dict[str, Any]:
    """Learner-side counters over the phase and the exactly-once check."""
    with_m = [s for s in samples if s.get("metrics")]
    if not with_m:
        return {"metrics": "unavailable"}
    before = [s for s in with_m if s["t"] <= t_go]  # nothing is stored before go: the last sample before it is the base
    first = (before[-1] if before else with_m[0])["metrics"]
    last = with_m[-1]["metrics"]  # taken after the drain
    delta = {k: last.get(k, 0.0) - first.get(k, 0.0) for k in last
             if k.startswith((f"{L}ingested", f"{L}duplicate", f"{L}rejected", f"{L}dropped", f"{L}received", f"{L}steps_total",
                              f"{L}episodes_total"))}
    stored = delta.get(f"{L}ingested_chunks_total", 0.0)
    acked, unacked = counters["acked"], counters["unacked_at_end"]
    out = {"counter_deltas": delta, "policy_version_end": last.get(f"{L}policy_version"),
           "stored_chunks": stored, "acked_chunks": acked,
           "stored_equals_acked": stored == acked if unacked == 0 else acked <= stored <= acked + unacked,
           "rejected": delta.get(f"{L}rejected_chunks_total", 0.0),
           "series": [{"t_s": round(s["t"] - t_go, 2), "stored_steps": s["metrics"].get(f"{L}ingested_steps_total"),
                       "version": s["metrics"].get(f"{L}policy_version")} for s in with_m]}
    if final:
        out["audit"] = final.get("audit")
        out["final_status"] = final.get("status")
        out["ledger_episodes"], out["open_episodes"] = final.get("ledger_episodes"), final.get("open_episodes")
        out["log_tail"] = final.get("log_tail")
    return out


def comparison_rows(n: int, fl: dict[str, Any], raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The table rows (``bench.common.row``) comparing the fleetloop phase ``fl`` with the raw one, ``n`` actors."""
    def lat(d: dict, k: str) -> float | None:
        return d["ack_latency"][k]

    return [
        row("errors (all RPCs)", "count", n, fl["errors_total"], raw["errors_total"], "lower", "by code in the JSON"),
        row("ack latency p50", "ms", n, lat(fl, "p50_ms"), lat(raw, "p50_ms"), "lower", "write -> ack, every ack"),
        row("ack latency p99", "ms", n, lat(fl, "p99_ms"), lat(raw, "p99_ms"), "lower"),
        row("ack latency max", "ms", n, lat(fl, "max_ms"), lat(raw, "max_ms"), "lower"),
        row("acked steps/s (actors)", "steps/s", n, fl["actors_steps_per_s"], raw["actors_steps_per_s"], "higher"),
        row("acked chunks/s (actors)", "msg/s", n, fl["actors_chunks_per_s"], raw["actors_chunks_per_s"], "higher"),
        row("ingest steps/s (server /metrics)", "steps/s", n, fl["server_steps_per_s"], raw["server_steps_per_s"], "higher",
            "raw: messages x mean steps per chunk"),
        row("ingest chunks/s (server /metrics)", "msg/s", n, fl["server_chunks_per_s"], raw["server_chunks_per_s"], "higher"),
        row("server CPU (all threads)", "cores", n, fl.get("server_cpu_util"), raw.get("server_cpu_util"), "lower",
            "fleetloop: ingest + training + publishing"),
        row("server RSS max", "MB", n, fl["rss"].get("max_mb"), raw["rss"].get("max_mb"), "lower"),
        row("server RSS slope, 2nd half", "MB/min", n, fl["rss"].get("second_half_slope_mb_per_min"),
            raw["rss"].get("second_half_slope_mb_per_min"), "lower"),
        row("duplicates acked", "count", n, fl["counters"]["duplicates"], None, "lower", "raw: n/a"),
        row("backoff acks", "count", n, fl["counters"]["backoff_acks"], None, "lower", "raw: n/a"),
        row("stream reconnects", "count", n, fl["counters"]["reconnects"], raw["counters"]["reconnects"], "lower"),
    ]


def load_verdict(fl: dict[str, Any]) -> dict[str, Any]:
    """The run's yes/no findings from the fleetloop phase's summary (None where unknown)."""
    lr = fl.get("learner", {})
    audit = lr.get("audit") or {}
    c = fl["counters"]
    return {"zero_errors": fl["errors_total"] == 0 and c["rejected"] == 0 and c["ack_mismatches"] == 0,
            "all_acked": c["unacked_at_end"] == 0 and c["produced"] == c["acked"],
            "stored_equals_acked": lr.get("stored_equals_acked"),
            "duplicates_stored": audit.get("duplicates_stored"),
            "rss_grew_second_half": fl["rss"].get("grew"),
            "replay_full_before_second_half": lr.get("replay", {}).get("full_before_second_half"),
            "offered_load_met": c["schedule_slips"] == 0}


def print_load_table(result: dict[str, Any]) -> None:
    """The comparison table (as ``bench.common.print_table``, with counts shown as integers) and the notes."""
    from rich.console import Console
    from rich.table import Table

    def fmt(v: float | None, unit: str) -> str:
        return str(int(v)) if unit == "count" and v is not None else _fmt_float(v)

    m = result["machine"]
    table = Table(title=f"fleetloop bench load: {result['config']['actors']} actors, fleetloop vs raw gRPC (same run)",
                  caption=f"{m['cpus_usable']} CPUs, {m['platform']}, Python {m['python']}, "
                          f"grpcio {m['packages'].get('grpcio')}; ratio = fleetloop / raw")
    for col, just in (("metric", "left"), ("unit", "left"), ("fleetloop", "right"), ("raw gRPC", "right"),
                      ("ratio", "right"), ("better", "left"), ("note", "left")):
        table.add_column(col, justify=just)
    for r in result["rows"]:
        table.add_row(r["metric"], r["unit"], fmt(r["fleetloop"], r["unit"]), fmt(r["raw_grpc"], r["unit"]),
                      "-" if r["ratio"] is None else f"{r['ratio']:.2f}", r["better"], r["note"])
    console = Console(width=max(120, Console().width))
    console.print(table)
    for note in result.get("notes", []):
        console.print(f"  - {note}", highlight=False)
