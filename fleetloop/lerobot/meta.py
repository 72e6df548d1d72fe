"""The metadata files of a LeRobotDataset v3.0 and the data parquet schema (see :mod:`.layout`).

- :func:`data_schema`: the Arrow schema of ``data/*.parquet`` for a feature set: the dataset's
  non-video features then the defaults; ``[1]`` features scalar, ``[D]`` vectors as
  ``fixed_size_list<dtype>[D]``, images as the ``{bytes, path}`` struct; with the ``huggingface``
  schema metadata (``datasets.Features``) that the ``datasets`` library writes.
- :func:`write_tasks` / :func:`read_tasks`: ``meta/tasks.parquet``, the task strings as the pandas
  index (column ``__index_level_0__`` plus the ``pandas`` schema metadata naming it) and the
  ``task_index`` column; read back in ``task_index`` order.
- :func:`write_episodes` / :func:`read_episodes`: ``meta/episodes/chunk-000/file-000.parquet``
  (one file: episode metadata is small) and back, every file, without the ``stats/`` columns.
- :func:`read_info`: ``meta/info.json``, refused (InvalidArgument naming ``codebase_version``) unless
  it is a v3.0 dataset; NotFound when there is none.
Files are written atomically (temp file + rename) through :func:`fleetloop.dataset.atomic_write`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from fleetloop.dataset import atomic_write
from fleetloop.errors import InvalidArgument, NotFound
from fleetloop.lerobot.layout import CODEBASE_VERSION, DEFAULT_FEATURES, EPISODES_PATH, INFO_PATH, TASKS_PATH, Feature

_ARROW = {"float32": pa.float32(), "float64": pa.float64(), "int64": pa.int64(), "int32": pa.int32(),
          "bool": pa.bool_(), "uint8": pa.uint8()}
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_INDEX_COLUMN = "__index_level_0__"


def arrow_type(ft: Feature) -> pa.DataType:
    """The data parquet column type of a non-video feature."""
    if ft.dtype == "image":
        return IMAGE_STRUCT
    scalar = _ARROW[ft.dtype]
    return scalar if tuple(ft.shape) == (1,) else pa.list_(scalar, ft.size)


def _hf_feature(ft: Feature) -> dict[str, Any]:
    if ft.dtype == "image":
        return {"_type": "Image"}
    value = {"dtype": ft.dtype, "_type": "Value"}
    return value if tuple(ft.shape) == (1,) else {"feature": value, "length": ft.size, "_type": "Sequence"}


def all_features(features: Mapping[str, Feature]) -> dict[str, Feature]:
    """The dataset's own features followed by the :data:`DEFAULT_FEATURES` (info.json's order)."""
    return {**features, **{k: Feature(k, d, (1,)) for k, d in DEFAULT_FEATURES.items()}}


def data_schema(features: Mapping[str, Feature]) -> pa.Schema:
    """The data parquet schema of ``features`` (the dataset's own; defaults appended, videos left out)."""
    cols = {k: ft for k, ft in all_features(features).items() if ft.dtype != "video"}
    hf = {"info": {"features": {k: _hf_feature(ft) for k, ft in cols.items()}}}
    return pa.schema([pa.field(k, arrow_type(ft)) for k, ft in cols.items()], metadata={"huggingface": json.dumps(hf)})


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as one parquet file (snappy), in memory."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="snappy")
    return sink.getvalue()


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write(Path(path), json.dumps(data, indent=4, ensure_ascii=False).encode())


def write_tasks(root: Path, tasks: Sequence[str]) -> None:
    """``meta/tasks.parquet``: ``tasks[i]`` has ``task_index`` i (see the module docstring)."""
    pandas_meta = {
        "index_columns": [_INDEX_COLUMN],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                     "metadata": None},
                    {"name": None, "field_name": _INDEX_COLUMN, "pandas_type": "unicode", "numpy_type": "object",
                     "metadata": None}],
        "attributes": {}, "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.0"}
    schema = pa.schema([("task_index", pa.int64()), (_INDEX_COLUMN, pa.string())],
                       metadata={"pandas": json.dumps(pandas_meta)})
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), _INDEX_COLUMN: pa.array(list(tasks), pa.string())},
                     schema=schema)
    atomic_write(Path(root) / TASKS_PATH, parquet_bytes(table))


def read_tasks(root: Path) -> list[str]:
    """The task strings in ``task_index`` order. The task column is the pandas index column the file's
    metadata names, else a ``task`` column; InvalidArgument naming ``meta/tasks.parquet`` otherwise."""
    path = Path(root) / TASKS_PATH
    if not path.exists():
        raise NotFound(f"no {TASKS_PATH} in {root}", field=TASKS_PATH, value=str(path))
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    names = [c for c in meta.get("index_columns", []) if isinstance(c, str) and c in table.column_names]
    column = names[0] if names else ("task" if "task" in table.column_names else None)
    if column is None or "task_index" not in table.column_names:
        raise InvalidArgument(f"{TASKS_PATH} has columns {table.column_names}, want task_index and the task strings",
                              field=TASKS_PATH, value=table.column_names)
    pairs = sorted(zip(table.column("task_index").to_pylist(), table.column(column).to_pylist()))
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise InvalidArgument(f"{TASKS_PATH} task_index values are not 0..{len(pairs) - 1}", field=TASKS_PATH,
                              value=[i for i, _ in pairs])
    return [str(t) for _, t in pairs]


def write_episodes(root: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``meta/episodes/chunk-000/file-000.parquet`` from one dict per episode (columns: the union of
    the rows' keys, first-seen order; a key a row lacks is null there)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = pa.Table.from_pydict({c: [row.get(c) for row in rows] for c in columns})
    atomic_write(Path(root) / EPISODES_PATH.format(chunk_index=0, file_index=0), parquet_bytes(table))


def read_episodes(root: Path) -> list[dict[str, Any]]:
    """Every ``meta/episodes`` row (all files, in path order), sorted by ``episode_index``, without
    the ``stats/`` columns."""
    paths = sorted((Path(root) / "meta" / "episodes").glob("*/*.parquet"))
    if not paths:
        raise NotFound(f"no meta/episodes/*/*.parquet in {root}", field="meta/episodes", value=str(root))
    rows: list[dict[str, Any]] = []
    for path in paths:
        schema = pq.read_schema(path)
        table = pq.read_table(path, columns=[c for c in schema.names if not c.startswith("stats/")])
        rows += table.to_pylist()
    return sorted(rows, key=lambda r: int(r["episode_index"]))


def read_info(root: Path) -> dict[str, Any]:
    """``meta/info.json`` of a v3.0 dataset (see the module docstring)."""
    path = Path(root) / INFO_PATH
    if not path.exists():
        raise NotFound(f"no LeRobot dataset at {root} (missing {INFO_PATH})", field="dataset", value=str(root))
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{path} is not JSON ({exc})", field=INFO_PATH, value=str(path)) from None
    version = info.get("codebase_version") if isinstance(info, dict) else None
    if version != CODEBASE_VERSION:
        raise InvalidArgument(f"{root} is a LeRobotDataset of codebase_version {version!r}; only {CODEBASE_VERSION!r} is "
                              "read (convert older datasets with LeRobot's v30 conversion script)",
                              field="codebase_version", value=version)
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise InvalidArgument(f"{path} lacks {key!r}", field=f"info.{key}", value=None)
    return info
