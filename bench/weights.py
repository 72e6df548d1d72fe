"""Weight delivery: publish -> every robot verified and running the version, vs raw gRPC of the same bytes.

Sweep: for each policy size (``--sizes-mb``, MB = 10^6 bytes) and each fan-out N (``--actors``; 1
is always measured, the ratios need it):

fleetloop path:
  an in-process learner (``build_learner(...).serve()``, training idle, ``keep_versions=2``) and N robot
  processes (``spawn``, :func:`bench.weights_procs.robot`), each with the real
  ``fleetloop.client.weight_client.WeightClient`` (SubscribeWeights -> fetch thread -> FetchWeights chunks
  hashed as they arrive into one buffer -> digest check -> zero-copy safetensors views) and the
  real ``actor.policy_runner.PolicyRunner`` running an MLP whose parameters total the size (4
  hidden layers, width solved for the size). The bench publishes with ``core.weights.publish(blob)``
  (sha256 || fsync'd write, then announce) a safetensors blob of that MLP's state dict (random
  float32, one value changed per round so each version has its own digest) and times from just
  before that call:
  - *delivered*: the last robot has the version verified (digest matched, tensors parsed);
  - *running*: the last robot has installed it (``PolicyRunner.load`` returned: the next action
    uses it). Robots swap only between episodes (``--episode-s``, idle episodes), so *running*
    includes up to one episode of waiting, reported separately as the boundary wait.
  One warm-up round (excluded), then ``repeats`` rounds; median, P50 and P99 (linear
  interpolation; with few rounds P99 is close to the maximum) over rounds.

raw baseline (same run, same blobs, rounds alternating with fleetloop's under the same load):
  a unary-stream gRPC handler with identity serializers (bench.common.RawServer) streams the blob in
  the same chunk size to N client processes at once (:func:`bench.weights_procs.raw_client`),
  timed from the start signal until the last client holds every byte (chunks kept as received; the
  client's sha256 afterwards is reported separately and not counted).

ratios (lower is better): fleetloop 1-actor delivered / raw 1-client; N-actor / 1-actor time
(fleetloop and raw each). Also reported: per-stage medians, CPU seconds of the learner process and
of the robots per round (is fan-out serialised on the learner, or is the machine full?), the
learner's bytes served, and peak RSS of every process. A configuration that would not fit in the
machine's available memory is skipped with a note (never half-run).

This module is the sweep, its result document and the command line; the rounds of one
configuration and the before/after comparison are :mod:`bench.weights_rounds`.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import JOB, MB, TASK, RawServer, log_progress, machine_info, peak_rss_mb, quiet_fleetloop_logs
from bench.weights_report import before_after_notes, notes, rows_goals_plots
from bench.weights_rounds import CHUNK_BYTES, mem_available_bytes, measure, measure_before_after

HIDDEN_LAYERS = 4
FACTORY = "fleetloop.policies:mlp_policy"


# -- the policy ---------------------------------------------------------------------------------
def policy_spec(size_mb: float) -> dict[str, Any]:
    """An MLP (``HIDDEN_LAYERS`` hidden layers of one width) for the default Meta-World specs whose
    float32 parameters total about ``size_mb`` MB."""
    from learner.config import LearnerConfig

    cfg = LearnerConfig(job_id=JOB, tasks=[TASK])
    obs, act, tasks = cfg.obs_dim, cfg.act_dim, 1
    target = size_mb * MB / 4
    a, b = HIDDEN_LAYERS - 1, obs + tasks + act + HIDDEN_LAYERS  # params = a h^2 + b h + act
    width = max(1, int((-b + math.sqrt(b * b + 4 * a * max(0.0, target - act))) / (2 * a)))
    return {"factory": FACTORY, "kwargs": {"hidden": [width] * HIDDEN_LAYERS}, "obs_dim": obs, "act_dim": act,
            "params": a * width * width + b * width + act}


def base_tensors(spec: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Random float32 tensors with the shapes of ``spec``'s MLP (built on the meta device: no init cost)."""
    import numpy as np
    import torch

    from fleetloop.policies import build_policy

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_policy(spec["factory"], spec["kwargs"], spec["obs_dim"],
                                                             spec["act_dim"], 1).state_dict().items()}
    rng = np.random.default_rng(seed)
    return {k: torch.from_numpy(rng.random(s, dtype=np.float32) * 0.02 - 0.01) for k, s in shapes.items()}


