"""Write a LeRobotDataset v3.0 (the layout of :mod:`.layout`) from episodes in memory.

:func:`write_dataset` streams: it holds one episode at a time (plus one open parquet writer and one
open video encoder per camera), so memory is bounded by the largest episode.

Contract:

- ``root`` must not hold a dataset yet (``meta/info.json``): InvalidArgument naming ``root``;
- ``features`` are checked by :func:`~fleetloop.lerobot.layout.check_features` (odd video sizes are
  refused, not padded) and every episode by :func:`~fleetloop.lerobot.layout.check_frames`; an
  episode's ``extra`` keys become ``meta/episodes`` columns and must not shadow a standard column
  (InvalidArgument naming ``episodes[i].extra[<key>]``); at least one episode;
- task indices are given in order of first appearance; frame ``i`` of an episode has ``timestamp``
  ``i / fps``; ``index`` runs over the whole dataset;
- ``video`` features are encoded with ``vcodec`` (yuv420p, see :mod:`.video`), ``image`` features
  stored as PNG in the data parquet;
- data files, video files and the ``meta/episodes`` file are written first, ``meta/info.json`` last:
  a folder without it is an incomplete dataset. Returns the ``info.json`` dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fleetloop.errors import InvalidArgument
from fleetloop.lerobot import stats as stats_mod
from fleetloop.lerobot.layout import (CODEBASE_VERSION, DATA_PATH, DEFAULT_CHUNKS_SIZE, DEFAULT_DATA_FILE_MB,
                                      DEFAULT_VIDEO_FILE_MB, EPISODE_COLUMNS, INFO_PATH, STATS_PATH, VIDEO_PATH, Feature,
                                      LeRobotEpisode, check_features, check_frames, data_path, next_file, video_path)
from fleetloop.lerobot.meta import all_features, data_schema, write_episodes, write_json, write_tasks
from fleetloop.lerobot.png import encode_png
from fleetloop.lerobot.video import VideoWriter, check_vcodec, video_info

_RESERVED_PREFIXES = ("stats/", "videos/", "data/", "meta/")


class _DataFiles:
    """The data parquet files: one open writer, a new file once ``file_mb`` of rows were written."""

    def __init__(self, root: Path, schema: pa.Schema, file_mb: float, chunks_size: int) -> None:
        self.root, self.schema, self.limit = root, schema, file_mb * (1 << 20)
        self.chunks_size, self.chunk_index, self.file_index = chunks_size, 0, 0
        self.writer: pq.ParquetWriter | None = None
        self.bytes_in_file = 0

    def write(self, table: pa.Table) -> tuple[int, int]:
        """Append one episode's rows; returns the (chunk, file) index holding them."""
        if self.writer is None:
            path = self.root / data_path(self.chunk_index, self.file_index)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(path, self.schema, compression="snappy")
        self.writer.write_table(table)
        where = (self.chunk_index, self.file_index)
        self.bytes_in_file += table.nbytes
        if self.bytes_in_file >= self.limit:
            self.close()
            self.chunk_index, self.file_index = next_file(self.chunk_index, self.file_index, self.chunks_size)
        return where

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer, self.bytes_in_file = None, 0


def _column(ft: Feature, frames: np.ndarray, t: int) -> pa.Array:
    """One feature's data parquet column for an episode's frames."""
    if ft.dtype == "image":
        blobs = [encode_png(f) for f in np.asarray(frames, dtype=np.uint8)]
        return pa.StructArray.from_arrays([pa.array(blobs, pa.binary()), pa.array([None] * t, pa.string())],
                                          names=["bytes", "path"])
    arr = np.ascontiguousarray(np.asarray(frames).reshape(t, -1), dtype=ft.numpy_dtype)
    if tuple(ft.shape) == (1,):
        return pa.array(arr.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), ft.size)


def _check_extra(extra: Mapping[str, Any], i: int) -> dict[str, Any]:
    out = {}
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not key or key in EPISODE_COLUMNS or key.startswith(_RESERVED_PREFIXES):
            raise InvalidArgument(f"episodes[{i}].extra[{key}] shadows a standard meta/episodes column",
                                  field=f"episodes[{i}].extra[{key}]", value=key)
        out[key] = value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value
    return out


def progress_bar(enabled: bool, total: int | None, description: str = "lerobot episodes") -> Any:
    """A started rich progress bar on stderr with one task (``description``, ``total`` steps), or
    None when not ``enabled``; the caller advances task 0 and stops it."""
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True))
    bar.start()
    bar.add_task(description, total=total)
    return bar


