"""What compressed camera storage moves from ingest to training, per camera payload of ``fleetloop bench
ingest``: the ingest check of one batch's frames (headers only, vs the full decode of ``storage =
decoded``) and the batch-time decode of a training batch (:class:`learner.frames.FrameDecoder`, per
decoder and thread count), wall and CPU milliseconds per batch of ``batch`` steps.

The frames are the payload's own (:class:`bench.payloads.RobotSource`: the actors' encoded pool), a
batch draws ``batch`` steps from it at random (with replacement, as the replay samples). CPU time is
the process's (all decode threads); wall time the median over ``reps`` batches.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.payloads import PayloadSpec, RobotSource

BATCH = 64


def _timed(fn, reps: int) -> tuple[float, float]:
    """(median wall ms, mean CPU ms) of ``fn()`` over ``reps`` calls (after one warm-up call)."""
    fn()
    walls, c0 = [], time.process_time()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        walls.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(walls), (time.process_time() - c0) / reps * 1e3


def batch_decode_cost(spec: PayloadSpec, batch: int = BATCH, reps: int = 20, seed: int = 4242) -> dict[str, Any]:
    """The document of one camera payload (see the module docstring); {} for a payload without encoded frames."""
    import numpy as np

    from fleetloop import image_codec
    from learner.frames import FrameDecoder

    src = RobotSource(spec, seed, 16)
    if not src.encoded:
        return {}
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 16, batch)
    code = image_codec.encoding_code(spec.images)
    shapes = {s["name"]: tuple(s["shape"]) for s in src.image_specs}
    frames = {name: [f for r in rows for f in src.encoded[name][r]] for name in shapes}
    n_frames = sum(len(v) for v in frames.values())

    def sample() -> dict[str, Any]:
        obs = {}
        for name, flat in frames.items():
            cells = np.empty(len(flat), dtype=object)
            cells[:] = flat
            obs[name] = cells.reshape(batch, -1)
        return {"obs": obs, "rewards": np.zeros(batch, np.float32)}

    def full() -> None:  # what storage = decoded does at ingest for these frames
        for name, flat in frames.items():
            image_codec.decode_frames(flat, (len(flat), *shapes[name][-3:]), code, name)

    def headers() -> None:  # what storage = compressed does at ingest
        for name, flat in frames.items():
            image_codec.check_frames(flat, (len(flat), *shapes[name][-3:]), code, name)

    out: dict[str, Any] = {"payload": spec.name, "batch_steps": batch, "frames_per_batch": n_frames,
                           "frame_bytes_mean": sum(len(f) for v in frames.values() for f in v) / n_frames,
                           "encoding": spec.images, "decoders": []}
    out["ingest_full_decode_ms"], out["ingest_full_decode_cpu_ms"] = _timed(full, reps)
    out["ingest_header_check_ms"], out["ingest_header_check_cpu_ms"] = _timed(headers, reps)
    names = ["pillow"] + (["simplejpeg"] if image_codec.simplejpeg_module() is not None and code == image_codec.JPEG else [])
    for name in names:
        for workers in (1, 2):
            dec = FrameDecoder(shapes, workers, name)
            try:
                wall, cpu = _timed(lambda: dec.decode_parts([("t", "online", sample())]), reps)
            finally:
                dec.close()
            out["decoders"].append({"decoder": name, "workers": workers, "wall_ms": wall, "cpu_ms": cpu,
                                    "cpu_us_per_frame": cpu * 1e3 / n_frames})
    auto = image_codec.resolve_decoder("auto")
    want = auto if any(d["decoder"] == auto for d in out["decoders"]) else "pillow"  # PNG: Pillow whatever the setting
    default = next(d for d in out["decoders"] if d["workers"] == 2 and d["decoder"] == want)
    out["default"] = {"decoder": default["decoder"], "workers": 2, "wall_ms": default["wall_ms"], "cpu_ms": default["cpu_ms"]}
    return out