# -- learner -----------------------------------------------------------------------------------
def start_learner(state_dir: Path, chunk_bytes: int):
    """The real learner in this process, training idle, at most 2 versions held in memory and the
    newest 3 on disk."""
    from learner.config import LearnerConfig
    from learner.process import build_learner

    cfg = LearnerConfig(job_id=JOB, host="127.0.0.1", port=0, metrics_port=None, state_dir=state_dir, tasks=[TASK],
                        min_online_steps=10 ** 12, max_updates_per_s=0.1, checkpoint_every_s=1e6, device="cpu",
                        keep_versions=2, weight_chunk_bytes=chunk_bytes)
    impl = build_learner(cfg).serve()
    impl.core.weights.keep_on_disk = 3  # a 780 MB sweep would otherwise leave ~25 GB of old versions on disk
    return impl


def stop_learner(impl) -> None:
    impl.stop(checkpoint=False, grace_s=1.0, wait_s=10.0, announce=False)


def memory_needed(size_bytes: int, n: int) -> int:
    """Peak estimate of a configuration: each robot holds its policy plus one received buffer and
    ~300 MB of process (torch); each raw client holds the chunks of one blob and ~100 MB."""
    return int(n * (2.1 * size_bytes + 400e6))


# -- the sweep ---------------------------------------------------------------------------------
def run_sweep(sizes_mb: list[float], counts: list[int], repeats: list[int], episode_s: float = 0.05,
              chunk_bytes: int = CHUNK_BYTES, client_path: str = "streaming", compare: bool = False) -> dict[str, Any]:
    """Every size x every fan-out (1 always included), fleetloop and raw alternating; the result
    document. ``compare``: also the before/after section for the largest size
    (:func:`~bench.weights_rounds.measure_before_after`)."""
    t_start = time.monotonic()
    machine = machine_info()
    before_after: dict[str, Any] | None = None
    counts = sorted({1, *counts})
    config = {"sizes_mb": sizes_mb, "actors": counts, "repeats": dict(zip(map(str, sizes_mb), repeats)),
              "warmup_rounds": 1, "chunk_bytes": chunk_bytes, "episode_s": episode_s, "client_path": client_path,
              "before_after": compare,
              "policy": f"{FACTORY}, {HIDDEN_LAYERS} hidden layers, width solved per size, float32",
              "clients": "separate processes (multiprocessing spawn), torch 1 thread each",
              "learner": "in this process, training off (min_online_steps=10**12), keep_versions=2",
              "mb": "10^6 bytes",
              "timing": "fleetloop: before core.weights.publish -> last robot verified (delivered) / installed (running); "
                        "raw: start signal -> last client received all bytes"}
    results: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    with quiet_fleetloop_logs(), tempfile.TemporaryDirectory(prefix="fleetloop-bench-weights-") as tmp:
        impl = start_learner(Path(tmp) / "learner", chunk_bytes)
        try:
            with RawServer(chunk_bytes=chunk_bytes) as server:
                step = 1
                for size_mb, reps in zip(sizes_mb, repeats):
                    spec = policy_spec(size_mb)
                    log_progress(f"weights: {size_mb:g} MB policy (MLP width {spec['kwargs']['hidden'][0]}), building tensors")
                    base = base_tensors(spec)
                    size_bytes = int(spec["params"] * 4)
                    per_size = results.setdefault(f"{size_mb:g}", {"spec": spec, "fleetloop": {}, "raw_grpc": {}})
                    for n in counts:
                        need, avail = memory_needed(size_bytes, n) + 3 * size_bytes, mem_available_bytes()
                        if avail is not None and need > avail - 1_000_000_000:
                            skipped.append(f"{size_mb:g} MB x {n} robots skipped: needs ~{need / 1e9:.1f} GB, "
                                           f"{avail / 1e9:.1f} GB available")
                            log_progress(skipped[-1])
                            continue
                        log_progress(f"weights: {size_mb:g} MB, {n} robot(s) / raw client(s), 1 warm-up + {reps} rounds")
                        fl, raw = measure(impl.core, f"127.0.0.1:{impl.port}", server, spec, n, base, reps, step, episode_s,
                                          client_path)
                        per_size["fleetloop"][str(n)], per_size["raw_grpc"][str(n)] = fl, raw
                        step += reps + 1
                    if compare and size_mb == max(sizes_mb):
                        before_after, step = measure_before_after(impl, server, spec, base, counts, reps, step, episode_s, skipped,
                                                           Path(tmp))
                    del base
        finally:
            stop_learner(impl)
    doc = {"bench": "weights", "machine": machine, "config": config,
           "command": command_line(sizes_mb, counts, repeats, episode_s, chunk_bytes, client_path, compare), "runs": results}
    doc.update(rows_goals_plots(results, counts))
    if before_after is not None:
        doc["before_after"] = before_after
    doc["notes"] = notes(results) + (before_after_notes(before_after, results) if before_after else []) + skipped
    doc["bench_process_rss_peak_mb"] = peak_rss_mb()
    doc["wall_s"] = time.monotonic() - t_start
    return doc


