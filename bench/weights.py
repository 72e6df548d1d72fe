"""Weight delivery: publish -> every actor holds the verified version, vs raw gRPC of the same bytes.

fleetloop path:
  an in-process learner (``_RayLearnerImpl``, training idle); N actor processes (``spawn``) each
  run the real ``actor.weight_client.WeightClient`` (SubscribeWeights stream -> fetch thread ->
  ``fetch_blob`` over FetchWeights in 1 MiB chunks -> ``load_verified``: sha256 check + safetensors
  load), subclassed only to timestamp announcement, download and verification. The bench calls
  ``core.weights.publish(blob)`` (hash, atomic write with fsync, announce) with a safetensors blob
  of random float32 tensors of the requested size (``fleetloop.weights.state_dict_to_blob``) and
  times from just before that call until the last actor has verified the version. One warm-up
  round (excluded), then ``repeats`` rounds with a fresh blob each; median and max reported. Run
  with 1 actor, and with N actors when N > 1.

raw baselines (same run, same blobs, rounds alternating with fleetloop's so both see the same load):
  a unary-stream gRPC handler with identity serializers (bench.common.RawServer) streams the blob in
  1 MiB chunks to 1 client process, and to N client processes at once; timed from the moment the
  bench tells the clients to start until the last one has the whole blob (the sha256 of the
  received bytes is taken afterwards and reported separately, not counted in the baseline).

ratios (lower is better): fleetloop 1-actor time / raw 1-client time; N-actor time / 1-actor time
(fleetloop and raw each).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (JOB, MB, Children, RawServer, child_setup, collect, log_progress, machine_info, median,
                          quiet_fleetloop_logs, ratio, raw_download_client, row, start_learner_in_process,
                          stop_learner_in_process, wait_ready)

READY_TIMEOUT_S = 180.0
CHUNK_BYTES = 1 << 20


def make_blob(size_mb: float, seed: int) -> bytes:
    """A safetensors blob of random float32 tensors (at most 16 MiB each) totalling ``size_mb`` MB of data."""
    import numpy as np
    import torch

    from fleetloop.weights import state_dict_to_blob

    n = max(1, int(size_mb * MB / 4))
    per = 4 << 20
    rng = np.random.default_rng(seed)
    tensors = {f"layers.{i}.weight": torch.from_numpy(rng.standard_normal(min(per, n - off), dtype=np.float32))
               for i, off in enumerate(range(0, n, per))}
    return state_dict_to_blob(tensors)


# -- child: one fleetloop actor's weight client -------------------------------------------------
def weight_actor(idx: int, target: str, ready_q, report_q, stop, hard_deadline_s: float) -> None:
    """Child process: follow announcements with a (timestamping) WeightClient until ``stop``."""
    client = channel = None
    try:
        life = child_setup(hard_deadline_s)
        import threading

        import grpc

        from actor.runtime import channel_options
        from actor.weight_client import VerifiedWeights, WeightClient, fetch_blob
        from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc
        from fleetloop.weights import load_verified

        class TimedWeightClient(WeightClient):
            """The real client; only records when each announcement arrived and when each fetch
            finished downloading and verifying (same calls as ``WeightClient.fetch_now``)."""

            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                self.announced_at: dict[int, float] = {}
                self.subscribed = threading.Event()

            def _handle(self, ann) -> None:
                self.announced_at.setdefault(ann.version, time.monotonic())
                self.subscribed.set()
                super()._handle(ann)

            def fetch_now(self, ann) -> VerifiedWeights:
                t0 = time.monotonic()
                timeout = self.fetch_timeout_s + ann.size_bytes / (self.min_rate_mb_s * 1e6)
                blob = fetch_blob(self.stub, self.job, self.actor, ann, self.metadata, timeout)
                t1 = time.monotonic()
                state = load_verified(blob, ann.sha256)
                t2 = time.monotonic()
                self.fetched += 1
                report_q.put({"idx": idx, "version": ann.version, "announced": self.announced_at.get(ann.version, t0),
                              "fetch_start": t0, "fetched": t1, "verified": t2, "bytes": len(blob), "tensors": len(state)})
                return VerifiedWeights(ann.version, ann.sha256, state, ann.size_bytes, ann.published_at, time.time())

        channel = grpc.insecure_channel(target, options=channel_options())
        stub = pb_grpc.LearnerStub(channel)
        client = TimedWeightClient(stub, JOB, f"bench-weights-{idx}", (), current_version=0)
        client.start()
        if not client.subscribed.wait(60):
            raise TimeoutError("no announcement on SubscribeWeights within 60 s")
        ready_q.put({"idx": idx, "ready": True})
        while not stop.wait(0.5) and life.ok():
            pass
    except Exception as exc:  # report, never hang the parent
        ready_q.put({"idx": idx, "error": repr(exc)[:500]})
        report_q.put({"idx": idx, "error": repr(exc)[:500]})
    finally:
        if client is not None:
            client.stop()
        if channel is not None:
            channel.close()


# -- measurements ------------------------------------------------------------------------------
def _round_timeout(size_bytes: int) -> float:
    return 60.0 + size_bytes / (5 * MB)


def _fleetloop_round(core, report_q, n: int, blob: bytes, step: int) -> dict[str, Any]:
    """Publish ``blob`` and wait until all ``n`` actors verified it."""
    t0 = time.monotonic()
    info = core.weights.publish(blob, step)
    t_pub = time.monotonic()
    reps = collect(report_q, n, _round_timeout(len(blob)), accept=lambda m: m["version"] == info.version)
    if len(reps) < n:
        raise TimeoutError(f"version {info.version}: {len(reps)} of {n} actors verified it in time")
    return {"version": info.version, "bytes": info.size_bytes,
            "delivery_s": max(m["verified"] for m in reps) - t0,
            "publish_s": t_pub - t0,
            "after_publish_s": max(m["verified"] for m in reps) - t_pub,
            "announce_s": max(m["announced"] for m in reps) - t_pub,
            "fetch_s": median([m["fetched"] - m["fetch_start"] for m in reps]),
            "verify_s": median([m["verified"] - m["fetched"] for m in reps]),
            "handoff_s": median([m["fetch_start"] - m["announced"] for m in reps])}


def _raw_round(server: RawServer, cmd_qs: list, report_q, rnd: int, blob: bytes) -> dict[str, Any]:
    """Tell every raw client to download ``blob``; wait until all have it."""
    import hashlib

    server.blob = blob
    digest = hashlib.sha256(blob).hexdigest()
    t0 = time.monotonic()
    for q in cmd_qs:
        q.put(rnd)
    reps = collect(report_q, len(cmd_qs), _round_timeout(len(blob)), accept=lambda m: m["round"] == rnd)
    if len(reps) < len(cmd_qs):
        raise TimeoutError(f"raw round {rnd}: {len(reps)} of {len(cmd_qs)} clients finished in time")
    if any(m["sha256"] != digest or m["bytes"] != len(blob) for m in reps):
        raise RuntimeError(f"raw round {rnd}: a client received different bytes")
    return {"bytes": len(blob), "delivery_s": max(m["received"] for m in reps) - t0,
            "delivery_plus_sha256_s": max(m["hashed"] for m in reps) - t0,
            "start_s": max(m["start"] for m in reps) - t0}


def measure(core, target: str, server: RawServer, n: int, blobs: list[bytes], step0: int) -> tuple[dict, dict]:
    """``n`` fleetloop actors and ``n`` raw clients, all up at once; for each blob a fleetloop round
    then a raw round (paired under the same machine load). The first blob is a warm-up round."""
    fl_rounds, raw_rounds = [], []
    with Children() as children:
        ctx = children.ctx
        ready_q, fl_q, raw_q, stop = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Event()
        cmd_qs = [ctx.Queue() for _ in range(n)]
        try:
            hard = READY_TIMEOUT_S + 2 * sum(_round_timeout(len(b)) for b in blobs)
            for i in range(n):
                children.start(weight_actor, i, target, ready_q, fl_q, stop, hard, name=f"bench-weights-{i}")
                children.start(raw_download_client, i, server.target, cmd_qs[i], ready_q, raw_q, hard,
                               name=f"bench-raw-download-{i}")
            wait_ready(ready_q, 2 * n, READY_TIMEOUT_S, children, "weight clients and raw gRPC download clients")
            for r, blob in enumerate(blobs):
                fl_rounds.append({"round": r, "warmup": r == 0, **_fleetloop_round(core, fl_q, n, blob, step0 + r)})
                raw_rounds.append({"round": r, "warmup": r == 0, **_raw_round(server, cmd_qs, raw_q, r, blob)})
        finally:
            stop.set()
            for q in cmd_qs:
                q.put(None)
    return _summary(fl_rounds), _summary(raw_rounds)


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    timed = [r for r in rounds if not r["warmup"]]
    out: dict[str, Any] = {"rounds": rounds}
    for key in timed[0]:
        if key.endswith("_s"):
            vals = [r[key] for r in timed]
            out[f"{key[:-2]}_median_s"] = median(vals)
            out[f"{key[:-2]}_max_s"] = max(vals)
    out["mb_per_s_median"] = timed[0]["bytes"] / MB / out["delivery_median_s"]
    return out


def run_weights(size_mb: float, actors: int, repeats: int) -> dict[str, Any]:
    """Run fleetloop (1 and N actors) and raw (1 and N clients) deliveries of the same blobs."""
    counts = sorted({1, actors})
    config = {"size_mb": size_mb, "actors": actors, "repeats": repeats, "warmup_rounds": 1, "chunk_bytes": CHUNK_BYTES,
              "actor_counts_measured": counts, "clients": "separate processes (multiprocessing spawn)",
              "training": "off: min_online_steps=10**12, max_updates_per_s=0.1", "mb": "10^6 bytes",
              "timing": "fleetloop: before core.weights.publish -> last actor verified; "
                        "raw: start signal -> last client received all bytes"}
    log_progress(f"weights: building {repeats + 1} blobs of {size_mb:g} MB")
    blobs = [make_blob(size_mb, seed=r) for r in range(repeats + 1)]
    config["blob_bytes"] = len(blobs[0])
    fl: dict[int, dict] = {}
    raw: dict[int, dict] = {}
    with quiet_fleetloop_logs(), tempfile.TemporaryDirectory(prefix="fleetloop-bench-weights-") as tmp:
        impl = start_learner_in_process(Path(tmp) / "learner")
        try:
            with RawServer(chunk_bytes=CHUNK_BYTES) as server:
                step = 1
                for n in counts:
                    log_progress(f"weights: {n} actor(s) / raw client(s), 1 warm-up + {repeats} round(s) of "
                                 f"{size_mb:g} MB, fleetloop and raw alternating")
                    fl[n], raw[n] = measure(impl.core, f"127.0.0.1:{impl.port}", server, n, blobs, step)
                    step += len(blobs)
        finally:
            stop_learner_in_process(impl)
    rows = []
    for n in counts:
        rows += [row("publish -> all verified, median", "s", n, fl[n]["delivery_median_s"], raw[n]["delivery_median_s"], "lower",
                     "raw: transfer only"),
                 row("publish -> all verified, max", "s", n, fl[n]["delivery_max_s"], raw[n]["delivery_max_s"], "lower"),
                 row("announce -> all verified, median", "s", n, fl[n]["after_publish_median_s"], raw[n]["delivery_median_s"],
                     "lower", "fleetloop without the publish call (sha256 + fsync'd write)"),
                 row("delivery rate (per actor), median", "MB/s", n, fl[n]["mb_per_s_median"], raw[n]["mb_per_s_median"],
                     "higher")]
    rows.append(row("download only (FetchWeights), median", "s", 1, fl[1]["fetch_median_s"], raw[1]["delivery_median_s"],
                    "lower", "fleetloop: fetch_blob alone, no announce/verify"))
    if actors > 1:
        rows.append(row(f"{actors}-actor time / 1-actor time", "x", f"{actors}/1",
                        ratio(fl[actors]["delivery_median_s"], fl[1]["delivery_median_s"]),
                        ratio(raw[actors]["delivery_median_s"], raw[1]["delivery_median_s"]), "lower"))
    f1 = fl[1]
    notes = [f"blob {len(blobs[0]):,} bytes; fleetloop 1-actor median breakdown: publish (sha256 + fsync'd write) "
             f"{f1['publish_median_s'] * 1e3:.1f} ms, announce {f1['announce_median_s'] * 1e3:.1f} ms, "
             f"hand-off to fetch thread {f1['handoff_median_s'] * 1e3:.1f} ms, download {f1['fetch_median_s'] * 1e3:.1f} ms, "
             f"verify+load {f1['verify_median_s'] * 1e3:.1f} ms",
             f"raw 1-client transfer + client sha256: {raw[1]['delivery_plus_sha256_median_s'] * 1e3:.1f} ms (median)"]
    return {"bench": "weights", "machine": machine_info(), "config": config, "rows": rows,
            "runs": {"fleetloop": {str(n): v for n, v in fl.items()}, "raw_grpc": {str(n): v for n, v in raw.items()}},
            "notes": notes}
