"""ReplayStore with a camera: schema [proprio float32[8], cam uint8[16, 16, 3]].

Camera frames stay uint8 end to end (add/sample, export/restore, RECAP's bootstrap observation, the
batch), memory is capacity x bytes_per_step once a ring is full, eviction counts are those of a
vector store, and a camera tensor that does not match the schema is refused naming ``obs[<name>]``.

Rows carry (value, episode) in proprio[:, 0:2] and the value in the frame's first two bytes, so a
check can tell each row's frame belongs to it; the rest of each frame is random bytes (0..255)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleetloop.errors import InvalidArgument
from fleetloop.specs import TensorInfo
from learner.algorithms.value import episode_targets
from learner.batch import OFFLINE, ONLINE, Batch
from learner.replay import FIELDS, TARGET_COLUMNS, Eviction, ReplayStore
from learner.ring import bytes_per_step

SCHEMA = (TensorInfo("proprio", "float32", (8,)), TensorInfo("cam", "uint8", (16, 16, 3)))
ACT, MAX_LEN, N = 2, 20, 4


def frames(first, t, ep=0, seed=None):
    """A chunk of ``t`` steps valued first..first+t-1: obs mapping, actions, rewards."""
    rng = np.random.default_rng(first * 1000 + ep if seed is None else seed)
    values = np.arange(first, first + t)
    cam = rng.integers(0, 256, (t, 16, 16, 3), dtype=np.uint8)
    cam[:, 0, 0, 0], cam[:, 0, 0, 1] = values // 256, values % 256
    proprio = rng.normal(size=(t, 8)).astype(np.float32)
    proprio[:, 0], proprio[:, 1] = values, ep
    return {"proprio": proprio, "cam": cam}, np.zeros((t, ACT), np.float32), np.arange(t, dtype=np.float32)


def cam_value(cam):
    return cam[:, 0, 0, 0].astype(int) * 256 + cam[:, 0, 0, 1].astype(int)


def add(store, ep, first, t, iv=None, key=None):
    obs, act, rew = frames(first, t, ep)
    inter = np.zeros(t, bool) if iv is None else np.asarray(iv, bool)
    return store.add_online("a", obs, act, rew, inter, behavior_version=0, episode_key=ep if key is None else key,
                            first_step=first)


def test_uint8_frames_round_trip_byte_exact_through_add_and_sample():
    s = ReplayStore(["a"], SCHEMA, ACT, online_capacity=100, offline_capacity=100)
    obs, act, rew = frames(0, 30, seed=1)
    s.add_online("a", obs, act, rew, np.zeros(30, bool), behavior_version=1, episode_key=0, first_step=0)
    demo, dact, drew = frames(0, 12, seed=2)
    s.add_offline("a", demo, dact, drew, np.ones(12, bool))
    rng = np.random.default_rng(0)
    for source, src, n in (("online", obs, 30), ("offline", demo, 12)):
        out = s.sample("a", source, 300, rng)
        assert set(out) == set(FIELDS) and set(out["obs"]) == {"proprio", "cam"}
        cam, proprio = out["obs"]["cam"], out["obs"]["proprio"]
        assert cam.dtype == np.uint8 and cam.shape == (300, 16, 16, 3)
        assert proprio.dtype == np.float32 and proprio.shape == (300, 8)
        assert set(out["steps"]) == set(range(n))  # every row drawn: the byte check covers them all
        np.testing.assert_array_equal(cam, src["cam"][out["steps"]])
        np.testing.assert_array_equal(proprio, src["proprio"][out["steps"]])
        out["obs"]["cam"][:] = 0  # samples are copies: the stored frames are untouched
        again = s.sample("a", source, 50, rng)
        np.testing.assert_array_equal(again["obs"]["cam"], src["cam"][again["steps"]])
    assert s.sample("a", "online", 0, rng)["obs"]["cam"].shape == (0, 16, 16, 3)


def test_export_restore_keeps_uint8_frames_byte_exact():
    s = ReplayStore(["a"], SCHEMA, ACT, online_capacity=20)
    add(s, 1, 0, 15, iv=np.arange(15) % 4 == 0)
    add(s, 1, 15, 10)  # wraps: steps 5..24 live
    exp = s.export("a", "online")
    assert {"obs.proprio", "obs.cam"} <= set(exp) and "obs" not in exp
    assert exp["obs.cam"].dtype == np.uint8 and exp["obs.cam"].shape == (20, 16, 16, 3)
    np.testing.assert_array_equal(cam_value(exp["obs.cam"]), np.arange(5, 25))
    whole = np.concatenate([frames(0, 15, 1)[0]["cam"], frames(15, 10, 1)[0]["cam"]])
    np.testing.assert_array_equal(exp["obs.cam"], whole[5:])
    t = ReplayStore(["a"], SCHEMA, ACT, online_capacity=20)
    t.restore("a", "online", exp, evicted=5)
    for k, v in s.export("a", "online").items():
        got = t.export("a", "online")[k]
        assert got.dtype == v.dtype, k
        np.testing.assert_array_equal(got, v, err_msg=k)
    assert t.stats()["a"]["online_evicted"] == 5 and t.size("a", "online", True) == s.size("a", "online", True) == 2


def test_nbytes_once_full_is_capacity_times_bytes_per_step():
    cap = 2500  # past the first allocation (1024): grows geometrically, then stops at the capacity
    s = ReplayStore(["a"], SCHEMA, ACT, online_capacity=cap, offline_capacity=cap)
    per_step = bytes_per_step(SCHEMA, ACT)
    assert per_step == 8 * 4 + 16 * 16 * 3 + bytes_per_step(0, ACT)  # proprio f32, frames one byte per value
    assert s.nbytes() == 0  # nothing allocated before the first add
    for i in range(30):
        add(s, i, 0, 100)
        assert s.nbytes("a", "online") <= cap * per_step
    assert s.size("a", "online") == cap
    assert s.nbytes("a", "online") == s.stats()["a"]["online_bytes"] == cap * per_step
    assert s.nbytes("a", "offline") == 0 and s.nbytes() == cap * per_step
    add(s, 99, 0, 700)  # wrapping allocates nothing more
    assert s.nbytes("a", "online") == cap * per_step


def test_eviction_counting_is_unchanged_by_images():
    cap = 37
    s = ReplayStore(["a"], SCHEMA, ACT, online_capacity=cap)
    rng = np.random.default_rng(0)
    history, value, evicted = [], 0, 0
    for i in range(60):
        t = int(rng.integers(1, 20))
        iv = rng.random(t) < 0.3
        evicted += add(s, i, value, t, iv=iv).evicted
        history += [(value + j, bool(iv[j])) for j in range(t)]
        value += t
        live = history[-cap:]
        assert s.size("a", "online") == len(live)
        assert s.size("a", "online", interventions_only=True) == sum(f for _, f in live)
        assert s.stats()["a"]["online_evicted"] == evicted == len(history) - len(live)
        out = s.sample("a", "online", 200, rng)
        np.testing.assert_array_equal(cam_value(out["obs"]["cam"]), out["obs"]["proprio"][:, 0].astype(int))
        assert set(cam_value(out["obs"]["cam"])) <= {v for v, _ in live}
    # what an append evicted, and how much of it was never sampled
    s = ReplayStore(["a"], SCHEMA, ACT, online_capacity=8)
    assert add(s, 1, 0, 6) == Eviction(0, 0, 0, 0)
    s.sample("a", "online", 200, rng)  # all 6 rows drawn
    assert add(s, 2, 0, 6, iv=[1, 0, 1, 0, 0, 0]) == Eviction(4, 0, 0, 0)
    assert add(s, 3, 0, 8) == Eviction(8, 6, 2, 2)
    assert s.stats()["a"]["online_evicted_unsampled"] == 6 and s.stats()["a"]["online_evicted"] == 12


def targets_fn(length, outcome):
    return episode_targets(length, outcome, MAX_LEN, N)


def test_recap_next_obs_cam_is_the_bootstrap_rows_frame():
    s = ReplayStore(["a"], SCHEMA, ACT, online_capacity=500, offline_capacity=50, episode_targets=targets_fn)
    for first in range(0, 12, 3):  # two interleaved episodes: bootstrap rows are not neighbours in the ring
        add(s, 1, first, 3)
        add(s, 2, first, 3)
    s.end_episode("a", 1, "failure", 12)
    s.end_episode("a", 2, "aborted", 12)
    out = s.sample("a", "online", 2000, np.random.default_rng(0))
    assert set(out) == set(FIELDS) | set(TARGET_COLUMNS) | {"recap_next_obs.proprio", "recap_next_obs.cam"}
    nxt = out["recap_next_obs.cam"]
    assert nxt.dtype == np.uint8 and nxt.shape == (2000, 16, 16, 3)
    boot = out["recap_adv_valid"] & (out["recap_bootstrap"] > 0)
    assert boot.any() and (~boot).any()
    step, ep = out["steps"], out["obs"]["proprio"][:, 1].astype(int)
    for e, outcome in ((1, "failure"), (2, "aborted")):
        want = targets_fn(12, outcome)["recap_next_step"]
        ep_cams = np.concatenate([frames(f, 3, e)[0]["cam"] for f in range(0, 12, 3)])
        sel = boot & (ep == e)
        assert sel.any(), e
        np.testing.assert_array_equal(nxt[sel], ep_cams[want[step[sel]]])  # byte-exact bootstrap frame
    np.testing.assert_array_equal(nxt[~boot], out["obs"]["cam"][~boot])  # no bootstrap: the row's own frame
    np.testing.assert_array_equal(out["recap_next_obs.proprio"][:, 1], out["obs"]["proprio"][:, 1])  # same episode
    demo, dact, drew = frames(0, 6, 7)
    s.add_offline("a", demo, dact, drew, np.ones(6, bool), outcome="success")
    b = Batch.from_parts([(0, ONLINE, s.sample("a", "online", 5, np.random.default_rng(1))),
                          (0, OFFLINE, s.sample("a", "offline", 3, np.random.default_rng(2)))])
    nb = b.extra_obs("recap_next_obs")
    assert set(nb) == {"proprio", "cam"} and nb["cam"].dtype == torch.uint8 and nb["cam"].shape == (8, 16, 16, 3)
    assert nb["proprio"].dtype == torch.float32 and nb["proprio"].shape == (8, 8)


def test_batch_from_parts_keeps_uint8_frames_and_shapes():
    s = ReplayStore(["a", "b"], SCHEMA, ACT, online_capacity=50, offline_capacity=50)
    add(s, 1, 0, 10, iv=[1] + [0] * 9)
    demo, dact, drew = frames(0, 4, 5)
    s.add_offline("b", demo, dact, drew, np.ones(4, bool))
    rng = np.random.default_rng(0)
    parts = [(0, ONLINE, s.sample("a", "online", 6, rng)), (1, OFFLINE, s.sample("b", "offline", 3, rng))]
    b = Batch.from_parts(parts)
    assert len(b) == 9 and set(b.obs) == {"proprio", "cam"} and b.extra == {}
    assert b.obs["cam"].dtype == torch.uint8 and b.obs["cam"].shape == (9, 16, 16, 3)
    assert b.obs["proprio"].dtype == torch.float32 and b.obs["proprio"].shape == (9, 8)
    for name in ("cam", "proprio"):
        np.testing.assert_array_equal(b.obs[name].numpy(), np.concatenate([p[2]["obs"][name] for p in parts]))
    assert b.task.tolist() == [0] * 6 + [1] * 3 and b.source.tolist() == [ONLINE] * 6 + [OFFLINE] * 3
    sub = b.take(b.source == OFFLINE)
    assert sub.obs["cam"].dtype == torch.uint8 and sub.obs["cam"].shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(sub.obs["cam"].numpy(), parts[1][2]["obs"]["cam"])
    assert b.to("cpu").obs["cam"].dtype == torch.uint8
    flat = b.numpy()
    assert flat["obs.cam"].dtype == np.uint8 and flat["obs.cam"].shape == (9, 16, 16, 3)


@pytest.mark.parametrize("bad, field", [
    ({"cam": np.zeros((3, 16, 16, 4), np.uint8)}, "obs[cam]"),    # RGBA into an RGB camera
    ({"cam": np.zeros((3, 15, 16, 3), np.uint8)}, "obs[cam]"),    # wrong height
    ({"cam": np.zeros((2, 16, 16, 3), np.uint8)}, "obs[cam]"),    # fewer frames than steps
    ({"cam": None}, "obs[cam]"),                                   # camera missing
    ({"wrist_cam": np.zeros((3, 16, 16, 3), np.uint8)}, "obs[wrist_cam]"),  # camera the schema lacks
])
def test_wrong_or_unknown_camera_tensor_is_refused(bad, field):
    s = ReplayStore(["a"], SCHEMA, ACT, online_capacity=10, offline_capacity=10)
    obs, act, rew = frames(0, 3)
    obs = {k: v for k, v in {**obs, **bad}.items() if v is not None}
    with pytest.raises(InvalidArgument) as err:
        s.add_online("a", obs, act, rew, np.zeros(3, bool), 0, 0, 0)
    assert err.value.field == field and field[4:-1] in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        s.add_offline("a", obs, act, rew, np.zeros(3, bool))
    assert err.value.field == field
    with pytest.raises(InvalidArgument) as err:  # one bare array cannot fill two tensors
        s.add_online("a", frames(0, 3)[0]["proprio"], act, rew, np.zeros(3, bool), 0, 0, 0)
    assert err.value.field == "obs"
    assert s.size("a", "online") == s.size("a", "offline") == 0 and s.nbytes() == 0


# -- compressed storage: frame cells, byte-bounded FIFO eviction (learner.frames, learner.ring) ------------
def enc_frames(first, t, ep=0, size_of=lambda v: 100 + 37 * (v % 7)):
    """A chunk whose camera arrives encoded: one bytes frame per step, of a varying size, starting
    with its step value (the ring never decodes them)."""
    obs, act, rew = frames(first, t, ep)
    cells = np.empty(t, object)
    cells[:] = [int(v).to_bytes(4, "big") + bytes(size_of(int(v))) for v in range(first, first + t)]
    return {"proprio": obs["proprio"], "cam": cells}, act, rew


def cell_value(cells):
    return np.array([int.from_bytes(c[:4], "big") for c in cells.reshape(-1)])


def test_compressed_rows_keep_their_bytes_through_sample_export_and_restore():
    s = ReplayStore(["a"], SCHEMA, ACT, online_capacity=50, offline_capacity=50, compressed=("cam",))
    obs, act, rew = enc_frames(0, 20)
    s.add_online("a", obs, act, rew, np.arange(20) % 3 == 0, behavior_version=0, episode_key=0, first_step=0)
    raw, ract, rrew = frames(20, 5)  # the same camera arriving raw: stored as arrays (decoded) in cells
    s.add_online("a", raw, ract, rrew, np.zeros(5, bool), behavior_version=0, episode_key=0, first_step=20)
    demo, dact, drew = frames(0, 4, seed=3)
    s.add_offline("a", demo, dact, drew, np.ones(4, bool))  # offline: plain uint8 column
    out = s.sample("a", "online", 200, np.random.default_rng(0))
    cells = out["obs"]["cam"]
    assert cells.dtype == object and cells.shape == (200, 1) and "_frame_bytes" not in out
    enc = out["steps"] < 20
    assert (cell_value(cells[enc]) == out["steps"][enc]).all()
    np.testing.assert_array_equal(np.stack(cells[~enc, 0]), raw["cam"][out["steps"][~enc] - 20])
    assert s.sample("a", "offline", 3, np.random.default_rng(0))["obs"]["cam"].dtype == np.uint8
    ring = s._buffers[("a", "online")]
    sizes = [len(c) + 33 for c in obs["cam"]] + [16 * 16 * 3 + np.empty(0, np.uint8).__sizeof__()] * 5
    assert ring.frame_bytes == sum(sizes)
    assert s.nbytes("a", "online") == ring.frame_bytes + sum(a.nbytes for a in ring.data.values()) \
        + ring.iv_slots.nbytes + ring.sampled.nbytes
    exp = s.export("a", "online")
    assert exp["obs.cam"].dtype == object and "_frame_bytes" not in exp
    t = ReplayStore(["a"], SCHEMA, ACT, online_capacity=50, compressed=("cam",))
    t.restore("a", "online", exp)
    again = t.export("a", "online")
    assert all(x is y for x, y in zip(again["obs.cam"].reshape(-1), exp["obs.cam"].reshape(-1)))  # the same frames
    assert t._buffers[("a", "online")].frame_bytes == ring.frame_bytes
    with pytest.raises(InvalidArgument) as err:  # a store that decodes cannot take encoded frames
        ReplayStore(["a"], SCHEMA, ACT, online_capacity=50).add_online("a", obs, act, rew, np.zeros(20, bool), 0, 0, 0)
    assert err.value.field == "obs[cam]"
    with pytest.raises(InvalidArgument) as err:
        ReplayStore(["a"], SCHEMA, ACT, compressed=("proprio",))
    assert err.value.field == "compressed"


def test_compressed_ring_evicts_fifo_by_rows_and_bytes_within_its_budget():
    cap, budget = 60, 9000
    s = ReplayStore(["a"], SCHEMA, ACT, online_capacity=cap, compressed=("cam",))
    s.set_online_capacity(cap, max_bytes=budget)
    ring = s._buffers[("a", "online")]
    share = budget - cap * ring.row_bytes
    assert share > 0 and ring.row_bytes == bytes_per_step(SCHEMA, ACT, frames=("cam",))
    rng = np.random.default_rng(0)
    history, value, evicted, unsampled = [], 0, 0, 0
    for i in range(80):
        t = int(rng.integers(1, 12))
        iv = rng.random(t) < 0.3
        obs, act, rew = enc_frames(value, t)
        ev = s.add_online("a", obs, act, rew, iv, behavior_version=0, episode_key=i, first_step=value)
        evicted, unsampled = evicted + ev.evicted, unsampled + ev.unsampled
        history += [(value + j, bool(iv[j]), len(obs["cam"][j]) + 33) for j in range(t)]
        value += t
        # FIFO by rows and bytes: the live rows are the newest that fit both the capacity and the share
        live, used = [], 0
        for v, flag, size in reversed(history):
            if len(live) == cap or used + size > share:
                break
            live.insert(0, (v, flag, size))
            used += size
        assert s.size("a", "online") == len(live) and ring.frame_bytes == used
        assert s.nbytes("a", "online") <= budget
        assert s.size("a", "online", interventions_only=True) == sum(f for _, f, _ in live)
        assert s.stats()["a"]["online_evicted"] == evicted == len(history) - len(live)
        out = s.sample("a", "online", 50, rng) if i % 3 else None
        if out is not None:
            assert set(cell_value(out["obs"]["cam"])) <= {v for v, _, _ in live}
            assert (cell_value(out["obs"]["cam"]) == out["obs"]["proprio"][:, 0].astype(int)).all()
        gone = [w % cap for w in range(max(0, ring.written - cap), ring.written - ring.size)]
        assert all(ring.data["obs.cam"][g, 0] is None for g in gone)  # evicted frames are released at once
    assert s.stats()["a"]["online_evicted_unsampled"] == unsampled > 0
    # one chunk heavier than the share keeps its newest rows that fit; the rest count as evicted, unsampled
    big, bact, brew = enc_frames(10_000, 40, size_of=lambda v: 400)
    ev = s.add_online("a", big, bact, brew, np.zeros(40, bool), behavior_version=0, episode_key=999, first_step=0)
    fit = share // (404 + 33)
    room, older = share - fit * (404 + 33), []
    for v, _, size in reversed(live):  # then the newest older rows that still fit, FIFO
        if size > room:
            break
        older.insert(0, v)
        room -= size
    values = cell_value(s.export("a", "online")["obs.cam"]).tolist()
    assert values == older + list(range(10_040 - fit, 10_040)) and fit > 0
    assert ev.evicted == 40 - fit + len(live) - len(older) and ev.unsampled >= 40 - fit
    assert s.nbytes("a", "online") <= budget and ring.frame_bytes <= share
