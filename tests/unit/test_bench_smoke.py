"""The benchmarks' command lines and pure parts (ingest, weights, load): bad arguments exit 2 naming
the flag, the load bench's episode bank passes the learner's validation, its statistics. The runs
themselves (real processes, loopback gRPC) are in tests/integration/test_bench_runs.py.
"""

import argparse

import pytest

from tests.helpers.bench_args import ingest_args, load_args

pytestmark = pytest.mark.timeout(120)


def test_weights_bad_arguments_return_2(tmp_path):
    from bench.weights import main

    for bad in (dict(sizes_mb="0"), dict(actors="1,x"), dict(repeats="1,2,3"), dict(chunk_bytes=10)):
        base = dict(sizes_mb="1", size_mb=None, actors="1", repeats="1", episode_s=0.05, chunk_bytes=65536,
                    client="streaming", out=str(tmp_path / "w.json"))
        assert main(argparse.Namespace(**(base | bad))) == 2, bad
    assert not (tmp_path / "w.json").exists()


def test_ingest_bad_arguments_return_2(tmp_path, capsys):
    from bench.ingest import main

    for bad, flag in ((dict(actors="0"), "--actors"), (dict(payload="video"), "--payload"), (dict(seconds=-1.0), "--seconds"),
                      (dict(image_codec="gif"), "--image-codec")):
        assert main(ingest_args(tmp_path, **bad)) == 2, bad
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "nested" / "ingest.json").exists()


# -- fleetloop bench load ------------------------------------------------------------------------------
def test_load_cli_flags_and_bad_arguments_return_2(tmp_path):
    """``fleetloop bench load`` is parsed by the real CLI parser into every LoadConfig field that has a
    flag; a bad value exits 2 naming it and writes nothing."""
    from bench.load import LoadConfig, main
    from services.cli import build_parser

    out = str(tmp_path / "load.json")
    args = build_parser().parse_args(["bench", "load", "--out", out])
    flagged = set(LoadConfig.model_fields) - {"max_episode_steps", "warmup_s", "drain_timeout_s", "training", "progress"}
    assert flagged <= set(vars(args)) and {"no_training", "no_progress"} <= set(vars(args))
    assert args.actors == 200 and args.minutes == 5.0
    for bad in (["--actors", "0"], ["--learner", "no-port"], ["--hz", "-1"]):
        args = build_parser().parse_args(["bench", "load", *bad, "--out", out])
        assert args.func(args) == 2, bad
    assert main(load_args(tmp_path, processes=0)) == 2
    assert not (tmp_path / "load.json").exists()


def test_load_episode_bank_chunks_pass_the_learners_validation():
    """The generated chunks are what a robot sends: the learner's own validator accepts them, an
    episode's chunks tile it (seq and first_step contiguous, the end only on the last one)."""
    import numpy as np

    from bench.load_data import EpisodeBank, load_specs, serialize_chunk
    from fleetloop.v1 import fleetloop_pb2 as pb
    from learner.ingest import validate

    bank = EpisodeBank(seed=3, chunk_steps=40, max_episode_steps=200)
    obs_specs, act_specs = load_specs()
    outcomes = set()
    for ep in bank.episodes:
        decoded = [validate(pb.EpisodeChunk.FromString(serialize_chunk(body, "j", "a-1", "ep-1", seq, "reach-v3", 2, 1.0)),
                            "j", {"reach-v3"}, obs_specs, act_specs, latest_version=2)
                   for seq, body in enumerate(ep.chunks)]
        assert [d.first_step for d in decoded] == list(range(0, ep.length, 40))
        assert sum(d.steps for d in decoded) == ep.length and all(d.steps >= 1 for d in decoded)
        assert [d.outcome for d in decoded] == [None] * (len(decoded) - 1) + [ep.outcome]
        assert all(d.behavior_version == 2 and set(d.obs) == {"state"} and d.obs["state"].shape[1] == 39
                   and d.actions.shape[1] == 4 for d in decoded)
        obs = np.concatenate([d.obs["state"] for d in decoded])
        assert np.allclose(obs[1:, 18:36], obs[:-1, :18])  # Meta-World layout: previous frame follows the current one
        assert np.abs(np.concatenate([d.actions for d in decoded])).max() <= 1.0
        outcomes.add(ep.outcome)
    assert outcomes == {"success", "failure", "timeout"}
    assert 0.05 < bank.intervention_share() < 0.2


def test_load_stats_rss_verdict_and_port_lookup():
    from bench.common import RawServer
    from bench.load_stats import latency_summary, pid_listening_on, rss_summary, slope_per_min
    import numpy as np
    import os

    flat = [{"t": float(t), "rss_mb": 400.0 + (t < 30) * t} for t in range(61)]   # grows, then plateaus
    growing = [{"t": float(t), "rss_mb": 400.0 + 0.5 * t} for t in range(61)]     # 30 MB/min throughout
    assert rss_summary(flat, 0.0, 60.0)["grew"] is False
    g = rss_summary(growing, 0.0, 60.0)
    assert g["grew"] is True and abs(g["second_half_slope_mb_per_min"] - 30.0) < 1e-6
    assert slope_per_min([0.0, 1.0], [1.0, 2.0]) is None
    s = latency_summary(np.array([0.001] * 99 + [0.1]))
    assert s["count"] == 100 and abs(s["p50_ms"] - 1.0) < 1e-9 and s["max_ms"] == 100.0
    with RawServer(workers=8) as server:
        assert pid_listening_on(server.port) == os.getpid()


def test_render_bad_arguments_return_2(tmp_path, capsys):
    """``fleetloop bench render``: a bad flag exits 2 naming it, before any simulator starts (the run
    itself is in tests/integration/test_metaworld_pixels.py)."""
    from services.cli import build_parser

    out = str(tmp_path / "render.json")
    for bad, flag in ((["--cameras", "corner3,bogus"], "--cameras"), (["--image-size", "8"], "--image-size"),
                      (["--image-size", "84,x"], "--image-size"), (["--steps", "0"], "--steps"),
                      (["--jpeg-quality", "99"], "--jpeg-quality"), (["--tasks", ","], "--tasks"),
                      (["--tasks", "drawer-open-v3,nope-v3"], "--tasks")):
        args = build_parser().parse_args(["bench", "render", *bad, "--out", out])
        assert args.func(args) == 2, bad
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "render.json").exists()