def command_line(sizes_mb, counts, repeats, episode_s, chunk_bytes, client_path, compare) -> str:
    return (f"fleetloop bench weights --sizes-mb {','.join(f'{s:g}' for s in sizes_mb)} --actors {','.join(map(str, counts))}"
            f" --repeats {','.join(map(str, repeats))} --episode-s {episode_s:g} --chunk-bytes {chunk_bytes}"
            + (f" --client {client_path}" if client_path != "streaming" else "") + (" --before-after" if compare else "")
            + " --out F.json")


# -- CLI ---------------------------------------------------------------------------------------
def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise ValueError(f"{flag} {text!r} must be comma-separated positive numbers")
    return vals


def _ints(text: str, flag: str) -> list[int]:
    vals = _floats(text, flag)
    if any(v != int(v) for v in vals):
        raise ValueError(f"{flag} {text!r} must be comma-separated positive integers")
    return [int(v) for v in vals]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fleetloop bench weights``."""
    parser.add_argument("--sizes-mb", default="10", help="comma-separated policy sizes, MB (10^6 bytes)")
    parser.add_argument("--size-mb", type=float, default=None, help="one size (kept for old commands; overrides --sizes-mb)")
    parser.add_argument("--actors", default="1,4", help="comma-separated robot counts (1 is always measured)")
    parser.add_argument("--repeats", default="3", help="timed rounds per configuration: one number, or one per size")
    parser.add_argument("--episode-s", type=float, default=0.05, help="robot episode length (swaps happen between episodes)")
    parser.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES, help="FetchWeights and raw chunk size (4096..4 MiB)")
    parser.add_argument("--client", default="streaming", choices=["streaming", "legacy"],
                        help="robot fetch path: streaming (hash on arrival, zero-copy views) or legacy (join, hash, "
                             "safetensors load: the previous path, for before/after)")
    parser.add_argument("--before-after", action="store_true",
                        help="also measure the previous client path, publish and chunk encoding (largest size)")
    parser.add_argument("--merge", default=None, help="comma-separated result files of earlier runs to merge into --out "
                                                       "(nothing is measured)")
    parser.add_argument("--out", required=True)


def merge_docs(paths: list[str]) -> dict[str, Any]:
    """One result document from several runs of this bench (e.g. one per size, each under the time
    limit): their ``runs`` united (a size measured twice: the later file wins), rows, goals, plots and
    notes recomputed from them; the first file's machine; every command kept."""
    import json

    docs = [json.loads(Path(p).read_text()) for p in paths]
    runs: dict[str, Any] = {}
    for d in docs:
        if d.get("bench") != "weights":
            raise ValueError(f"--merge: {d.get('bench')!r} is not a weights result")
        runs.update(d["runs"])
    runs = dict(sorted(runs.items(), key=lambda kv: float(kv[0])))
    counts = sorted({int(n) for per in runs.values() for n in per["fleetloop"]})
    before_after = next((d["before_after"] for d in docs if d.get("before_after")), None)
    doc = {"bench": "weights", "machine": docs[0]["machine"],
           "config": {**docs[0]["config"], "sizes_mb": [float(s) for s in runs], "actors": counts,
                      "repeats": {k: v for d in docs for k, v in d["config"]["repeats"].items()},
                      "merged_from": [{"command": d["command"], "machine_time": d["machine"]["time"],
                                       "loadavg_1m_at_start": d["machine"]["loadavg_1m_at_start"],
                                       "git_commit": d["machine"]["git_commit"]} for d in docs]},
           "command": " && ".join(d["command"] for d in docs), "runs": runs}
    doc.update(rows_goals_plots(runs, counts))
    if before_after is not None:
        doc["before_after"] = before_after
    doc["notes"] = notes(runs) + (before_after_notes(before_after, runs) if before_after else []) + \
        [n for d in docs for n in d["notes"] if "skipped" in n]
    doc["bench_process_rss_peak_mb"] = max(d.get("bench_process_rss_peak_mb") or 0 for d in docs)
    doc["wall_s"] = sum(d["wall_s"] for d in docs)
    return doc


