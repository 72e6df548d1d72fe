"""The LeRobotDataset v3.0 layout: paths, the default per-frame features, and the feature model.

Facts of the format (as LeRobot's own loader expects them), in one place:

- ``meta/info.json``: ``codebase_version`` ``"v3.0"``, ``robot_type``, ``total_episodes``,
  ``total_frames``, ``total_tasks``, ``chunks_size`` (files per chunk folder), ``data_files_size_in_mb``,
  ``video_files_size_in_mb``, ``fps``, ``splits`` ``{"train": "0:N"}``, ``data_path`` / ``video_path``
  (format strings below; ``video_path`` is null without video features) and ``features``
  ``{name: {"dtype", "shape", "names"[, "info"]}}``: the dataset's own features first, then the five
  :data:`DEFAULT_FEATURES` every frame carries.
- ``data/chunk-CCC/file-FFF.parquet``: one row per frame, the non-video features as columns (a
  ``[1]``-shaped feature as a scalar column, a vector ``[D]`` as a fixed-size list of its dtype, an
  ``image`` as the Hugging Face ``Image`` struct ``{bytes, path}`` holding a PNG).
- ``videos/<key>/chunk-CCC/file-FFF.mp4``: one video per camera, episodes concatenated; an episode's
  frames lie in ``[from_timestamp, to_timestamp)`` of its file (``meta/episodes`` columns), frame ``i``
  at ``from_timestamp + timestamp[i]``.
- ``meta/tasks.parquet``: the task strings as the (pandas) index, column ``task_index``.
- ``meta/episodes/chunk-CCC/file-FFF.parquet``: one row per episode (:data:`EPISODE_COLUMNS`, the
  per-video columns, ``stats/<feature>/<stat>``, and any extra episode-level columns).
- ``meta/stats.json``: ``{feature: {stat: value}}`` over the whole dataset.

:class:`Feature` and :class:`LeRobotEpisode` are this package's in-memory model; :func:`check_features`
is the one validation of a feature set (InvalidArgument naming ``features[<name>].<field>``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from fleetloop.errors import InvalidArgument

CODEBASE_VERSION = "v3.0"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE + ".parquet"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"

#: info.json defaults (files per chunk folder; file sizes before a new file is started).
DEFAULT_CHUNKS_SIZE = 1000
DEFAULT_DATA_FILE_MB = 100
DEFAULT_VIDEO_FILE_MB = 200

#: Features every frame carries, written after the dataset's own (dtype, shape [1], names null).
DEFAULT_FEATURES: dict[str, str] = {
    "timestamp": "float32", "frame_index": "int64", "episode_index": "int64", "index": "int64", "task_index": "int64",
}
#: dtypes a non-visual feature may have, and the two visual ones.
VALUE_DTYPES = ("float32", "float64", "int64", "int32", "bool", "uint8")
VISUAL_DTYPES = ("video", "image")
#: The fixed columns of an ``meta/episodes`` row (videos add ``videos/<key>/...``; stats ``stats/...``).
EPISODE_COLUMNS = ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
                   "dataset_to_index", "meta/episodes/chunk_index", "meta/episodes/file_index")
VIDEO_COLUMNS = ("chunk_index", "file_index", "from_timestamp", "to_timestamp")
#: Pixel format of every video: 4:2:0 chroma, so frame width and height must be even.
PIX_FMT = "yuv420p"
#: Names of a visual feature's axes, as LeRobot writes them (channels last).
IMAGE_NAMES = ["height", "width", "channels"]


@dataclass
class Feature:
    """One LeRobot feature: ``name`` (e.g. ``"observation.state"``), ``dtype`` (one of
    :data:`VALUE_DTYPES` or ``"video"`` / ``"image"``), ``shape`` (visual: ``(H, W, C)``) and the
    optional per-element ``names``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    names: list[str] | None = None

    @property
    def is_visual(self) -> bool:
        """A camera: frames uint8 ``[T, H, W, C]`` in memory, a video or PNG images on disk."""
        return self.dtype in VISUAL_DTYPES

    @property
    def numpy_dtype(self) -> np.dtype:
        """The in-memory dtype of the feature's frames (uint8 for visual features, object for strings)."""
        if self.is_visual:
            return np.dtype("uint8")
        return np.dtype(object) if self.dtype == "string" else np.dtype(self.dtype)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def info(self) -> dict[str, Any]:
        """The feature's ``info.json`` entry (without a video's ``info`` block)."""
        names = self.names if self.names is not None else (list(IMAGE_NAMES) if self.is_visual else None)
        return {"dtype": self.dtype, "shape": list(self.shape), "names": names}

    @classmethod
    def from_info(cls, name: str, entry: Mapping[str, Any]) -> "Feature":
        """A Feature from an ``info.json`` entry; InvalidArgument naming ``features[<name>]`` when malformed."""
        try:
            shape = tuple(int(d) for d in entry["shape"])
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"feature {name!r} has no valid dtype/shape ({exc})", field=f"features[{name}]",
                                  value=dict(entry) if isinstance(entry, Mapping) else entry) from None
        names = entry.get("names")
        return cls(name, dtype, shape, list(names) if isinstance(names, list) else None)


