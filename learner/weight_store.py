"""WeightStore: versioned, content-addressed policy weights.

Invariants:
- retention: version 0 (the initial policy), a pinned version, every *kept* version
  (:meth:`WeightStore.keep`: an operator's "never delete this one", persisted in ``index.json`` so it
  survives restarts) and the newest ``keep_on_disk`` versions stay fetchable; older ones are deleted
  (their numbers are never reused);
- versions increase by exactly one per publish and never repeat (also across restarts: the store
  reloads its index from disk);
- a version's bytes are a safetensors blob whose sha256 is its identity; blobs are written
  atomically (write, fsync, rename) before they are announced;
- the *fleet version* is what actors should run: the newest version, or the operator's pin.

Subscribers block in :meth:`wait_for_change` with a timeout (never unbounded), so a server stream
notices cancellation promptly.

Hooks (issue 21, :mod:`learner.releases`): ``retain`` (a lock-free callable returning versions that
retention must also keep: the release channels' stable and candidate) and publish listeners
(:meth:`WeightStore.add_listener`: called with the new VersionInfo after every publish, in the
publisher's thread, with the store's lock released).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from fleetloop.dataset import atomic_write
from fleetloop.errors import NotFound
from fleetloop.weights import sha256_hex


@dataclass(frozen=True)
class VersionInfo:
    """Metadata of one published version."""

    version: int
    sha256: str
    size_bytes: int
    learner_step: int
    published_at: float


class WeightStore:
    """Keeps every version on disk (``DIR/v<version>.safetensors`` + ``index.json``) and the newest
    ``keep_in_memory`` blobs in memory for fast fan-out."""

    def __init__(self, root: Path, keep_in_memory: int = 8, keep_on_disk: int = 100) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._keep = keep_in_memory
        self._keep_disk = keep_on_disk
        self._next_version = 0
        self._cond = threading.Condition()
        self._blobs: OrderedDict[int, bytes] = OrderedDict()
        self._index: dict[int, VersionInfo] = {}
        self._pinned: int | None = None
        self._kept: set[int] = set()
        #: seconds of the last publish's sha256 and durable write (they run at the same time)
        self.last_publish_timings: dict[str, float] = {}
        #: versions retention must keep besides its own rules; called under the store's lock, so it must take none
        self.retain: Callable[[], frozenset[int]] | None = None
        self._listeners: list[Callable[[VersionInfo], None]] = []
        self._load_index()

    # -- persistence -------------------------------------------------------------------------
    def _index_path(self) -> Path:
        return self.root / "index.json"

    def _load_index(self) -> None:
        path = self._index_path()
        if not path.exists():
            return
        data = json.loads(path.read_text())
        for item in data.get("versions", []):
            info = VersionInfo(**item)
            if (self.root / f"v{info.version}.safetensors").exists():
                self._index[info.version] = info
        self._pinned = data.get("pinned")
        self._kept = {int(v) for v in data.get("kept", []) if int(v) in self._index}
        self._next_version = int(data.get("next_version", max(self._index, default=-1) + 1))

    def _save_index(self) -> None:
        data = {"versions": [asdict(v) for v in sorted(self._index.values(), key=lambda v: v.version)],
                "pinned": self._pinned, "kept": sorted(self._kept), "next_version": self._next_version}
        atomic_write(self._index_path(), json.dumps(data).encode())

    # -- publishing --------------------------------------------------------------------------
    def add_listener(self, fn: Callable[[VersionInfo], None]) -> None:
        """Call ``fn(info)`` after every publish (publisher's thread, store lock released; its
        exceptions propagate to the publisher)."""
        self._listeners.append(fn)

    def publish(self, blob: bytes, learner_step: int) -> VersionInfo:
        """Store ``blob`` as the next version, wake subscribers, then tell the listeners. Returns its
        metadata (see :meth:`_publish`)."""
        info = self._publish(blob, learner_step)
        for fn in list(self._listeners):
            fn(info)
        return info

    def _publish(self, blob: bytes, learner_step: int) -> VersionInfo:
        """Store ``blob`` as the next version and wake subscribers. Returns its metadata.

        The sha256 and the durable write (write, fsync, rename) run at the same time, in two
        threads (both release the GIL), so publishing costs about the longer of the two, not their
        sum; subscribers are woken only after both finished (announced = durable)."""
        with self._cond:
            version = self._next_version
            self._next_version += 1
            digest: list[str] = []
            t0 = time.monotonic()
            took: dict[str, float] = {}

            def _hash() -> None:
                digest.append(sha256_hex(blob))
                took["sha256_s"] = time.monotonic() - t0

            hasher = threading.Thread(target=_hash, name="fleetloop-publish-sha256", daemon=True)
            hasher.start()
            try:
                atomic_write(self.root / f"v{version}.safetensors", blob)
                took["write_fsync_s"] = time.monotonic() - t0
            finally:
                hasher.join()
            self.last_publish_timings = took
            if not digest:
                raise RuntimeError(f"sha256 of version {version} failed ({len(blob)} bytes)")
            info = VersionInfo(version, digest[0], len(blob), learner_step, time.time())
            self._index[version] = info
            self._blobs[version] = blob
            while len(self._blobs) > self._keep:
                self._blobs.popitem(last=False)
            self._prune()
            self._save_index()
            self._cond.notify_all()
            return info

    @property
    def keep_on_disk(self) -> int:
        """How many of the newest versions stay on disk (besides version 0 and a pinned one)."""
        return self._keep_disk

    @keep_on_disk.setter
    def keep_on_disk(self, n: int) -> None:
        if int(n) < 1:
            raise ValueError(f"keep_on_disk {n} must be >= 1")
        with self._cond:
            self._keep_disk = int(n)

    def _prune(self) -> None:
        """Keep version 0, the pinned version, the kept versions, the ``retain()`` versions and the newest
        ``keep_on_disk`` versions on disk."""
        old = sorted(self._index)[:-self._keep_disk]
        retained = self.retain() if self.retain is not None else frozenset()
        for v in old:
            if v in (0, self._pinned) or v in self._kept or v in retained:
                continue
            del self._index[v]
            (self.root / f"v{v}.safetensors").unlink(missing_ok=True)

    def pin(self, version: int | None) -> None:
        """Pin the fleet to ``version`` (roll back / hold), or unpin with None."""
        with self._cond:
            if version is not None and version not in self._index:
                raise NotFound(f"unknown policy version {version}", field="version", value=version)
            self._pinned = version
            self._save_index()
            self._cond.notify_all()

    def keep(self, version: int, keep: bool = True) -> bool:
        """Mark ``version`` kept (retention never deletes it) or release it (``keep=False``; it is then
        pruned at once if retention no longer holds it). Persisted in ``index.json``. NotFound names
        a version that is not retained (unknown or already pruned). Returns whether the mark changed."""
        with self._cond:
            if version not in self._index:
                raise NotFound(f"unknown policy version {version} (never published or pruned)", field="version",
                               value=version)
            if (version in self._kept) == bool(keep):
                return False
            if keep:
                self._kept.add(version)
            else:
                self._kept.discard(version)
                self._prune()
            self._save_index()
            return True

    @property
    def kept(self) -> frozenset[int]:
        """Versions an operator marked kept (never pruned)."""
        with self._cond:
            return frozenset(self._kept)

    # -- reading -----------------------------------------------------------------------------
    @property
    def latest(self) -> VersionInfo | None:
        """Newest published version, or None before the first publish."""
        with self._cond:
            return self._index[max(self._index)] if self._index else None

    @property
    def pinned(self) -> int | None:
        """The pinned version, if any."""
        return self._pinned

    def fleet_version(self) -> VersionInfo | None:
        """What actors should run: the pinned version if set, else the newest."""
        with self._cond:
            if self._pinned is not None:
                return self._index[self._pinned]
            return self._index[max(self._index)] if self._index else None

    def info(self, version: int) -> VersionInfo:
        """Metadata of ``version``; NotFound names it."""
        try:
            return self._index[version]
        except KeyError:
            raise NotFound(f"unknown policy version {version}", field="version", value=version) from None

    def versions(self) -> list[VersionInfo]:
        """All versions, oldest first."""
        with self._cond:
            return sorted(self._index.values(), key=lambda v: v.version)

    def blob(self, version: int) -> bytes:
        """The bytes of ``version`` (memory, else disk)."""
        info = self.info(version)
        with self._cond:
            cached = self._blobs.get(version)
        if cached is not None:
            return cached
        return (self.root / f"v{info.version}.safetensors").read_bytes()

    def wait_for_change(self, known: tuple[int, bool] | None, timeout: float) -> VersionInfo | None:
        """Block until the fleet version differs from ``known`` = (version, pinned) or ``timeout``
        passes; returns the current fleet version (which may equal ``known`` after a timeout)."""
        def current() -> tuple[int, bool] | None:
            fv = self.fleet_version()
            return None if fv is None else (fv.version, self._pinned is not None)

        with self._cond:
            self._cond.wait_for(lambda: current() != known, timeout=timeout)
        return self.fleet_version()
