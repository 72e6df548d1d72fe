"""The measured rounds of ``fleetloop bench weights``: one configuration (size x fan-out) and the before/after.

:func:`measure` starts ``n`` robot processes (:func:`bench.weights_procs.robot`) and ``n`` raw gRPC
download clients (:func:`bench.weights_procs.raw_client`) at once and runs one warm-up round, then
``rounds`` timed ones; each round publishes a fresh blob (:func:`make_blob`) through the learner and
times it to every robot (delivered: verified; running: installed), then streams the same blob over
raw gRPC to every client. It returns the two summaries: for every ``*_s`` figure the median, P99
(:func:`percentile`, linear interpolation) and maximum over the timed rounds. A round that does not
finish in time raises TimeoutError; a raw client that receives different bytes, RuntimeError.
:func:`measure_before_after` compares the previous code paths with the current ones in the same run.
The sweep, its result document and the command line are :mod:`bench.weights`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from bench.common import JOB, MB, Children, RawServer, collect, cpu_seconds, log_progress, median, wait_ready

READY_TIMEOUT_S = 240.0
CHUNK_BYTES = 1 << 20


# -- blobs and memory --------------------------------------------------------------------------
def make_blob(base: dict[str, Any], rnd: int) -> bytes:
    """``base`` as a safetensors blob with the first value of every tensor set to ``rnd``: a version
    with its own digest, same size (the values do not matter to a transfer). Written directly
    (8-byte header length, JSON header padded to 8 bytes, tensors in order) with one ``bytes.join``
    over memoryviews: one copy, where ``safetensors.torch.save`` holds two at its peak."""
    import json
    import struct

    header, off = {}, 0
    for name, t in base.items():
        t.view(-1)[0] = float(rnd)
        n = t.numel() * t.element_size()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return b"".join([struct.pack("<Q", len(raw)), raw, *(memoryview(t.numpy()).cast("B") for t in base.values())])


def mem_available_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -- rounds ------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _round_timeout(size_bytes: int, n: int) -> float:
    return 60.0 + n * size_bytes / (20 * MB)


def _fleetloop_round(core, report_q, n: int, blob: bytes, step: int) -> dict[str, Any]:
    """Publish ``blob``; wait until all ``n`` robots run it."""
    def served() -> float:  # the learner's own counter, read as Prometheus would
        return core.metrics.registry.get_sample_value("fleetloop_learner_weight_served_bytes_total", {"job": JOB}) or 0.0

    served0, cpu0 = served(), cpu_seconds()
    t0 = time.monotonic()
    info = core.weights.publish(blob, step)
    t_pub = time.monotonic()
    reps = collect(report_q, n, _round_timeout(len(blob), n), accept=lambda m: m["version"] == info.version)
    if len(reps) < n:
        raise TimeoutError(f"version {info.version}: {len(reps)} of {n} robots ran it in time")
    cpu1 = cpu_seconds()
    delivered, running = max(m["verified"] for m in reps) - t0, max(m["installed"] for m in reps) - t0
    return {"version": info.version, "bytes": info.size_bytes, "delivery_s": delivered, "running_s": running,
            "publish_s": t_pub - t0, **{f"publish_{k}": v for k, v in core.weights.last_publish_timings.items()},
            "announce_s": max(m["announced"] for m in reps) - t_pub,
            "handoff_s": median([m["fetch_start"] - m["announced"] for m in reps]),
            "download_s": median([m["downloaded"] - m["fetch_start"] for m in reps]),
            "verify_s": median([m["verified"] - m["downloaded"] for m in reps]),
            "boundary_wait_s": median([m["took"] - m["verified"] for m in reps]),
            "install_s": median([m["installed"] - m["took"] for m in reps]),
            "first_action_s": median([m["acted"] - m["installed"] for m in reps]),
            "learner_cpu_s": cpu1 - cpu0, "robots_cpu_s": sum(m["cpu_s"] for m in reps),
            "learner_served_bytes": served() - served0,
            "per_robot_running": sorted(m["installed"] - t0 for m in reps),
            "robot_rss_peak_mb": max(m["rss_peak_mb"] or 0 for m in reps)}


def _raw_round(server: RawServer, cmd_qs: list, report_q, rnd: int, blob: bytes) -> dict[str, Any]:
    import hashlib

    server.blob = blob
    digest = hashlib.sha256(blob).hexdigest()
    cpu0 = cpu_seconds()
    t0 = time.monotonic()
    for q in cmd_qs:
        q.put(rnd)
    reps = collect(report_q, len(cmd_qs), _round_timeout(len(blob), len(cmd_qs)), accept=lambda m: m["round"] == rnd)
    if len(reps) < len(cmd_qs):
        raise TimeoutError(f"raw round {rnd}: {len(reps)} of {len(cmd_qs)} clients finished in time")
    if any(m["sha256"] != digest or m["bytes"] != len(blob) for m in reps):
        raise RuntimeError(f"raw round {rnd}: a client received different bytes")
    return {"bytes": len(blob), "delivery_s": max(m["received"] for m in reps) - t0,
            "delivery_plus_sha256_s": max(m["hashed"] for m in reps) - t0, "start_s": max(m["start"] for m in reps) - t0,
            "server_cpu_s": cpu_seconds() - cpu0, "clients_cpu_s": sum(m["cpu_s"] for m in reps),
            "client_rss_peak_mb": max(m["rss_peak_mb"] or 0 for m in reps)}


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    timed = [r for r in rounds if not r["warmup"]]
    out: dict[str, Any] = {"rounds": rounds}
    for key in timed[0]:
        if key.endswith("_s"):
            vals = [r[key] for r in timed]
            out[f"{key[:-2]}_median_s"] = median(vals)
            out[f"{key[:-2]}_p99_s"] = percentile(vals, 99)
            out[f"{key[:-2]}_max_s"] = max(vals)
    out["mb_per_s_median"] = timed[0]["bytes"] / MB / out["delivery_median_s"]
    return out


def measure(core, target: str, server: RawServer, spec: dict[str, Any], n: int, base, rounds: int, step0: int,
            episode_s: float, client_path: str) -> tuple[dict, dict]:
    """``n`` robots and ``n`` raw clients up at once; per round a fleetloop then a raw delivery of the
    same fresh blob. Round 0 is the warm-up."""
    from bench import weights_procs

    fl_rounds, raw_rounds = [], []
    size = None
    with Children() as children:
        ctx = children.ctx
        ready_q, fl_q, raw_q, stop = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Event()
        cmd_qs = [ctx.Queue() for _ in range(n)]
        latest = core.weights.latest
        known = 0 if latest is None else latest.version  # robots start on the newest version: none is fetched at start
        try:
            hard = READY_TIMEOUT_S + 3 * rounds * _round_timeout(int(spec["params"] * 4), n)
            for i in range(n):
                children.start(weights_procs.robot, i, target, spec, ready_q, fl_q, stop, hard, episode_s, client_path,
                               known, name=f"bench-robot-{i}")
                children.start(weights_procs.raw_client, i, server.target, cmd_qs[i], ready_q, raw_q, hard,
                               name=f"bench-raw-download-{i}")
            wait_ready(ready_q, 2 * n, READY_TIMEOUT_S, children, "robots and raw gRPC download clients")
            for r in range(rounds + 1):
                blob = make_blob(base, step0 + r)
                size = len(blob)
                fl_rounds.append({"round": r, "warmup": r == 0, **_fleetloop_round(core, fl_q, n, blob, step0 + r)})
                raw_rounds.append({"round": r, "warmup": r == 0, **_raw_round(server, cmd_qs, raw_q, r, blob)})
                server.blob = b""
                del blob
        finally:
            stop.set()
            for q in cmd_qs:
                q.put(None)
    fl, raw = _summary(fl_rounds), _summary(raw_rounds)
    timed = [r for r in fl_rounds if not r["warmup"]]
    fl["running_samples_s"] = sorted(r["running_s"] for r in timed)
    fl["per_robot_running_samples_s"] = sorted(x for r in timed for x in r["per_robot_running"])
    fl["learner_served_copies_median"] = median([r["learner_served_bytes"] / size for r in timed])
    fl["robot_rss_peak_mb"] = max(r["robot_rss_peak_mb"] for r in fl_rounds)
    raw["client_rss_peak_mb"] = max(r["client_rss_peak_mb"] for r in raw_rounds)
    return fl, raw


# -- before / after ---------------------------------------------------------------------------
def measure_before_after(impl, server: RawServer, spec: dict[str, Any], base, counts: list[int], reps: int, step: int,
                  episode_s: float, skipped: list[str], tmp: Path) -> tuple[dict[str, Any], int]:
    """Before/after of this change set, same run, largest size:

    - client path: the robots again, with ``client_path="legacy"`` (chunks joined, then sha256, then
      ``safetensors.torch.load``), 1 robot and the largest fan-out that fits in memory;
    - publish: the previous sequential publish (sha256, then the fsync'd write, each timed) vs
      ``WeightStore.publish`` (both at once), same blob, 4 each, order alternating (the disk's
      speed varies by seconds from one write to the next, so only the sha256 time is the change's);
    - serving: CPU seconds to produce every FetchWeights chunk message of the blob, the previous
      way (``pb.WeightChunk(data=bytes(slice)).SerializeToString()``) vs ``learner.weight_serving``.
    """
    import hashlib

    from fleetloop.dataset import atomic_write
    from fleetloop.v1 import fleetloop_pb2 as pb
    from learner.weight_serving import chunks
    from learner.weight_store import WeightStore

    size_bytes = int(spec["params"] * 4)
    out: dict[str, Any] = {"client_path": {}, "what": "before = the previous code path, after = this one; same run"}
    for n in sorted({1, max(counts)}):
        need, avail = int(n * (3.2 * size_bytes + 400e6)) + 3 * size_bytes, mem_available_bytes()
        if avail is not None and need > avail - 1_000_000_000:
            skipped.append(f"before/after (legacy client) x {n} robots skipped: needs ~{need / 1e9:.1f} GB, "
                           f"{avail / 1e9:.1f} GB available")
            continue
        log_progress(f"weights: before/after, legacy client path, {n} robot(s), 1 warm-up + {reps} rounds")
        fl, raw = measure(impl.core, f"127.0.0.1:{impl.port}", server, spec, n, base, reps, step, episode_s, "legacy")
        step += reps + 1
        out["client_path"][str(n)] = {"legacy": {k: fl[k] for k in fl if k.endswith(("_median_s", "_p99_s", "_mb"))},
                                      "raw_delivery_median_s": raw["delivery_median_s"]}
    blob = make_blob(base, step)
    step += 1
    sha_s, write_s, par = [], [], []
    store = WeightStore(tmp / "publish-compare", keep_in_memory=1, keep_on_disk=1)
    for i in range(4):  # the disk's speed varies by seconds between writes: alternate the order, keep every sample
        for kind in (("sequential", "parallel") if i % 2 == 0 else ("parallel", "sequential")):
            if kind == "sequential":
                t0 = time.monotonic()
                hashlib.sha256(blob).hexdigest()
                t1 = time.monotonic()
                atomic_write(tmp / "publish-compare" / "sequential.safetensors", blob)
                sha_s.append(t1 - t0)
                write_s.append(time.monotonic() - t1)
                (tmp / "publish-compare" / "sequential.safetensors").unlink()
            else:
                t0 = time.monotonic()
                store.publish(blob, i)
                par.append(time.monotonic() - t0)
    seq = [a + b for a, b in zip(sha_s, write_s)]
    out["publish"] = {"sequential_s": seq, "sha256_s": sha_s, "write_fsync_s": write_s, "parallel_s": par,
                      "sequential_median_s": median(seq), "parallel_median_s": median(par),
                      "sha256_median_s": median(sha_s), "write_fsync_median_s": median(write_s)}
    sha = hashlib.sha256(blob).hexdigest()
    c0 = cpu_seconds()
    view = memoryview(blob)
    for off in range(0, len(blob), CHUNK_BYTES):
        pb.WeightChunk(version=1, offset=off, data=bytes(view[off:off + CHUNK_BYTES]), total_size=len(blob),
                       sha256=sha).SerializeToString()
    c1 = cpu_seconds()
    for _n, _wire in chunks(1, sha, blob, 0, CHUNK_BYTES):
        pass
    c2 = cpu_seconds()
    out["serving_cpu_per_copy"] = {"previous_s": c1 - c0, "one_copy_s": c2 - c1}
    del blob, view
    return out, step