@dataclass
class LeRobotEpisode:
    """One episode: its task string, ``frames`` (feature name -> array ``[T, *shape]``; visual
    features uint8 ``[T, H, W, C]``; the :data:`DEFAULT_FEATURES` are not included: the writer derives
    them, the reader drops them) and ``extra`` episode-level ``meta/episodes`` columns (e.g.
    ``"fleetloop.outcome"``)."""

    task: str
    frames: dict[str, np.ndarray]
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(next(iter(self.frames.values())).shape[0]) if self.frames else 0


def data_path(chunk_index: int, file_index: int) -> str:
    return DATA_PATH.format(chunk_index=chunk_index, file_index=file_index)


def video_path(key: str, chunk_index: int, file_index: int) -> str:
    return VIDEO_PATH.format(video_key=key, chunk_index=chunk_index, file_index=file_index)


def next_file(chunk_index: int, file_index: int, chunks_size: int) -> tuple[int, int]:
    """The (chunk, file) index after this one: files fill a chunk folder up to ``chunks_size``."""
    return (chunk_index + 1, 0) if file_index + 1 >= chunks_size else (chunk_index, file_index + 1)


def check_features(features: Mapping[str, Feature]) -> dict[str, Feature]:
    """The dataset's own features, checked for writing: keys equal each Feature's name, no ``/`` in a
    name, no default feature name, dtype in :data:`VALUE_DTYPES` / :data:`VISUAL_DTYPES`, non-visual
    shapes ``[D]`` (D >= 1), visual shapes ``(H, W, C)``; a ``video`` must have C = 3 and even H and W
    (4:2:0 video; odd sizes are refused, not padded), an ``image`` C in (1, 3, 4). At least one feature.
    Raises InvalidArgument with field ``features[<name>].<dtype|shape|name>``."""
    if not features:
        raise InvalidArgument("a dataset needs at least one feature", field="features", value=[])
    out: dict[str, Feature] = {}
    for key, ft in features.items():
        where = f"features[{key}]"
        if not isinstance(ft, Feature) or ft.name != key:
            raise InvalidArgument(f"{where} must be a Feature named {key!r}", field=f"{where}.name",
                                  value=getattr(ft, "name", ft))
        if "/" in key or not key:
            raise InvalidArgument(f"feature name {key!r} must be non-empty and hold no '/'", field=f"{where}.name", value=key)
        if key in DEFAULT_FEATURES:
            raise InvalidArgument(f"{key!r} is a default feature the writer derives; do not declare it",
                                  field=f"{where}.name", value=key)
        shape = tuple(int(d) for d in ft.shape)
        if ft.dtype in VISUAL_DTYPES:
            _check_visual(where, ft.dtype, shape)
        elif ft.dtype in VALUE_DTYPES:
            if len(shape) != 1 or shape[0] < 1:
                raise InvalidArgument(f"{where}: a {ft.dtype} feature is a vector [D] (D >= 1), got shape {list(shape)}",
                                      field=f"{where}.shape", value=list(shape))
        else:
            raise InvalidArgument(f"{where}: dtype {ft.dtype!r} is not one of {[*VALUE_DTYPES, *VISUAL_DTYPES]}",
                                  field=f"{where}.dtype", value=ft.dtype)
        out[key] = Feature(key, ft.dtype, shape, ft.names)
    return out


