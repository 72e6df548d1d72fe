"""Feature statistics of a LeRobotDataset: per episode (``stats/<feature>/<stat>`` columns of
``meta/episodes``) and over the dataset (``meta/stats.json``).

Contract, per feature (the dataset's own and the defaults alike):

- stats ``min``, ``max``, ``mean``, ``std``, ``count`` and the quantiles ``q01 q10 q50 q90 q99``;
- a vector ``[D]`` feature: each stat an array ``[D]`` over the episode's frames (``min``/``max`` in the
  feature's dtype, the rest float64); ``count`` is ``[T]`` (frames);
- a visual feature: per-channel stats ``[C, 1, 1]`` of pixel values scaled to ``[0, 1]``, over up to
  :data:`MAX_IMAGE_SAMPLES` evenly spaced frames (frames larger than 300 pixels are subsampled by a
  stride first); ``count`` is the number of frames sampled.

:func:`aggregate` combines episode stats as LeRobot does: min of mins, max of maxes, count-weighted
mean, the pooled variance, count-weighted quantiles.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from fleetloop.lerobot.layout import Feature

QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
STATS = ("min", "max", "mean", "std", "count", *QUANTILES)
MAX_IMAGE_SAMPLES = 100
_LARGE_IMAGE, _TARGET_IMAGE = 300, 150


def _sample_frames(frames: np.ndarray) -> np.ndarray:
    """Up to MAX_IMAGE_SAMPLES evenly spaced frames ``[N, H, W, C]``, large ones subsampled by a stride."""
    t = frames.shape[0]
    idx = np.unique(np.round(np.linspace(0, t - 1, min(t, MAX_IMAGE_SAMPLES))).astype(np.int64))
    sample = frames[idx]
    h, w = sample.shape[1:3]
    if max(h, w) >= _LARGE_IMAGE:
        step = max(1, max(h, w) // _TARGET_IMAGE)
        sample = sample[:, ::step, ::step]
    return sample


def feature_stats(ft: Feature, frames: np.ndarray) -> dict[str, np.ndarray]:
    """One feature's stats over one episode's frames ``[T, *shape]`` (see the module docstring)."""
    if ft.is_visual:
        sample = _sample_frames(np.asarray(frames))
        flat = sample.reshape(-1, sample.shape[-1]).astype(np.float64) / 255.0
        out = _basic(flat, keep_dtype=False)
        out = {k: v.reshape(-1, 1, 1) for k, v in out.items()}
        out["count"] = np.array([sample.shape[0]], dtype=np.int64)
        return out
    arr = np.asarray(frames)
    flat = arr.reshape(arr.shape[0], -1)
    out = _basic(flat, keep_dtype=True)
    out["count"] = np.array([arr.shape[0]], dtype=np.int64)
    return out


def _basic(flat: np.ndarray, keep_dtype: bool) -> dict[str, np.ndarray]:
    """min/max (in the data's dtype when ``keep_dtype``), mean/std/quantiles (float64) over axis 0."""
    as_float = flat.astype(np.float64)
    out = {"min": flat.min(axis=0), "max": flat.max(axis=0)}
    if not keep_dtype:
        out = {k: v.astype(np.float64) for k, v in out.items()}
    out["mean"] = as_float.mean(axis=0)
    out["std"] = as_float.std(axis=0)
    qs = np.quantile(as_float, list(QUANTILES.values()), axis=0)
    out.update({k: qs[i] for i, k in enumerate(QUANTILES)})
    return out


def episode_stats(features: Mapping[str, Feature], frames: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Stats of every feature in ``features`` over one episode's ``frames`` (name -> ``[T, *shape]``)."""
    return {name: feature_stats(ft, frames[name]) for name, ft in features.items()}


def flatten(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """``{"stats/<feature>/<stat>": nested list}``: the episode columns of ``meta/episodes``."""
    return {f"stats/{name}/{k}": np.asarray(v).tolist() for name, per in stats.items() for k, v in per.items()}


def aggregate(per_episode: Iterable[Mapping[str, Mapping[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """Dataset stats from episode stats (module docstring); features missing from an episode are skipped."""
    episodes = list(per_episode)
    names = list(dict.fromkeys(n for ep in episodes for n in ep))
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        parts = [ep[name] for ep in episodes if name in ep]
        counts = np.stack([np.asarray(p["count"], dtype=np.float64) for p in parts])  # [E, 1]
        means = np.stack([np.asarray(p["mean"], dtype=np.float64) for p in parts])
        w = counts.reshape(-1, *([1] * (means.ndim - 1)))
        total = counts.sum()
        mean = (means * w).sum(axis=0) / total
        var = ((np.stack([np.asarray(p["std"], dtype=np.float64) for p in parts]) ** 2 + (means - mean) ** 2) * w).sum(0)
        agg = {"min": np.min(np.stack([p["min"] for p in parts]), axis=0),
               "max": np.max(np.stack([p["max"] for p in parts]), axis=0),
               "mean": mean, "std": np.sqrt(var / total), "count": np.array([int(total)], dtype=np.int64)}
        for q in QUANTILES:
            if all(q in p for p in parts):
                agg[q] = (np.stack([np.asarray(p[q], dtype=np.float64) for p in parts]) * w).sum(axis=0) / total
        out[name] = agg
    return out


def to_json(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """``meta/stats.json`` content: every stat as a (nested) list of plain numbers."""
    return {name: {k: np.asarray(v).tolist() for k, v in per.items()} for name, per in stats.items()}
