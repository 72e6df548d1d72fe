"""Child processes of ``fleetloop bench weights``: a robot (the real weight client and policy
runner) and a raw gRPC download client. Top-level imports stay light (spawned children import
this module; torch and grpc are imported inside the functions).

Every report carries times on the system-wide monotonic clock (``time.monotonic`` is
CLOCK_MONOTONIC on Linux, shared by all processes), so the parent can subtract its own t0.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import JOB, RAW_DOWNLOAD, TASK, child_setup, cpu_seconds, peak_rss_mb, raw_channel


def robot(idx: int, target: str, spec: dict[str, Any], ready_q, report_q, stop, hard_deadline_s: float,
          episode_s: float, client_path: str = "streaming", known_version: int = 0) -> None:
    """Child process: one robot. The real ``WeightClient`` follows announcements (subscribe, fetch,
    digest verified while receiving, zero-copy tensor views) and the real ``PolicyRunner`` (built
    from a RunConfig naming ``spec``'s MLP) runs the policy. The robot loop is episodes of
    ``episode_s`` seconds (idle: the robot's compute is not what is measured); between episodes it
    takes the pending verified version, installs it (``PolicyRunner.load``), computes one action
    with it, reports the times, and drops the fetched buffer (one copy of the weights stays: the
    policy's parameters). The client is given the channel, so chunks are parsed without copying
    their payload (``WeightClient(channel=...)``).

    ``client_path="legacy"`` replaces only ``fetch_now`` with the client's previous path, for
    before/after figures: chunks parsed by the generated code, collected in a list and joined, then
    sha256 over the whole blob, then ``safetensors.torch.load`` (which copies every tensor) via
    ``load_checked``."""
    client = channel = None
    try:
        life = child_setup(hard_deadline_s)
        import threading

        import grpc
        import numpy as np
        import torch

        from actor.policy_runner import PolicyRunner
        from fleetloop import wire_settings
        from fleetloop.channels import channel_options
        from fleetloop.client.weight_client import VerifiedWeights, WeightClient, load_checked
        from fleetloop.v1 import fleetloop_pb2 as pb
        from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc

        torch.set_num_threads(1)

        class TimedWeightClient(WeightClient):
            """The real client; only records when each announcement arrived and the CPU time then."""

            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                self.announced: dict[int, tuple[float, float]] = {}
                self.subscribed = threading.Event()

            def _handle(self, ann) -> None:
                self.announced.setdefault(ann.version, (time.monotonic(), cpu_seconds()))
                self.subscribed.set()
                super()._handle(ann)

            def fetch_now(self, ann):
                if client_path != "legacy":
                    return super().fetch_now(ann)
                t0 = time.monotonic()
                parts = [p.data for p in self.stub.FetchWeights(
                    pb.FetchRequest(job_id=self.job, actor_id=self.actor, version=ann.version, chunk_bytes=1 << 20),
                    metadata=self.metadata, timeout=600)]
                blob = b"".join(parts)
                del parts
                t1 = time.monotonic()
                state = load_checked(blob, ann.sha256)
                t2 = time.monotonic()
                return VerifiedWeights(ann.version, ann.sha256, state, ann.size_bytes, ann.published_at, time.time(),
                                       {"fetch_start": t0, "downloaded": t1, "verified": t2})

        run_config = wire_settings.run_config(policy_factory=spec["factory"], policy_kwargs=spec["kwargs"], task_ids=[TASK])
        runner = PolicyRunner(run_config, spec["obs_dim"], spec["act_dim"])
        obs = np.zeros(spec["obs_dim"], np.float32)
        channel = grpc.insecure_channel(target, options=channel_options())
        stub = pb_grpc.LearnerStub(channel)
        # versions up to known_version (earlier configurations, other architectures) are not fetched
        client = TimedWeightClient(stub, JOB, f"bench-robot-{idx}", (), current_version=known_version, channel=channel)
        client.start()
        if not client.subscribed.wait(60):
            raise TimeoutError("no announcement on SubscribeWeights within 60 s")
        ready_q.put({"idx": idx, "ready": True, "rss_mb": peak_rss_mb()})
        while not stop.is_set() and life.ok():
            weights = client.pending()  # between episodes only
            if weights is not None:
                took = time.monotonic()
                runner.load(weights)
                installed = runner.installed_at
                runner.act(obs, TASK)
                acted = time.monotonic()
                announced, cpu_at_announce = client.announced.get(weights.version, (weights.timings["fetch_start"], 0.0))
                report_q.put({"idx": idx, "version": weights.version, "announced": announced, **weights.timings,
                              "took": took, "installed": installed, "acted": acted, "bytes": weights.size_bytes,
                              "cpu_s": cpu_seconds() - cpu_at_announce, "rss_peak_mb": peak_rss_mb()})
                del weights  # the fetched buffer goes; the policy keeps its own copy
            stop.wait(episode_s)
    except Exception as exc:  # report, never hang the parent
        ready_q.put({"idx": idx, "error": repr(exc)[:500]})
        report_q.put({"idx": idx, "error": repr(exc)[:500]})
    finally:
        if client is not None:
            client.stop()
        if channel is not None:
            channel.close()


def raw_client(idx: int, target: str, cmd_q, ready_q, report_q, hard_deadline_s: float) -> None:
    """Child process: for each round number on ``cmd_q``, download ``RawServer.Download`` whole,
    keeping the chunks as received (a list: no join, so one copy in memory and no extra pass), then
    hash them (timed separately, after ``received``) and drop them."""
    try:
        life = child_setup(hard_deadline_s)
        import hashlib
        import queue as queue_mod

        import grpc

        channel = raw_channel(target)
        grpc.channel_ready_future(channel).result(timeout=30)
        call = channel.unary_stream(RAW_DOWNLOAD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        ready_q.put({"idx": idx, "ready": True})
        while life.ok():
            try:
                rnd = cmd_q.get(timeout=0.5)
            except queue_mod.Empty:
                continue
            if rnd is None:
                break
            cpu0 = cpu_seconds()
            t0 = time.monotonic()
            parts = list(call(b"", timeout=300))
            t1 = time.monotonic()
            sha = hashlib.sha256()
            for p in parts:
                sha.update(p)
            t2 = time.monotonic()
            report_q.put({"idx": idx, "round": rnd, "start": t0, "received": t1, "hashed": t2,
                          "bytes": sum(len(p) for p in parts), "sha256": sha.hexdigest(), "cpu_s": cpu_seconds() - cpu0,
                          "rss_peak_mb": peak_rss_mb()})
            del parts
        channel.close()
    except Exception as exc:
        ready_q.put({"idx": idx, "error": repr(exc)[:500]})
        report_q.put({"idx": idx, "error": repr(exc)[:500]})