def _check_visual(where: str, dtype: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 3 or shape[0] < 1 or shape[1] < 1:
        raise InvalidArgument(f"{where}: a {dtype} feature has shape (H, W, C), got {list(shape)}",
                              field=f"{where}.shape", value=list(shape))
    h, w, c = shape
    if dtype == "video":
        if c != 3:
            raise InvalidArgument(f"{where}: a video feature is RGB (C = 3), got C = {c}", field=f"{where}.shape",
                                  value=list(shape))
        if h % 2 or w % 2:
            raise InvalidArgument(f"{where}: video frames are {PIX_FMT} (4:2:0), so height and width must be even; "
                                  f"got {h}x{w} (crop or resize the frames, or store the feature as 'image')",
                                  field=f"{where}.shape", value=list(shape))
    elif c not in (1, 3, 4):
        raise InvalidArgument(f"{where}: an image feature has C in (1, 3, 4), got C = {c}", field=f"{where}.shape",
                              value=list(shape))


def check_frames(features: Mapping[str, Feature], ep: LeRobotEpisode, i: int) -> int:
    """Episode ``i``'s length T after checking it holds exactly ``features``, each ``[T, *shape]``
    (a ``[1]`` feature may also be ``[T]``) of a dtype that casts safely (visual: uint8); T >= 1.
    InvalidArgument naming ``episodes[i].frames[<name>]``."""
    where = f"episodes[{i}]"
    if not isinstance(ep, LeRobotEpisode):
        raise InvalidArgument(f"{where} must be a LeRobotEpisode, got {type(ep).__name__}", field=where, value=None)
    if not isinstance(ep.task, str) or not ep.task:
        raise InvalidArgument(f"{where}.task must be a non-empty string", field=f"{where}.task", value=ep.task)
    missing, unknown = sorted(set(features) - set(ep.frames)), sorted(set(ep.frames) - set(features))
    if missing or unknown:
        name = (missing or unknown)[0]
        raise InvalidArgument(f"{where}.frames: missing {missing}, unknown {unknown} (features: {sorted(features)})",
                              field=f"{where}.frames[{name}]", value=name)
    t = -1
    for name, ft in features.items():
        arr = np.asarray(ep.frames[name])
        fld = f"{where}.frames[{name}]"
        t = arr.shape[0] if t < 0 and arr.ndim else t
        ok = arr.shape == (t, *ft.shape) or (ft.shape == (1,) and arr.shape == (t,))
        if not ok or t < 1:
            raise InvalidArgument(f"{fld} has shape {list(arr.shape)}, want [T, {', '.join(map(str, ft.shape))}] with "
                                  f"T = {max(t, 1)} (every feature has one row per frame)", field=fld, value=list(arr.shape))
        if not _casts(arr.dtype, ft.numpy_dtype):
            raise InvalidArgument(f"{fld} has dtype {arr.dtype}, feature {name!r} is {ft.dtype}", field=fld,
                                  value=str(arr.dtype))
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise InvalidArgument(f"{fld} holds NaN or inf", field=fld, value="non-finite")
    return t


def _casts(have: np.dtype, want: np.dtype) -> bool:
    """Whether frames of dtype ``have`` may be stored as ``want``: uint8 and bool only as themselves,
    integers into integers, integers and floats into floats."""
    if want.kind in "bu" or have.kind == "b":
        return have == want
    if want.kind == "i":
        return have.kind in "iu"
    return have.kind in "iuf"
