"""WeightStore.publish: sha256 and durable write at once (digest and bytes as before, timings
recorded), and ``keep_on_disk`` adjustable (version 0 always kept)."""

import hashlib

import pytest

from learner.weight_store import WeightStore


def test_publish_digest_timings_and_keep_on_disk(tmp_path):
    store = WeightStore(tmp_path, keep_in_memory=2)
    store.keep_on_disk = 2
    blobs = [bytes([i]) * (1000 + i) for i in range(5)]
    infos = [store.publish(b, i) for i, b in enumerate(blobs)]
    assert [i.version for i in infos] == [0, 1, 2, 3, 4]
    assert all(i.sha256 == hashlib.sha256(b).hexdigest() and i.size_bytes == len(b) for i, b in zip(infos, blobs))
    assert set(store.last_publish_timings) == {"sha256_s", "write_fsync_s"}
    assert sorted(p.name for p in tmp_path.glob("v*.safetensors")) == ["v0.safetensors", "v3.safetensors", "v4.safetensors"]
    assert store.blob(0) == blobs[0] and store.blob(3) == blobs[3]
    with pytest.raises(ValueError, match="keep_on_disk 0"):
        store.keep_on_disk = 0
