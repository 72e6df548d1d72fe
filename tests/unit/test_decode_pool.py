"""Compressed camera storage (issue 19, item 2b): header-only checks at ingest, frame cells in the
online ring, decoding at batch time in a thread pool, one batch ahead.

- The header-only check refuses what the full decode refused before it pixels were read: a truncated
  JPEG or PNG (no end marker), a frame of another size or mode, a frame that is not an image, a wrong
  frame count; each refusal names ``observations[<cam>].frames[i]`` (or ``.frames``) and the value,
  with simplejpeg's header reader and with Pillow's.
- A learner that stores frames compressed trains on the same pixels as one that decodes at ingest
  (Pillow, lossless PNG and JPEG alike); prefetched batches equal synchronous ones for one seed.
- A frame whose body is corrupt passes the header check (it is acked), fails at batch time, and its
  row is dropped and counted as ``dropped_samples_total{reason="corrupt_frame"}``.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fleetloop import image_codec
from fleetloop.codec import make_spec
from fleetloop.errors import InvalidArgument
from fleetloop.specs import TensorInfo
from learner.config import LearnerConfig
from learner.core import LearnerCore
from learner.frames import FrameDecoder, cell_bytes, compressed_names, frames_per_step, to_cells
from learner.ingest import validate
from learner.prefetch import BatchSource
from tests.helpers.camera_chunks import camera_chunk, camera_specs, corrupt_body, frames

JOB, TASK, SIZE = "j", "pick", 16
OBS = [make_spec("proprio", "float32", [4]), make_spec("cam", "uint8", [SIZE, SIZE, 3])]
ACT = [make_spec("action", "float32", [2], [-1.0, -1.0], [1.0, 1.0])]


@pytest.fixture(params=["simplejpeg", "pillow"])
def header_reader(request, monkeypatch):
    """Run a test with simplejpeg's header reader, then with Pillow's (simplejpeg made unavailable)."""
    if request.param == "simplejpeg":
        if image_codec.simplejpeg_module() is None:
            pytest.skip("simplejpeg is not installed")
    else:
        monkeypatch.setattr(image_codec, "_simplejpeg", False)
    return request.param


def _refused(chunk) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        validate(chunk, JOB, {TASK}, OBS, ACT, 0, keep_encoded=True)
    return info.value


def _png(size=(SIZE, SIZE), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(size=(SIZE, SIZE), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90).save(buf, "JPEG")
    return buf.getvalue()


def test_header_only_check_refuses_truncated_and_wrong_frames_naming_the_field(header_reader):
    good = camera_chunk(JOB, "a", "e", 0, n=4)
    decoded = validate(good, JOB, {TASK}, OBS, ACT, 0, keep_encoded=True)
    cells = decoded.obs["cam"]
    assert cells.dtype == object and cells.shape == (4,) and all(isinstance(b, bytes) for b in cells)
    assert list(cells) == list(good.observations["cam"].frames)  # the bytes as sent
    frame = good.observations["cam"].frames[2]
    bad_frames = {
        "truncated JPEG": frame[: len(frame) // 2],
        "JPEG without its end marker": frame[:-2],
        "not an image": b"garbage" * 20,
        "empty": b"",
        "other size": _jpeg((SIZE + 1, SIZE)),
        "grayscale": _jpeg(mode="L"),
        "a PNG in a JPEG tensor": _png(),
    }
    for what, blob in bad_frames.items():
        chunk = camera_chunk(JOB, "a", "e", 0, n=4)
        chunk.observations["cam"].frames[2] = blob
        err = _refused(chunk)
        assert err.field == "observations[cam].frames[2]", (what, str(err))
        assert err.field in str(err) and str(err.value) in str(err), what
    short = camera_chunk(JOB, "a", "e", 0, n=4)
    del short.observations["cam"].frames[3]
    assert _refused(short).field == "observations[cam].frames"
    bigger = camera_chunk(JOB, "a", "e", 0, n=4, size=SIZE * 2)
    assert _refused(bigger).field == "observations[cam].shape"  # against the spec before any header is read


def test_png_header_check_catches_truncation_size_and_mode(header_reader):
    png = camera_chunk(JOB, "a", "e", 0, n=3, encoding="png")
    out = validate(png, JOB, {TASK}, OBS, ACT, 0, keep_encoded=True)
    assert out.obs["cam"].shape == (3,)
    blob = png.observations["cam"].frames[1]
    for what, bad in {"truncated": blob[: len(blob) - 20], "no IEND": blob[:-12], "other size": _png((SIZE, 8)),
                      "RGBA": _png(mode="RGBA"), "palette": _png(mode="P"), "not a PNG": b"\x89PNG" + b"x" * 40,
                      "a JPEG in a PNG tensor": _jpeg()}.items():
        chunk = camera_chunk(JOB, "a", "e", 0, n=3, encoding="png")
        chunk.observations["cam"].frames[1] = bad
        err = _refused(chunk)
        assert err.field == "observations[cam].frames[1]", (what, str(err))


def test_header_check_is_what_the_full_decode_checks():
    """frame_header agrees with Pillow on size and mode for every layout a tensor may have."""
    for enc, modes in ((image_codec.PNG, ("L", "RGB", "RGBA")), (image_codec.JPEG, ("L", "RGB"))):
        for mode in modes:
            blob = (_png if enc == image_codec.PNG else _jpeg)((7, 5), mode)
            assert image_codec.frame_header(blob, enc) == (7, 5, mode)


def test_frame_cells_count_their_bytes_and_the_schema_picks_image_tensors():
    cam = TensorInfo("cam", "uint8", (SIZE, SIZE, 3))
    rig = TensorInfo("rig", "uint8", (3, SIZE, SIZE, 3))
    schema = (TensorInfo("proprio", "float32", (4,)), cam, rig, TensorInfo("mask", "uint8", (4, 4)))
    assert [frames_per_step(t) for t in schema] == [None, 1, 3, None]
    assert compressed_names(schema, "compressed") == ("cam", "rig") and compressed_names(schema, "decoded") == ()
    enc = np.empty((2, 3), object)
    enc[:] = [[b"a" * 10, b"b" * 20, b"c"], [b"d", b"e", b"f" * 5]]
    assert to_cells(enc, rig, 2) is not None and cell_bytes(to_cells(enc, rig, 2)).tolist() == [31 + 3 * 33, 7 + 3 * 33]
    raw = to_cells(frames(2, SIZE, 0), cam, 2)
    assert raw.shape == (2, 1) and raw[0, 0].shape == (SIZE, SIZE, 3) and raw[0, 0].base is None  # own copies
    with pytest.raises(InvalidArgument) as err:
        to_cells(frames(2, SIZE + 1, 0), cam, 2)
    assert err.value.field == "obs[cam]"


def _sample_of(blobs: list) -> dict:
    cells = np.empty((len(blobs), 1), object)
    cells[:, 0] = blobs
    return {"obs": {"cam": cells, "proprio": np.arange(len(blobs), dtype=np.float32)[:, None]},
            "rewards": np.arange(len(blobs), dtype=np.float32), "steps": np.arange(len(blobs))}


@pytest.mark.parametrize("workers", [1, 3])
def test_decoder_matches_the_full_decode_and_drops_corrupt_rows(workers):
    imgs = frames(24, SIZE, 5)
    jpegs = image_codec.encode_frames(imgs, "jpeg")
    pngs = image_codec.encode_frames(imgs, "png")
    want_jpeg = image_codec.decode_frames(jpegs, imgs.shape, image_codec.JPEG, "f")
    blobs = [jpegs[i] if i % 3 else pngs[i] for i in range(24)]
    blobs[5] = imgs[5]  # a frame that arrived raw (stored decoded)
    blobs[7], blobs[20] = corrupt_body(jpegs[7]), _jpeg((8, 8))  # a corrupt body; another size (never past ingest)
    for name in ("pillow", "simplejpeg") if image_codec.simplejpeg_module() else ("pillow",):
        dec = FrameDecoder({"cam": (SIZE, SIZE, 3)}, workers=workers, decoder=name)
        parts, dropped = dec.decode_parts([("t", "online", _sample_of(blobs))])
        (_, _, s), = parts
        keep = [i for i in range(24) if i not in (7, 20)]
        assert dropped == 2 and s["steps"].tolist() == keep and s["obs"]["proprio"][:, 0].tolist() == keep
        cam = s["obs"]["cam"]
        assert cam.dtype == np.uint8 and cam.shape == (22, SIZE, SIZE, 3)
        for row, i in enumerate(keep):
            want = imgs[i] if i % 3 == 0 or i == 5 else want_jpeg[i]  # PNG and raw exact; JPEG as Pillow decodes it
            if name == "pillow" or i % 3 == 0 or i == 5:
                np.testing.assert_array_equal(cam[row], want, err_msg=f"{name} frame {i}")
            else:
                assert np.abs(cam[row].astype(int) - want.astype(int)).max() <= 2, (name, i)
        assert dec.stats()["dropped_rows"] == 2 and dec.stats()["frames"] == 24
        dec.close()
    everything_bad = FrameDecoder({"cam": (SIZE, SIZE, 3)}, workers=workers, decoder="pillow")
    assert everything_bad.decode_parts([("t", "online", _sample_of([b"\xff\xd8junk\xff\xd9"] * 3))]) == ([], 3)


def _core(tmp_path, name: str, **images) -> LearnerCore:
    cfg = LearnerConfig(job_id=JOB, state_dir=tmp_path / name, tasks=[TASK], device="cpu", batch_size=32, seed=3,
                        sampler={"mode": "fixed", "fixed_online_share": 1.0}, images=images,
                        **camera_specs(SIZE, ("cam", "wrist")))
    return LearnerCore(cfg)


def _feed(core: LearnerCore, encoding="jpeg", corrupt=()) -> None:
    for seq in range(6):
        c = camera_chunk(JOB, "a", "ep", seq, n=8, cameras=("cam", "wrist"), encoding=encoding,
                         corrupt=[(cam, step) for cam, s, step in corrupt if s == seq])
        core.ingest(c, c.ByteSize(), 0)


def _batches(core: LearnerCore, steps: int) -> list[dict]:
    seen = []
    core.hooks = replace(core.hooks, on_update=lambda batch, seconds: seen.append({k: v.clone() for k, v in batch.obs.items()}
                                                                        | {"actions": batch.actions.clone()}))
    for _ in range(steps):
        assert core.train_step() is not None
    core.stop(checkpoint=False)
    return seen


@pytest.mark.parametrize("encoding", ["jpeg", "png"])
def test_prefetched_batches_equal_synchronous_ones_and_ingest_decoded_storage(tmp_path, encoding):
    runs = {}
    for name, images in {"decoded": dict(storage="decoded"), "sync": dict(prefetch=0, decoder="pillow"),
                         "prefetch1": dict(prefetch=1, decoder="pillow", decode_workers=3),
                         "prefetch2": dict(prefetch=2, decoder="pillow", decode_workers=1)}.items():
        core = _core(tmp_path, name, **images)
        _feed(core, encoding)
        on = core.replay.stats()[TASK]
        assert on["online_steps"] == 48
        assert core.replay.compressed == (() if name == "decoded" else ("cam", "wrist"))
        assert core.batches.prefetch == (0 if name in ("decoded", "sync") else images["prefetch"])
        runs[name] = _batches(core, 5)
    ref = runs.pop("decoded")
    for name, got in runs.items():
        assert len(got) == len(ref) == 5
        for a, b in zip(ref, got):
            assert set(a) == set(b) == {"proprio", "cam", "wrist", "actions"}
            for k in a:
                assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (name, k)
                assert bool((a[k] == b[k]).all()), (name, k)


def test_compressed_ring_holds_fewer_bytes_than_decoded(tmp_path):
    compressed, decoded = _core(tmp_path, "c"), _core(tmp_path, "d", storage="decoded")
    for core in (compressed, decoded):
        _feed(core)
    c, d = compressed.replay.nbytes(TASK, "online"), decoded.replay.nbytes(TASK, "online")
    ring = compressed.replay._buffers[(TASK, "online")]
    frame_bytes = sum(len(f) + 33 for s in range(6) for cam in ("cam", "wrist")
                      for f in camera_chunk(JOB, "a", "ep", s, n=8, cameras=("cam", "wrist")).observations[cam].frames)
    assert ring.frame_bytes == frame_bytes and c == ring.frame_bytes + sum(a.nbytes for a in ring.data.values()) \
        + ring.iv_slots.nbytes + ring.sampled.nbytes
    assert c < d
    exported = compressed.replay.export(TASK, "online")
    assert exported["obs.cam"].dtype == object and isinstance(exported["obs.cam"][0, 0], bytes)
    compressed.stop(checkpoint=False)
    decoded.stop(checkpoint=False)


def test_corrupt_frame_is_acked_then_dropped_from_batches_and_counted(tmp_path):
    core = _core(tmp_path, "corrupt", prefetch=0)
    _feed(core, corrupt=[("wrist", 2, 3)])  # chunk 2, step 3: episode step 19
    assert core.replay.stats()[TASK]["online_steps"] == 48  # stored: only its body is bad
    sampled_19 = []
    orig = core.batches.decoder.decode_parts

    def spy(parts):
        sampled_19.append(sum(int((s["steps"] == 19).sum()) for _, _, s in parts))
        return orig(parts)
    core.batches.decoder.decode_parts = spy
    trained = []
    core.hooks = replace(core.hooks, on_update=lambda batch, seconds: trained.append(
        (len(batch), int((batch.obs["wrist"] == 0).all(dim=(1, 2, 3)).sum()))))
    for _ in range(20):
        assert core.train_step() is not None
    core.stop(checkpoint=False)
    hits = sum(sampled_19)
    assert hits > 0, "the corrupt row was never sampled (seeded: it is)"
    counted = core.metrics.registry.get_sample_value("fleetloop_learner_dropped_samples_total",
                                                      {"job": JOB, "reason": "corrupt_frame"})
    assert counted == hits and core.batches.stats()["dropped_rows"] == hits
    assert [n for n, _ in trained] == [32 - k for k in sampled_19]  # each batch lost exactly its corrupt rows
    assert all(blank == 0 for _, blank in trained)


def test_batch_source_without_compressed_frames_is_the_plain_step():
    calls = []
    src = BatchSource(lambda: calls.append(1) or [("t", "online", {"rewards": np.zeros(1)})], None, prefetch=3)
    assert src.prefetch == 0 and src.next()[0][0] == "t" and len(calls) == 1 and src.stats() == {}
    src.close()


def test_recap_bootstrap_frames_are_decoded_too():
    """RECAP's ``recap_next_obs.<cam>`` comes out of a compressed ring as cells and is decoded like ``obs``."""
    from learner.algorithms.value import episode_targets
    from learner.replay import ReplayStore

    schema = (TensorInfo("proprio", "float32", (4,)), TensorInfo("cam", "uint8", (SIZE, SIZE, 3)))
    store = ReplayStore([TASK], schema, 2, online_capacity=100, compressed=("cam",),
                        episode_targets=lambda length, outcome: episode_targets(length, outcome, 20, 3))
    imgs = frames(12, SIZE, 9)
    pngs = np.empty(12, object)
    pngs[:] = image_codec.encode_frames(imgs, "png")
    proprio = np.zeros((12, 4), np.float32)
    proprio[:, 0] = np.arange(12)
    store.add_online(TASK, {"proprio": proprio, "cam": pngs}, np.zeros((12, 2), np.float32), np.zeros(12, np.float32),
                     np.zeros(12, bool), behavior_version=0, episode_key=0, first_step=0)
    store.end_episode(TASK, 0, "failure", 12)
    sample = store.sample(TASK, "online", 200, np.random.default_rng(0))
    assert sample["recap_next_obs.cam"].dtype == object
    (_, _, out), = FrameDecoder({"cam": (SIZE, SIZE, 3)}, 2, "auto").decode_parts([(TASK, "online", sample)])[0]
    nxt = out["recap_next_obs.cam"]
    assert nxt.dtype == np.uint8 and nxt.shape == (200, SIZE, SIZE, 3)
    rows = out["recap_next_obs.proprio"][:, 0].astype(int)  # the bootstrap row's step
    boot = out["recap_adv_valid"] & (out["recap_bootstrap"] > 0)
    assert boot.any() and (rows[boot] > out["steps"][boot]).all()
    np.testing.assert_array_equal(nxt, imgs[rows])  # PNG: each row's bootstrap frame, byte-exact
    np.testing.assert_array_equal(out["obs"]["cam"], imgs[out["steps"]])


