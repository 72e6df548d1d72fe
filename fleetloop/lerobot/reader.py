"""Read a LeRobotDataset v3.0 episode by episode.

Contract of :class:`LeRobotReader`:

- the constructor reads ``meta/info.json`` (refused unless ``codebase_version`` is ``"v3.0"``:
  InvalidArgument naming ``codebase_version``), ``meta/tasks.parquet`` and every ``meta/episodes``
  file; :attr:`features` are the dataset's own (the five default per-frame features left out),
  :attr:`tasks` the task strings in ``task_index`` order; a visual feature declared channels first
  (``names`` starting with ``channel(s)``, as some ported datasets have) is turned to ``(H, W, C)``;
- :meth:`episode` ``(i)`` (the i-th row of ``meta/episodes`` by ``episode_index``) returns every
  feature (or the ones asked for) ``[T, *shape]`` in its dtype: vectors and scalars from the data
  parquet (the episode's rows, in ``frame_index`` order; row groups of other episodes are skipped by
  their statistics), ``image`` features decoded from their PNG bytes, ``video`` features decoded
  from the camera's MP4, frame ``i`` matched to ``from_timestamp + timestamp[i]`` within
  ``tolerance_s`` (:func:`.video.decode_episode`); memory is one episode (plus, for a data file
  written as a single row group, that file's columns while the episode is read). ``task`` is the task of the episode's first frame; ``extra`` holds the episode's
  non-standard ``meta/episodes`` columns (e.g. ``fleetloop.outcome``);
- broken data (missing rows, nulls, undecodable frames) raises IntegrityError naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fleetloop.errors import IntegrityError, InvalidArgument
from fleetloop.lerobot.layout import DEFAULT_FEATURES, EPISODE_COLUMNS, Feature, LeRobotEpisode
from fleetloop.lerobot.meta import read_episodes, read_info, read_tasks
from fleetloop.lerobot.png import decode_png
from fleetloop.lerobot.video import DEFAULT_TOLERANCE_S, decode_episode

_RESERVED_PREFIXES = ("stats/", "videos/", "data/", "meta/")


def _check_dtype(ft: Feature) -> None:
    if ft.is_visual or ft.dtype == "string":
        if ft.is_visual and len(ft.shape) != 3:
            raise InvalidArgument(f"feature {ft.name!r} is {ft.dtype} of shape {list(ft.shape)}, want (H, W, C)",
                                  field=f"features[{ft.name}].shape", value=list(ft.shape))
        return
    try:
        np.dtype(ft.dtype)
    except TypeError:
        raise InvalidArgument(f"feature {ft.name!r} has unknown dtype {ft.dtype!r}", field=f"features[{ft.name}].dtype",
                              value=ft.dtype) from None


def _channels_last(ft: Feature) -> Feature:
    """A visual feature declared ``(C, H, W)`` (names ``["channels", "height", "width"]``) as ``(H, W, C)``."""
    if ft.is_visual and len(ft.shape) == 3 and ft.names and ft.names[0] in ("channel", "channels"):
        c, h, w = ft.shape
        return Feature(ft.name, ft.dtype, (h, w, c), [*ft.names[1:3], ft.names[0]])
    return ft


def column_to_numpy(col: pa.ChunkedArray | pa.Array, ft: Feature, t: int, where: str) -> np.ndarray:
    """A data parquet column of ``t`` rows as ``[t, *ft.shape]`` in the feature's dtype (images decoded)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        raise IntegrityError(f"{where}: column {ft.name!r} holds {arr.null_count} null(s)", field=where, value=ft.name)
    if ft.dtype == "image":
        blobs = arr.field("bytes").to_pylist()
        return np.stack([decode_png(b, ft.shape, f"{where}[{ft.name}]") for b in blobs]) if blobs else \
            np.empty((0, *ft.shape), dtype=np.uint8)
    if ft.dtype == "string":
        return np.asarray(arr.to_pylist(), dtype=object).reshape(t, *ft.shape)
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    values = arr.to_numpy(zero_copy_only=False)
    if values.size != t * ft.size:
        raise IntegrityError(f"{where}: column {ft.name!r} holds {values.size} values for {t} frames of shape "
                             f"{list(ft.shape)}", field=where, value=ft.name)
    return values.astype(ft.numpy_dtype, copy=False).reshape(t, *ft.shape)


