"""Batch assembly for the robot learner step: sampled parts -> one gated :class:`~learner.batch.Batch`.

The step (:meth:`learner.core.LearnerCore.train_step`) samples one part per (task, source) under the
ingest lock; then, outside it: :func:`stack_parts` concatenates the parts into columns, the staleness
gate decides which rows stay (and their weights), :func:`gated_batch` builds the batch of the kept
rows and maps each (task, source) to its rows in the batch (for the per-group losses the sampler is
fed). :func:`sync_episode_ends` labels the replay rows of episodes whose outcome arrived (RECAP's
per-row targets) before a step samples. :func:`observe_many` records the staleness of many samples
in one histogram update.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from learner.batch import Batch, concat_samples, extra_keys

if TYPE_CHECKING:
    from learner.ingest import Ingestor
    from learner.replay import ReplayStore

#: One sampled part: (task, source, sample dict of :meth:`ReplayStore.sample`).
Part = tuple[str, str, dict[str, Any]]
GroupRows = dict[tuple[str, str], np.ndarray]


def observe_many(histogram, values: np.ndarray) -> None:
    """Observe every element of ``values`` in one prometheus ``Histogram`` child: the same buckets,
    sum and count as calling ``observe`` once per element, in one update per distinct value.

    Why: the learner observes the staleness of every online sample of every step; one ``observe``
    (plus a ``labels`` lookup) per sample was about a quarter of a CPU learner step (256 samples).
    Uses the client's bucket fields when it has them (prometheus_client's ``Histogram``), else
    falls back to ``observe`` per element."""
    if values.size == 0:
        return
    vals, counts = np.unique(values, return_counts=True)
    bounds, buckets, total = (getattr(histogram, a, None) for a in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None:
        for v in values.tolist():
            histogram.observe(float(v))
        return
    for v, c in zip(vals.tolist(), counts.tolist()):
        total.inc(float(v) * c)
        buckets[bisect.bisect_left(bounds, float(v))].inc(c)  # first bucket with v <= bound, as observe()


def sync_episode_ends(ingestor: Ingestor, replay: ReplayStore, seen: int) -> int:
    """Label the replay rows of online episodes whose outcome arrived after the first ``seen`` episode
    records (the caller holds the ingestor lock). Returns the number of records seen now."""
    total = ingestor.episodes_total
    if total == seen:
        return seen
    recs = list(itertools.islice(reversed(ingestor.episodes), total - seen))[::-1]  # newest first, then reordered
    for r in recs:
        key = ingestor.episode_key(r.actor_id, r.episode_id)  # the replay's episode key, assigned at ingest
        if key is not None:
            replay.end_episode(r.task_id, key, r.outcome, r.steps)
    return total


@dataclass
class Columns:
    """The parts of one step, concatenated: ``arrays`` (sample fields, ``task`` index, ``source``
    0 online / 1 offline, extra keys), each part's row span, and the extra keys (``recap_*``)."""

    arrays: dict[str, np.ndarray]
    spans: dict[tuple[str, str], tuple[int, int]]
    extra: tuple[str, ...]


def stack_parts(parts: Sequence[Part], tasks: Sequence[str]) -> Columns:
    """Concatenate non-empty ``parts``; sample keys beyond the standard fields
    (:func:`learner.batch.extra_keys`) are carried as extra columns."""
    task_index = {t: i for i, t in enumerate(tasks)}
    ext = tuple(extra_keys(parts[0][2]))
    arrays = concat_samples([s for _, _, s in parts], ext)
    spans, task_col, source_col = {}, [], []
    offset = 0
    for task, source, s in parts:
        n = len(s["rewards"])
        task_col.append(np.full(n, task_index[task], np.int64))
        source_col.append(np.full(n, 0 if source == "online" else 1, np.uint8))
        spans[(task, source)] = (offset, offset + n)
        offset += n
    arrays["task"], arrays["source"] = np.concatenate(task_col), np.concatenate(source_col)
    return Columns(arrays, spans, ext)


def gated_batch(cols: Columns, keep: np.ndarray, weights: np.ndarray) -> tuple[Batch, GroupRows]:
    """The batch of the kept rows (``keep`` has at least one True), and per (task, source) the batch
    row of each of its rows (-1: dropped)."""
    new_index = np.cumsum(keep) - 1
    groups = {key: np.where(keep[a:b], new_index[a:b], -1) for key, (a, b) in cols.spans.items()}
    sel: dict[str, Any] = {k: v[keep] for k, v in cols.arrays.items() if k != "obs"}
    sel["obs"] = {k: v[keep] for k, v in cols.arrays["obs"].items()}
    batch = Batch.from_numpy(obs=sel["obs"], actions=sel["actions"], task=sel["task"], interventions=sel["interventions"],
                             source=sel["source"], versions=sel["versions"], rewards=sel["rewards"], weights=weights[keep],
                             extra={k: sel[k] for k in cols.extra} or None)
    return batch, groups