@settings(max_examples=150, deadline=None)
@given(data=st.data(), encoding=st.sampled_from(["jpeg", "png"]))
def test_mutated_frames_are_refused_clearly_or_stored_and_never_crash_a_batch(data, encoding):
    """Any byte mutation of a frame: the header check refuses it naming the frame and showing the
    value, or accepts it; an accepted frame then decodes or drops its row, nothing else."""
    chunk = camera_chunk(JOB, "a", "e", 0, n=2, encoding=encoding)
    blob = bytearray(chunk.observations["cam"].frames[1])
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(blob) - 1))
        if kind == "flip":
            blob[at] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del blob[at:at + data.draw(st.integers(1, 64))]
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        if not blob:
            blob = bytearray(b"\x00")
    chunk.observations["cam"].frames[1] = bytes(blob)
    try:
        decoded = validate(chunk, JOB, {TASK}, OBS, ACT, 0, keep_encoded=True)
    except InvalidArgument as err:
        assert err.field == "observations[cam].frames[1]" and err.field in str(err) and str(err.value) in str(err)
        return
    cells = np.empty((2, 1), object)
    cells[:, 0] = decoded.obs["cam"]
    sample = {"obs": {"cam": cells}, "rewards": np.zeros(2, np.float32), "steps": np.arange(2)}
    (parts, dropped) = FrameDecoder({"cam": (SIZE, SIZE, 3)}, 1, "auto").decode_parts([(TASK, "online", sample)])
    assert dropped in (0, 1) and parts[0][2]["steps"].tolist() == ([0, 1] if dropped == 0 else [0])
    assert parts[0][2]["obs"]["cam"].dtype == np.uint8


def test_decoder_setting_falls_back_to_pillow_and_refuses_a_missing_simplejpeg(monkeypatch):
    from learner.config import ImageConfig

    cam = [TensorInfo("cam", "uint8", (SIZE, SIZE, 3))]
    monkeypatch.setattr(image_codec, "_simplejpeg", False)
    assert BatchSource.build(lambda: None, cam, ("cam",), ImageConfig(), print).decoder.decoder == "pillow"
    with pytest.raises(InvalidArgument) as err:
        BatchSource.build(lambda: None, cam, ("cam",), ImageConfig(decoder="simplejpeg"), print)
    assert err.value.field == "images.decoder" and "not installed" in str(err.value)
    assert BatchSource.build(lambda: None, cam, (), ImageConfig(), print).decoder is None  # nothing compressed
