"""Where the robot learner step gets its sampled parts: sampled under the ingest lock, compressed
frames decoded outside it (:class:`learner.frames.FrameDecoder`), optionally batches ahead.

:class:`BatchSource` wraps the learner's locked sampling (``sample``: plan + replay samples under the
ingest lock, :meth:`learner.core.LearnerCore._locked_sample`). Without compressed frames it only
calls it: the step is exactly the synchronous one. With compressed frames each call's parts are
decoded after the lock is released, and with ``prefetch`` = P > 0 the next P batches are sampled
and decoded in one background thread while the caller trains on the current one.

Contract with prefetch:

- Order and randomness: every batch is produced by the same background thread, one after another,
  and the caller never samples itself while one is pending, so the learner's RNG is drawn in the
  same order as without prefetch: for a given seed the batches are the same as synchronous ones
  whenever the plan does not depend on losses observed in between (the adaptive sampler's plan for
  batch k+1 is made while update k runs, so it sees losses up to update k-1; the learner records
  losses under the ingest lock, so a plan never reads the sampler while it is being updated).
- Staleness: a prefetched batch carries stored behaviour versions; the staleness gate runs when the
  caller assembles it (:func:`learner.assemble.gated_batch` via ``LearnerCore._assemble``), with the
  version current *then*, exactly as for a synchronous batch.
- Rows are marked sampled when they are drawn (one step early); a batch that found nothing to train
  on (None) is not followed by a prefetch: the next call samples synchronously again.
- An exception while producing a batch is raised by the :meth:`next` call that takes it.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

from fleetloop.errors import InvalidArgument
from fleetloop.specs import TensorInfo
from learner.frames import FrameDecoder

Part = tuple[str, str, dict[str, Any]]


class BatchSource:
    """Sampled (and decoded) parts for the learner step; see the module docstring."""

    def __init__(self, sample: Callable[[], list[Part] | None], decoder: FrameDecoder | None = None, prefetch: int = 0,
                 on_dropped: Callable[[int], None] | None = None) -> None:
        """``sample``: the learner's locked sampling; ``decoder``: None when nothing is stored
        compressed (then prefetch is off); ``on_dropped``: called with the rows dropped for a corrupt frame."""
        self._sample, self.decoder, self.on_dropped = sample, decoder, on_dropped
        self.prefetch = int(prefetch) if decoder is not None else 0
        self._pending: deque[Future] = deque()
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def build(cls, sample: Callable[[], list[Part] | None], observations: Sequence[TensorInfo], compressed: Sequence[str],
              images, on_dropped: Callable[[int], None]) -> "BatchSource":
        """The source for a job: a decoder for the ``compressed`` tensors (``images``: the
        :class:`learner.config.ImageConfig`: workers, decoder, prefetch), none without any."""
        if not compressed:
            return cls(sample)
        try:
            decoder = FrameDecoder({o.name: o.shape for o in observations if o.name in compressed}, images.decode_workers,
                                   images.decoder)
        except InvalidArgument as exc:  # simplejpeg asked for and not installed
            raise InvalidArgument(f"images.{exc}", field="images.decoder", value=images.decoder) from None
        return cls(sample, decoder, images.prefetch, on_dropped)

    def _produce(self) -> list[Part] | None:
        parts = self._sample()
        if parts is None or self.decoder is None:
            return parts
        parts, dropped = self.decoder.decode_parts(parts)
        if dropped and self.on_dropped is not None:
            self.on_dropped(dropped)
        return parts

    def next(self) -> list[Part] | None:
        """This step's parts (None: nothing to train on yet), then the next ``prefetch`` batches started."""
        parts = self._pending.popleft().result() if self._pending else self._produce()
        if parts is not None and self.prefetch:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="fleetloop-prefetch")
            while len(self._pending) < self.prefetch:
                self._pending.append(self._executor.submit(self._produce))
        return parts

    def stats(self) -> dict[str, Any]:
        """The decoder's totals (:meth:`FrameDecoder.stats`) and the prefetch depth; {} without a decoder."""
        return {} if self.decoder is None else {**self.decoder.stats(), "prefetch": self.prefetch}

    def close(self) -> None:
        """Cancel what is pending and stop the threads (idempotent)."""
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self.decoder is not None:
            self.decoder.close()
