"""Camera frames kept compressed in the replay and decoded when a batch is built (``images.storage``).

**Storage.** With ``images.storage = "compressed"`` every observation tensor with an image layout
(uint8 ``[..., H, W, C]``, C in 1/3/4: what PNG and JPEG carry; :func:`frames_per_step`) is stored
in the online rings as *frame cells*: an object array ``[rows, k]``, k = frames per step
(``prod(shape[:-3])``, 1 for one camera ``[H, W, C]``). A cell holds the encoded frame as it arrived
(``bytes``; the ingest checked its header and end marker, :func:`fleetloop.image_codec.check_frames`)
or, for a frame that arrived raw, a copy of its uint8 ``[H, W, C]`` array (stored decoded, as
before). :func:`cell_bytes` is what each row's cells take in memory (payload plus the Python object
header), so the ring can bound its frames in bytes (:class:`learner.ring.Ring`). Offline buffers
(demos, loaded decoded) keep plain uint8 columns.

**Decoding.** A sampled row carries its cells; :meth:`FrameDecoder.decode_parts` turns them into
uint8 ``[N, *shape]`` (``obs[name]`` and RECAP's ``recap_next_obs.<name>``) outside the ingest lock,
split over ``images.decode_workers`` threads (simplejpeg and Pillow release the GIL while decoding).
A row with a frame that does not decode (a corrupt body passes the header check) is dropped from
its part and counted; the learner books it as ``dropped_samples_total{reason="corrupt_frame"}``.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import numpy as np

from fleetloop import image_codec
from fleetloop.errors import InvalidArgument
from fleetloop.specs import TensorInfo

#: Memory a cell takes beyond its payload: a ``bytes`` object's header; an owned ndarray's header.
BYTES_OVERHEAD = sys.getsizeof(b"")
ARRAY_OVERHEAD = sys.getsizeof(np.empty(0, np.uint8))
#: Compression assumed when a memory budget sizes compressed rings in rows (JPEG q90 of camera frames
#: is 6-15x smaller; the byte bound holds whatever the frames weigh, this only sets the row capacity).
ASSUMED_COMPRESSION = 16
_SAMPLE_OBS_PREFIX = "recap_next_obs."
_INLINE_FRAMES = 16  # fewer frames than this are decoded in the calling thread (a hand-off costs more)


def frames_per_step(info: TensorInfo) -> int | None:
    """Frames per step (``prod(shape[:-3])``) of a tensor that can be stored as frame cells: uint8
    ``[..., H, W, C]`` with H, W >= 1 and C in (1, 3, 4); None for any other tensor."""
    s = info.shape
    if info.dtype != "uint8" or len(s) < 3 or s[-1] not in (1, 3, 4) or s[-3] < 1 or s[-2] < 1:
        return None
    return math.prod(s[:-3])


def compressed_names(observations: Sequence[TensorInfo], storage: str) -> tuple[str, ...]:
    """The observation tensors stored as frame cells under ``storage`` ('compressed' or 'decoded')."""
    if storage != "compressed":
        return ()
    return tuple(o.name for o in observations if frames_per_step(o) is not None)


def to_cells(arr: Any, info: TensorInfo, t: int) -> np.ndarray:
    """Frame cells ``[t, k]`` of one tensor's rows: an object array of encoded frames (``[t, *shape[:-3]]``,
    as the ingest keeps them) is reshaped; a uint8 array ``[t, *shape]`` becomes one array copy per
    frame. InvalidArgument naming ``obs[<name>]`` on any other shape or content."""
    k, field = frames_per_step(info), f"obs[{info.name}]"
    if isinstance(arr, np.ndarray) and arr.dtype == object:
        if arr.shape[:1] != (t,) or arr.size != t * k:
            raise InvalidArgument(f"{field} must hold [{t}, {k}] frames, got shape {arr.shape}", field=field,
                                  value=list(arr.shape))
        cells = arr.reshape(t, k)
        if not all(isinstance(c, (bytes, np.ndarray)) for c in cells.flat):
            raise InvalidArgument(f"{field} frames must be bytes (encoded) or uint8 arrays", field=field, value="object")
        return cells
    a = np.asarray(arr, dtype=np.uint8)
    if a.ndim == 2 and a.shape[1:] == (info.size,):
        a = a.reshape(a.shape[0], *info.shape)
    if a.shape != (t, *info.shape):
        raise InvalidArgument(f"{field} must be [{t}, {', '.join(map(str, info.shape))}], got shape {a.shape}",
                              field=field, value=list(a.shape))
    flat = a.reshape(t * k, *info.shape[-3:])
    cells = np.empty(t * k, dtype=object)
    for i in range(t * k):
        cells[i] = flat[i].copy()
    return cells.reshape(t, k)


def cell_bytes(cells: np.ndarray) -> np.ndarray:
    """Bytes each row of frame cells ``[t, k]`` holds (int64 ``[t]``): payload plus object header."""
    sizes = [len(c) + BYTES_OVERHEAD if isinstance(c, bytes) else c.nbytes + ARRAY_OVERHEAD for c in cells.flat]
    return np.asarray(sizes, dtype=np.int64).reshape(cells.shape).sum(axis=1)


def _encoding_of(blob: bytes) -> int:
    return image_codec.PNG if blob[:4] == b"\x89PNG" else image_codec.JPEG


class FrameDecoder:
    """Decodes the frame cells of sampled parts (see the module docstring). Thread-safe for one
    caller at a time (the learner's batch source); keeps running totals for :meth:`stats`."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], workers: int = 2, decoder: str = "auto") -> None:
        """``shapes``: per compressed tensor name its per-step shape; ``workers``: decode threads (the
        caller's thread is one of them); ``decoder``: 'auto', 'pillow' or 'simplejpeg'."""
        self.shapes = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
        self.workers, self.decoder = max(1, int(workers)), image_codec.resolve_decoder(decoder)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.batches = self.frames = self.failed = 0
        self.seconds = 0.0  # wall time spent in decode_parts

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers - 1, thread_name_prefix="fleetloop-decode")
        return self._pool

    def decode_parts(self, parts: Sequence[tuple[Any, Any, dict[str, Any]]]) -> tuple[list, int]:
        """``parts`` (task, source, sample) with their frame cells decoded in place to uint8 arrays;
        rows with a frame that does not decode are removed (a part left empty is dropped). Returns
        (parts, rows dropped)."""
        t0 = time.perf_counter()
        jobs, per_part = [], []  # jobs: (cells [n*k], out [n*k, H, W, C], bad rows [n], k); per part: its job indices
        for _, _, sample in parts:
            mine = []
            for holder, key, name in self._keys(sample):
                cells = holder[key]
                if not (isinstance(cells, np.ndarray) and cells.dtype == object):
                    continue  # a buffer that stores decoded frames (offline)
                n, shape = cells.shape[0], self.shapes[name]
                out = np.empty((n, *shape), dtype=np.uint8)
                k = max(1, cells.size // n) if n else 1
                mine.append(len(jobs))
                jobs.append((cells.reshape(-1), out.reshape(-1, *shape[-3:]), np.zeros(n, bool), k))
                holder[key] = out
            per_part.append(mine)
        items = [(j, i) for j, job in enumerate(jobs) for i in range(job[0].size)]
        self._run(jobs, items)
        kept, dropped = [], 0
        for (task, source, sample), mine in zip(parts, per_part):
            bad = np.zeros(len(sample["rewards"]), bool)
            for j in mine:
                bad |= jobs[j][2]
            if bad.any():
                dropped += int(bad.sum())
                sample = _take(sample, ~bad)
            if len(sample["rewards"]):
                kept.append((task, source, sample))
        with self._lock:
            self.batches += 1
            self.frames += len(items)
            self.failed += dropped
            self.seconds += time.perf_counter() - t0
        return kept, dropped

    def _keys(self, sample: dict[str, Any]) -> list[tuple[dict, str, str]]:
        out = [(sample["obs"], name, name) for name in self.shapes if name in sample["obs"]]
        return out + [(sample, _SAMPLE_OBS_PREFIX + n, n) for n in self.shapes if _SAMPLE_OBS_PREFIX + n in sample]

    def _run(self, jobs: list, items: list[tuple[int, int]]) -> None:
        if self.workers == 1 or len(items) < _INLINE_FRAMES:
            self._decode(jobs, items)
            return
        per = -(-len(items) // self.workers)
        ranges = [items[i:i + per] for i in range(0, len(items), per)]
        futures = [self._executor().submit(self._decode, jobs, r) for r in ranges[1:]]
        self._decode(jobs, ranges[0])
        for f in futures:
            f.result()

    def _decode(self, jobs: list, items: list[tuple[int, int]]) -> None:
        for j, i in items:
            cells, out, bad, k = jobs[j]
            cell = cells[i]
            try:
                if isinstance(cell, bytes):
                    image_codec.decode_frame_into(cell, out[i], _encoding_of(cell), self.decoder)
                else:
                    out[i] = cell.reshape(out[i].shape)
            except Exception:  # corrupt body, wrong size: the row is dropped
                bad[i // k] = True

    def stats(self) -> dict[str, float]:
        """Totals so far: batches and frames decoded, rows dropped, wall seconds, ms per batch."""
        with self._lock:
            return {"batches": self.batches, "frames": self.frames, "dropped_rows": self.failed, "seconds": self.seconds,
                    "ms_per_batch": self.seconds / self.batches * 1e3 if self.batches else 0.0, "decoder": self.decoder,
                    "workers": self.workers}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _take(sample: dict[str, Any], keep: np.ndarray) -> dict[str, Any]:
    """The rows ``keep`` of every column of a replay sample (``obs`` per tensor)."""
    return {k: ({n: a[keep] for n, a in v.items()} if isinstance(v, dict) else v[keep]) for k, v in sample.items()}