class LeRobotReader:
    """A LeRobotDataset v3.0 folder (contract: the module docstring)."""

    def __init__(self, root: Path, tolerance_s: float = DEFAULT_TOLERANCE_S) -> None:
        self.root = Path(root)
        self.tolerance_s = float(tolerance_s)
        self.info: dict[str, Any] = read_info(self.root)
        self.fps: int = int(self.info["fps"])
        self.features: dict[str, Feature] = {
            k: _channels_last(Feature.from_info(k, v)) for k, v in self.info["features"].items() if k not in DEFAULT_FEATURES}
        for ft in self.features.values():
            _check_dtype(ft)
        missing = [k for k in DEFAULT_FEATURES if k not in self.info["features"]]
        if missing:
            raise InvalidArgument(f"info.json features lack the default feature(s) {missing}", field=f"features[{missing[0]}]",
                                  value=missing)
        self.tasks: list[str] = read_tasks(self.root)
        self._episodes = read_episodes(self.root)
        self._videos = [k for k, ft in self.features.items() if ft.dtype == "video"]
        if self._videos and not self.info.get("video_path"):
            raise InvalidArgument("the dataset has video features but no video_path", field="info.video_path", value=None)

    def __len__(self) -> int:
        return len(self._episodes)

    def __iter__(self) -> Iterator[LeRobotEpisode]:
        for i in range(len(self)):
            yield self.episode(i)

    def lengths(self) -> list[int]:
        """Frames per episode, from ``meta/episodes`` (nothing decoded)."""
        return [int(r["length"]) for r in self._episodes]

    def episode_tasks(self) -> list[list[str]]:
        """Each episode's task strings, from ``meta/episodes`` (nothing decoded)."""
        return [list(r.get("tasks") or []) for r in self._episodes]

    def _rows(self, row: dict[str, Any], names: list[str]) -> pa.Table:
        path = self.root / self.info["data_path"].format(chunk_index=int(row["data/chunk_index"]),
                                                         file_index=int(row["data/file_index"]))
        if not path.exists():
            raise IntegrityError(f"data file {path} of episode {row['episode_index']} is missing", field="data",
                                 value=str(path))
        columns = [k for k in names if self.features[k].dtype != "video"] + list(DEFAULT_FEATURES)
        table = pq.read_table(path, columns=columns, filters=[("episode_index", "=", int(row["episode_index"]))])
        table = table.take(pc.sort_indices(table, [("frame_index", "ascending")]))
        if table.num_rows != int(row["length"]):
            raise IntegrityError(f"{path} holds {table.num_rows} frames of episode {row['episode_index']}, meta/episodes "
                                 f"says {row['length']}", field="data", value=str(path))
        return table

    def episode(self, i: int, features: Iterable[str] | None = None) -> LeRobotEpisode:
        """Episode ``i`` with every feature decoded, or only ``features`` (names of :attr:`features`;
        InvalidArgument naming ``features`` for another), e.g. to skip unused cameras."""
        if not 0 <= int(i) < len(self):
            raise InvalidArgument(f"episode {i} is out of range: the dataset has {len(self)}", field="episode", value=i)
        names = list(self.features) if features is None else list(dict.fromkeys(features))
        unknown = [n for n in names if n not in self.features]
        if unknown:
            raise InvalidArgument(f"no feature {unknown[0]!r}; the dataset has {sorted(self.features)}", field="features",
                                  value=unknown[0])
        row = self._episodes[int(i)]
        table = self._rows(row, names)
        t, where = table.num_rows, f"data[episode {row['episode_index']}]"
        frames: dict[str, np.ndarray] = {}
        for name in names:
            if self.features[name].dtype != "video":
                frames[name] = column_to_numpy(table.column(name), self.features[name], t, where)
        timestamps = table.column("timestamp").to_numpy()
        for key in (k for k in self._videos if k in names):
            try:
                chunk, file = int(row[f"videos/{key}/chunk_index"]), int(row[f"videos/{key}/file_index"])
                start = float(row[f"videos/{key}/from_timestamp"])
            except (KeyError, TypeError):
                raise IntegrityError(f"meta/episodes lacks the videos/{key}/* columns of episode {row['episode_index']}",
                                     field=f"videos/{key}", value=row["episode_index"]) from None
            path = self.root / self.info["video_path"].format(video_key=key, chunk_index=chunk, file_index=file)
            frames[key] = decode_episode(path, start, timestamps, self.features[key].shape, self.tolerance_s)
        task_index = int(table.column("task_index")[0].as_py()) if t else 0
        if not 0 <= task_index < len(self.tasks):
            raise IntegrityError(f"{where}: task_index {task_index} is not in meta/tasks.parquet", field=where, value=task_index)
        extra = {k: v for k, v in row.items() if k not in EPISODE_COLUMNS and not k.startswith(_RESERVED_PREFIXES)}
        return LeRobotEpisode(self.tasks[task_index], frames, extra)