def plan(args: argparse.Namespace):
    """Check the arguments (ValueError naming the bad one); return the run."""
    if getattr(args, "merge", None):
        paths = [p for p in args.merge.split(",") if p.strip()]
        missing = [p for p in paths if not Path(p).is_file()]
        if len(paths) < 2 or missing:
            raise ValueError(f"--merge {args.merge!r} must name at least two existing result files (missing: {missing})")
        return lambda: merge_docs(paths)
    sizes = [float(args.size_mb)] if getattr(args, "size_mb", None) is not None else _floats(args.sizes_mb, "--sizes-mb")
    if getattr(args, "size_mb", None) is not None and not args.size_mb > 0:
        raise ValueError(f"--size-mb {args.size_mb} must be > 0")
    counts = _ints(args.actors, "--actors")
    repeats = _ints(args.repeats, "--repeats")
    if len(repeats) == 1:
        repeats = repeats * len(sizes)
    if len(repeats) != len(sizes):
        raise ValueError(f"--repeats {args.repeats!r} must be one number or one per size ({len(sizes)})")
    episode_s = float(getattr(args, "episode_s", 0.05))
    if not 0 < episode_s <= 10:
        raise ValueError(f"--episode-s {episode_s} must be in (0, 10]")
    chunk = int(getattr(args, "chunk_bytes", CHUNK_BYTES))
    if not 4096 <= chunk <= 4 << 20:
        raise ValueError(f"--chunk-bytes {chunk} must be in 4096..{4 << 20}")
    client_path = getattr(args, "client", "streaming")
    if client_path not in ("streaming", "legacy"):
        raise ValueError(f"--client {client_path!r} must be streaming or legacy")
    compare = bool(getattr(args, "before_after", False))
    return lambda: run_sweep(sizes, counts, repeats, episode_s, chunk, client_path, compare)


def main(args: argparse.Namespace) -> int:
    """Run, write ``args.out``, print the table; 0, or 2 on a bad argument."""
    from bench.runner import run_reported

    return run_reported("weights", args, plan)
