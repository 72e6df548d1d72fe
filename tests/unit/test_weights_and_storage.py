"""Weights are content-addressed and verified; storage pieces are atomic and torn-write safe."""

import json

import numpy as np
import pytest
import torch

from fleetloop.errors import IntegrityError, NotFound
from fleetloop.weights import load_verified, sha256_hex, state_dict_to_blob
from learner.checkpoint import load_latest, save_checkpoint
from learner.ingest_log import IngestLog
from learner.ledger import Ledger, digest
from learner.weight_store import WeightStore


def _blob(seed=0):
    g = torch.Generator().manual_seed(seed)
    return state_dict_to_blob({"w": torch.randn(8, 4, generator=g), "b": torch.zeros(4)})


def test_tampered_blob_is_refused():
    blob = _blob()
    digest = sha256_hex(blob)
    assert set(load_verified(blob, digest)) == {"w", "b"}
    tampered = bytearray(blob)
    tampered[-1] ^= 0xFF
    with pytest.raises(IntegrityError, match="digest mismatch"):
        load_verified(bytes(tampered), digest)


def test_weight_store_versions_monotonic_across_restart_and_retention(tmp_path):
    store = WeightStore(tmp_path, keep_in_memory=2, keep_on_disk=3)
    infos = [store.publish(_blob(i), learner_step=10 * i) for i in range(6)]
    assert [i.version for i in infos] == list(range(6))
    assert store.blob(5) and store.blob(0)  # newest and v0 kept
    with pytest.raises(NotFound):
        store.info(1)  # pruned
    again = WeightStore(tmp_path, keep_on_disk=3)
    assert again.publish(_blob(9), 99).version == 6
    assert sha256_hex(again.blob(6)) == again.info(6).sha256


def test_pin_and_rollback(tmp_path):
    store = WeightStore(tmp_path)
    for i in range(3):
        store.publish(_blob(i), i)
    store.pin(1)
    assert store.fleet_version().version == 1 and store.latest.version == 2
    store.pin(None)
    assert store.fleet_version().version == 2
    with pytest.raises(NotFound):
        store.pin(42)


def test_ingest_log_truncates_torn_tail(tmp_path):
    log = IngestLog(tmp_path / "ingest.log")
    for i in range(3):
        log.append(f"record-{i}".encode())
    log.close()
    with open(tmp_path / "ingest.log", "ab") as fh:
        fh.write(b"FLR1\x10\x00\x00\x00garbage")  # a torn append
    assert list(IngestLog(tmp_path / "ingest.log").replay()) == [b"record-0", b"record-1", b"record-2"]
    assert list(IngestLog(tmp_path / "ingest.log").replay()) == [b"record-0", b"record-1", b"record-2"]


def test_ledger_exactly_once():
    """Key (actor, episode, seq): stored once; a byte-identical resend is a duplicate, other content under a
    stored key, a first_step jump or a chunk after the episode's end are refused naming the field."""
    from fleetloop.errors import FailedPrecondition, InvalidArgument
    led = Ledger()
    a, b = digest(b"chunk-0"), digest(b"chunk-1")
    assert led.check("r1", "ep", 0, 0, False, a) == 0
    led.record("r1", "ep", 0, 0, 10, False, a)
    assert led.check("r1", "ep", 0, 0, False, a) is True                    # resend: duplicate
    assert led.seen("r1", "ep", 0) and not led.seen("r1", "ep", 1) and not led.seen("r2", "ep", 0)
    assert led.check("r2", "ep", 0, 0, False, b) == 0                   # another actor's episode: new
    with pytest.raises(FailedPrecondition) as info:                         # same key, other content
        led.check("r1", "ep", 0, 0, False, b)
    assert info.value.field == "seq" and "'r1'" in str(info.value) and "'ep'" in str(info.value)
    with pytest.raises(InvalidArgument) as info:                            # first_step jump
        led.check("r1", "ep", 1, 15, False, b)
    assert info.value.field == "first_step" and "expected 10" in str(info.value)
    led.record("r1", "ep", 1, 10, 0, True, b)                                # the end
    with pytest.raises(FailedPrecondition) as info:
        led.check("r1", "ep", 2, 10, False, digest(b"after"))
    assert "follows the end" in str(info.value)


def test_ledger_gap_keeps_the_rest_of_the_episode_and_refuses_late_chunks():
    """A gap (chunks the actor set aside) is accepted and reported; a skipped seq arriving later is out of
    order; the first_step after a gap may not go back; an absurd gap is refused."""
    from fleetloop.errors import FailedPrecondition, InvalidArgument
    from learner.ledger import MAX_GAP
    led = Ledger()
    led.record("r1", "ep", 0, 0, 10, False, digest(b"0"))
    with pytest.raises(InvalidArgument):
        led.check("r1", "ep", 3, 5, False, digest(b"3"))                    # goes back before step 10
    assert led.check("r1", "ep", 3, 30, False, digest(b"3")) == 2            # skips seq 1 and 2
    led.record("r1", "ep", 3, 30, 10, False, digest(b"3"))
    for late in (1, 2):
        with pytest.raises(FailedPrecondition) as info:
            led.check("r1", "ep", late, 10, False, digest(b"late"))
        assert "out of order" in str(info.value) and info.value.field == "seq"
    assert led.check("r1", "ep", 3, 30, False, digest(b"3")) is True          # the chunk after the gap resends fine
    with pytest.raises(FailedPrecondition) as info:
        led.check("r1", "ep", 5 + MAX_GAP, 40, False, digest(b"far"))
    assert "at most" in str(info.value)


def test_ledger_refused_chunk_lets_the_episode_go_on():
    """A chunk the learner refused is not recorded: a corrected resend is still the next one; if the actor
    set it aside instead, seq + 1 is accepted as a gap (first_step not below the stored steps), and the
    refused seq arriving after it is refused."""
    from fleetloop.errors import FailedPrecondition
    led = Ledger()
    led.record("r1", "ep", 0, 0, 5, False, digest(b"0"))
    assert led.check("r1", "ep", 1, 5, False, digest(b"1-fixed")) == 0   # (the refused seq 1, resent corrected)
    assert led.check("r1", "ep", 2, 9, False, digest(b"2")) == 1          # seq 1 set aside: one seq skipped
    led.record("r1", "ep", 2, 9, 5, False, digest(b"2"))
    with pytest.raises(FailedPrecondition):
        led.check("r1", "ep", 1, 5, False, digest(b"1-fixed"))
    assert not led.seen("r1", "ep", 1)


def test_checkpoint_round_trip_and_torn_skip(tmp_path):
    state = {"algorithm": {"w": torch.arange(6.0).reshape(2, 3), "opt": {"state": {0: {"m": torch.ones(2)}}, "lr": 0.1}},
             "sampler": {"x": [1, 2.5, None]}, "step": 7}
    save_checkpoint(tmp_path, 7, state)
    save_checkpoint(tmp_path, 9, {**state, "step": 9})
    step, loaded = load_latest(tmp_path)
    assert step == 9 and loaded["step"] == 9
    torch.testing.assert_close(loaded["algorithm"]["w"], state["algorithm"]["w"])
    assert loaded["algorithm"]["opt"]["state"][0]["m"].sum() == 2
    newest = sorted(tmp_path.glob("ckpt-*"))[-1] / "tensors.safetensors"
    newest.write_bytes(newest.read_bytes()[:-3])  # torn
    step, _ = load_latest(tmp_path)
    assert step == 7