def write_dataset(root: Path, episodes: Iterable[LeRobotEpisode], features: Mapping[str, Feature], fps: int,
                  robot_type: str | None = None, vcodec: str = "libx264", progress: bool = False) -> dict:
    """Write ``episodes`` as a LeRobotDataset v3.0 under ``root``; returns its ``info.json`` dict
    (contract: the module docstring)."""
    root = Path(root)
    if (root / INFO_PATH).exists():
        raise InvalidArgument(f"{root} already holds a dataset ({INFO_PATH}); write to a new folder", field="root",
                              value=str(root))
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps < 1:
        raise InvalidArgument(f"fps must be a positive integer, got {fps!r}", field="fps", value=fps)
    fps = int(fps)
    own = check_features(features)
    cams = [k for k, ft in own.items() if ft.dtype == "video"]
    if cams:
        check_vcodec(vcodec)
    root.mkdir(parents=True, exist_ok=True)
    feats = all_features(own)
    data = _DataFiles(root, data_schema(own), DEFAULT_DATA_FILE_MB, DEFAULT_CHUNKS_SIZE)
    videos = {k: VideoWriter(root, k, own[k].shape, fps, vcodec, DEFAULT_VIDEO_FILE_MB, DEFAULT_CHUNKS_SIZE) for k in cams}
    tasks: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    per_episode: list[dict[str, dict[str, np.ndarray]]] = []
    total = 0
    bar = progress_bar(progress, len(episodes) if hasattr(episodes, "__len__") else None)  # type: ignore[arg-type]
    try:
        for i, ep in enumerate(episodes):
            t = check_frames(own, ep, i)
            extra = _check_extra(ep.extra, i)
            task_index = tasks.setdefault(ep.task, len(tasks))
            frames = {k: np.asarray(ep.frames[k]).reshape(t, *own[k].shape) for k in own}
            frames.update(timestamp=(np.arange(t) / fps).astype(np.float32), frame_index=np.arange(t, dtype=np.int64),
                          episode_index=np.full(t, i, dtype=np.int64), index=np.arange(total, total + t, dtype=np.int64),
                          task_index=np.full(t, task_index, dtype=np.int64))
            cols = {k: _column(ft, frames[k], t) for k, ft in feats.items() if ft.dtype != "video"}
            chunk, file = data.write(pa.Table.from_pydict(cols, schema=data.schema))
            row: dict[str, Any] = {"episode_index": i, "tasks": [ep.task], "length": t, "data/chunk_index": chunk,
                                   "data/file_index": file, "dataset_from_index": total, "dataset_to_index": total + t}
            for k in cams:
                row.update(videos[k].add_episode(frames[k]))
            ep_stats = stats_mod.episode_stats(feats, frames)
            per_episode.append(ep_stats)
            row.update(stats_mod.flatten(ep_stats))
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0, **extra})
            rows.append(row)
            total += t
            if bar is not None:
                bar.update(bar.task_ids[0], advance=1)
    finally:
        data.close()
        for writer in videos.values():
            writer.close()
        if bar is not None:
            bar.stop()
    if not rows:
        raise InvalidArgument("no episodes to write", field="episodes", value=0)
    try:
        write_episodes(root, rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InvalidArgument(f"episode extra columns do not share one type per column ({exc})", field="episodes.extra",
                              value=None) from None
    write_tasks(root, list(tasks))
    write_json(root / STATS_PATH, stats_mod.to_json(stats_mod.aggregate(per_episode)))
    info_features: dict[str, Any] = {}
    for k, ft in feats.items():
        info_features[k] = ft.info()
        if ft.dtype == "video":
            info_features[k]["info"] = video_info(root / video_path(k, 0, 0))
    info = {"codebase_version": CODEBASE_VERSION, "robot_type": robot_type, "total_episodes": len(rows),
            "total_frames": total, "total_tasks": len(tasks), "chunks_size": DEFAULT_CHUNKS_SIZE,
            "data_files_size_in_mb": DEFAULT_DATA_FILE_MB, "video_files_size_in_mb": DEFAULT_VIDEO_FILE_MB, "fps": fps,
            "splits": {"train": f"0:{len(rows)}"}, "data_path": DATA_PATH, "video_path": VIDEO_PATH if cams else None,
            "features": info_features}
    write_json(root / INFO_PATH, info)
    return info
