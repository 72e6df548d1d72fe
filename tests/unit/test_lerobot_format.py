"""LeRobotDataset v3.0 writing and reading (:mod:`fleetloop.lerobot`), with real PyAV and real parquet.

LeRobot's own loader (the ``lerobot`` package) cannot be installed beside this project's torch 2.13:
it needs torchvision. These tests are its stand-in: besides the write -> read round trip they check
the layout field by field against the facts LeRobot's loader relies on (``meta/info.json`` keys and
feature entries, ``meta/tasks.parquet`` read through pandas with the task strings as the index, the
``meta/episodes`` columns, the data parquet schema, the concatenated per-camera videos and their
``from_timestamp`` / ``to_timestamp``).
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fleetloop.errors import IntegrityError, InvalidArgument
from fleetloop.lerobot import Feature, LeRobotEpisode, LeRobotReader, write_dataset

pytestmark = pytest.mark.timeout(120)

FPS = 10
H, W = 32, 48
LENGTHS = (12, 7, 15)
TASKS = ("pick the cube", "open the drawer", "pick the cube")


def camera(t: int, seed: int) -> np.ndarray:
    """Smooth moving gradients (compress like camera frames; each frame differs from its neighbours)."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    return np.stack([np.stack([128 + 100 * np.sin(xx / 6 + i * 0.4 + seed), 128 + 100 * np.cos(yy / 5 - i * 0.3),
                               128 + 90 * np.sin((xx + yy) / 9 + i * 0.5 + seed / 3)], -1)
                     for i in range(t)]).round().astype(np.uint8)


FEATURES = {
    "observation.state": Feature("observation.state", "float32", (6,), [f"j{i}" for i in range(6)]),
    "action": Feature("action", "float64", (3,)),
    "observation.images.front": Feature("observation.images.front", "video", (H, W, 3)),
    "observation.images.wrist": Feature("observation.images.wrist", "video", (H, W, 3)),
    "observation.images.mask": Feature("observation.images.mask", "image", (6, 8, 1)),
    "next.done": Feature("next.done", "bool", (1,)),
    "gripper.mode": Feature("gripper.mode", "int64", (2,)),
}


def episodes() -> list[LeRobotEpisode]:
    rng = np.random.default_rng(0)
    out = []
    for e, t in enumerate(LENGTHS):
        out.append(LeRobotEpisode(TASKS[e], {
            "observation.state": rng.normal(size=(t, 6)).astype(np.float32),
            "action": rng.normal(size=(t, 3)),
            "observation.images.front": camera(t, e * 40),
            "observation.images.wrist": camera(t, e * 40 + 100),
            "observation.images.mask": rng.integers(0, 256, (t, 6, 8, 1)).astype(np.uint8),
            "next.done": np.arange(t) == t - 1,
            "gripper.mode": rng.integers(-5, 5, (t, 2)),
        }, extra={"fleetloop.outcome": "failure" if e == 1 else "success", "fleetloop.seed": 100 + e}))
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[LeRobotEpisode]]:
    root = tmp_path_factory.mktemp("lerobot") / "ds"
    eps = episodes()
    info = write_dataset(root, eps, FEATURES, FPS, robot_type="so100")
    return root, info, eps


def test_round_trip(written: tuple[Path, dict, list[LeRobotEpisode]]) -> None:
    root, _, source = written
    reader = LeRobotReader(root)
    assert len(reader) == 3 and reader.fps == FPS and reader.tasks == ["pick the cube", "open the drawer"]
    assert reader.features == {k: Feature(k, f.dtype, f.shape, f.names if f.names or f.dtype not in ("video", "image")
                                          else ["height", "width", "channels"]) for k, f in FEATURES.items()}
    for i, (got, want) in enumerate(zip(reader, source)):
        assert got.task == want.task
        assert got.extra == want.extra
        for name, ft in FEATURES.items():
            arr = got.frames[name]
            assert arr.shape == (LENGTHS[i], *ft.shape) and arr.dtype == ft.numpy_dtype, name
            if ft.dtype != "video":
                np.testing.assert_array_equal(arr, np.asarray(want.frames[name]).reshape(arr.shape), err_msg=name)
                continue
            err = np.abs(arr.astype(np.int16) - want.frames[name].astype(np.int16)).mean(axis=(1, 2, 3))
            assert err.max() < 8, (name, err)
            # exactly frame-aligned: every decoded frame is closest to its own source frame
            shifted = np.abs(arr[1:].astype(np.int16) - want.frames[name][:-1].astype(np.int16)).mean(axis=(1, 2, 3))
            assert np.all(err[1:] < shifted), (name, err, shifted)
    assert reader.episode(2).frames["observation.state"].shape == (15, 6)  # random access
    only = reader.episode(1, ["observation.images.wrist", "next.done"])  # a subset: nothing else decoded
    assert sorted(only.frames) == ["next.done", "observation.images.wrist"] and only.frames["next.done"].shape == (7, 1)
    with pytest.raises(InvalidArgument) as info:
        reader.episode(0, ["observation.images.top"])
    assert info.value.field == "features" and "observation.images.front" in str(info.value)
    with pytest.raises(InvalidArgument, match="out of range"):
        reader.episode(3)


def test_info_json(written: tuple[Path, dict, list[LeRobotEpisode]]) -> None:
    root, info, _ = written
    on_disk = json.loads((root / "meta" / "info.json").read_text())
    assert on_disk == info
    assert list(on_disk) == ["codebase_version", "robot_type", "total_episodes", "total_frames", "total_tasks",
                             "chunks_size", "data_files_size_in_mb", "video_files_size_in_mb", "fps", "splits",
                             "data_path", "video_path", "features"]
    assert on_disk["codebase_version"] == "v3.0" and on_disk["robot_type"] == "so100"
    assert (on_disk["total_episodes"], on_disk["total_frames"], on_disk["total_tasks"]) == (3, sum(LENGTHS), 2)
    assert (on_disk["chunks_size"], on_disk["data_files_size_in_mb"], on_disk["video_files_size_in_mb"]) == (1000, 100, 200)
    assert on_disk["fps"] == FPS and on_disk["splits"] == {"train": "0:3"}
    assert on_disk["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert on_disk["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    feats = on_disk["features"]
    assert list(feats) == [*FEATURES, "timestamp", "frame_index", "episode_index", "index", "task_index"]
    for name, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"), ("index", "int64"),
                        ("task_index", "int64")):
        assert feats[name] == {"dtype": dtype, "shape": [1], "names": None}
    assert feats["observation.state"] == {"dtype": "float32", "shape": [6], "names": [f"j{i}" for i in range(6)]}
    assert feats["next.done"] == {"dtype": "bool", "shape": [1], "names": None}
    assert feats["observation.images.mask"] == {"dtype": "image", "shape": [6, 8, 1], "names": ["height", "width", "channels"]}
    for cam in ("observation.images.front", "observation.images.wrist"):
        assert feats[cam] == {"dtype": "video", "shape": [H, W, 3], "names": ["height", "width", "channels"], "info": {
            "video.height": H, "video.width": W, "video.codec": "h264", "video.pix_fmt": "yuv420p",
            "video.is_depth_map": False, "video.fps": FPS, "video.channels": 3, "has_audio": False}}


def test_tasks_parquet_reads_as_lerobot_does(written: tuple[Path, dict, list[LeRobotEpisode]]) -> None:
    root, _, _ = written
    tasks = pd.read_parquet(root / "meta" / "tasks.parquet")
    assert list(tasks.index) == ["pick the cube", "open the drawer"] and list(tasks.columns) == ["task_index"]
    assert tasks.loc["open the drawer"].task_index == 1 and tasks.iloc[0].name == "pick the cube"


def test_episodes_parquet(written: tuple[Path, dict, list[LeRobotEpisode]]) -> None:
    root, _, _ = written
    path = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    base = ["episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
            "dataset_to_index"]
    video_cols = [f"videos/{cam}/{k}" for cam in ("observation.images.front", "observation.images.wrist")
                  for k in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
    stats = [f"stats/{f}/{s}" for f in [*FEATURES, "timestamp", "frame_index", "episode_index", "index", "task_index"]
             for s in ("min", "max", "mean", "std", "q01", "q10", "q50", "q90", "q99", "count")]
    assert sorted(table.column_names) == sorted([*base, *video_cols, *stats, "meta/episodes/chunk_index",
                                                 "meta/episodes/file_index", "fleetloop.outcome", "fleetloop.seed"])
    assert table.schema.field("tasks").type == pa.list_(pa.string())
    for col in ("episode_index", "length", "dataset_from_index", "data/chunk_index"):
        assert table.schema.field(col).type == pa.int64()
    assert table.schema.field("videos/observation.images.front/from_timestamp").type == pa.float64()
    starts = np.concatenate([[0], np.cumsum(LENGTHS)])
    for i, row in enumerate(rows):
        assert (row["episode_index"], row["length"], row["tasks"]) == (i, LENGTHS[i], [TASKS[i]])
        assert (row["dataset_from_index"], row["dataset_to_index"]) == (starts[i], starts[i + 1])
        assert (row["data/chunk_index"], row["data/file_index"], row["meta/episodes/chunk_index"]) == (0, 0, 0)
        for cam in ("observation.images.front", "observation.images.wrist"):
            assert row[f"videos/{cam}/from_timestamp"] == pytest.approx(starts[i] / FPS)
            assert row[f"videos/{cam}/to_timestamp"] == pytest.approx(starts[i + 1] / FPS)
        assert row["stats/observation.state/count"] == [LENGTHS[i]]
        assert np.asarray(row["stats/observation.images.front/mean"]).shape == (3, 1, 1)
        assert np.asarray(row["stats/gripper.mode/min"]).shape == (2,)
        assert row["stats/index/min"] == [starts[i]] and row["stats/index/max"] == [starts[i + 1] - 1]


def test_data_parquet_schema_and_rows(written: tuple[Path, dict, list[LeRobotEpisode]]) -> None:
    root, _, source = written
    files = sorted((root / "data").rglob("*.parquet"))
    assert [f.relative_to(root).as_posix() for f in files] == ["data/chunk-000/file-000.parquet"]
    table = pq.read_table(files[0])
    schema = table.schema
    assert schema.names == ["observation.state", "action", "observation.images.mask", "next.done", "gripper.mode",
                            "timestamp", "frame_index", "episode_index", "index", "task_index"]
    assert schema.field("observation.state").type == pa.list_(pa.float32(), 6)
    assert schema.field("action").type == pa.list_(pa.float64(), 3)
    assert schema.field("gripper.mode").type == pa.list_(pa.int64(), 2)
    assert schema.field("next.done").type == pa.bool_() and schema.field("timestamp").type == pa.float32()
    assert schema.field("observation.images.mask").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for name in ("frame_index", "episode_index", "index", "task_index"):
        assert schema.field(name).type == pa.int64()
    hf = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert hf["observation.state"] == {"feature": {"dtype": "float32", "_type": "Value"}, "length": 6, "_type": "Sequence"}
    assert hf["timestamp"] == {"dtype": "float32", "_type": "Value"} and hf["observation.images.mask"] == {"_type": "Image"}
    cols = table.to_pydict()
    assert cols["index"] == list(range(sum(LENGTHS)))
    assert cols["episode_index"] == [e for e, t in enumerate(LENGTHS) for _ in range(t)]
    assert cols["frame_index"] == [i for t in LENGTHS for i in range(t)]
    assert cols["task_index"] == [[0, 1, 0][e] for e, t in enumerate(LENGTHS) for _ in range(t)]
    np.testing.assert_allclose(cols["timestamp"], [i / FPS for t in LENGTHS for i in range(t)], rtol=1e-6)
    assert cols["observation.images.mask"][0]["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(np.asarray(cols["observation.state"][:LENGTHS[0]], np.float32),
                                  source[0].frames["observation.state"])


def test_videos_are_concatenated_per_camera(written: tuple[Path, dict, list[LeRobotEpisode]]) -> None:
    root, _, _ = written
    for cam in ("observation.images.front", "observation.images.wrist"):
        files = sorted((root / "videos" / cam).rglob("*.mp4"))
        assert [f.relative_to(root).as_posix() for f in files] == [f"videos/{cam}/chunk-000/file-000.mp4"]
        with av.open(str(files[0])) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.name, stream.pix_fmt, stream.width, stream.height) == ("h264", "yuv420p", W, H)
            times = [float(f.pts * f.time_base) for f in container.decode(stream)]
        np.testing.assert_allclose(times, np.arange(sum(LENGTHS)) / FPS, atol=1e-9)


def test_stats_json(written: tuple[Path, dict, list[LeRobotEpisode]]) -> None:
    root, _, source = written
    stats = json.loads((root / "meta" / "stats.json").read_text())
    assert set(stats) == {*FEATURES, "timestamp", "frame_index", "episode_index", "index", "task_index"}
    state = np.concatenate([ep.frames["observation.state"] for ep in source])
    np.testing.assert_allclose(stats["observation.state"]["mean"], state.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["observation.state"]["std"], state.std(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["observation.state"]["min"], state.min(0))
    assert stats["observation.state"]["count"] == [sum(LENGTHS)] and stats["index"]["max"] == [sum(LENGTHS) - 1]
    assert np.asarray(stats["observation.images.wrist"]["mean"]).shape == (3, 1, 1)
    assert 0.0 <= np.min(stats["observation.images.wrist"]["min"]) <= np.max(stats["observation.images.wrist"]["max"]) <= 1.0


@pytest.mark.parametrize("vcodec,codec_name", [("libsvtav1", "av1"), ("mpeg4", "mpeg4")])
def test_other_codecs_round_trip(tmp_path: Path, vcodec: str, codec_name: str) -> None:
    feats = {"cam": Feature("cam", "video", (H, W, 3)), "x": Feature("x", "float32", (1,))}
    eps = [LeRobotEpisode("t", {"cam": camera(t, t), "x": np.arange(t, dtype=np.float32)}) for t in (5, 8)]
    info = write_dataset(tmp_path / "ds", eps, feats, 15, vcodec=vcodec)
    assert info["features"]["cam"]["info"]["video.codec"] == codec_name and info["video_path"] is not None
    for got, want in zip(LeRobotReader(tmp_path / "ds"), eps):
        assert np.abs(got.frames["cam"].astype(np.int16) - want.frames["cam"].astype(np.int16)).mean() < 8
        np.testing.assert_array_equal(got.frames["x"], want.frames["x"][:, None])


def test_no_video_dataset_has_null_video_path(tmp_path: Path) -> None:
    info = write_dataset(tmp_path / "ds", [LeRobotEpisode("t", {"s": np.ones((3, 2), np.float32)})],
                         {"s": Feature("s", "float32", (2,))}, 30)
    assert info["video_path"] is None and not (tmp_path / "ds" / "videos").exists()
    assert LeRobotReader(tmp_path / "ds").episode(0).frames["s"].shape == (3, 2)


def _refused(tmp_path: Path, field: str, features: dict, eps: list, **kw) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        write_dataset(tmp_path / "bad", eps, features, kw.pop("fps", 10), **kw)
    assert info.value.field == field, str(info.value)
    return info.value


def test_bad_features_are_refused(tmp_path: Path) -> None:
    ep = [LeRobotEpisode("t", {"c": np.zeros((2, 33, 48, 3), np.uint8)})]
    err = _refused(tmp_path, "features[c].shape", {"c": Feature("c", "video", (33, 48, 3))}, ep)
    assert "even" in str(err) and "33x48" in str(err)
    _refused(tmp_path, "features[c].shape", {"c": Feature("c", "video", (32, 48, 1))}, ep)
    _refused(tmp_path, "features[s].dtype", {"s": Feature("s", "float16", (2,))}, ep)
    _refused(tmp_path, "features[s].shape", {"s": Feature("s", "float32", (2, 2))}, ep)
    _refused(tmp_path, "features[a/b].name", {"a/b": Feature("a/b", "float32", (2,))}, ep)
    _refused(tmp_path, "features[index].name", {"index": Feature("index", "int64", (1,))}, ep)
    _refused(tmp_path, "features[x].name", {"x": Feature("y", "int64", (1,))}, ep)
    _refused(tmp_path, "features", {}, ep)


def test_bad_episodes_are_refused(tmp_path: Path) -> None:
    feats = {"s": Feature("s", "float32", (2,)), "d": Feature("d", "bool", (1,))}

    def ep(s=None, d=None, **kw) -> LeRobotEpisode:
        return LeRobotEpisode(kw.get("task", "t"), {"s": np.zeros((4, 2), np.float32) if s is None else s,
                                                    "d": np.zeros(4, bool) if d is None else d}, kw.get("extra", {}))

    _refused(tmp_path, "episodes[1].frames[s]", feats, [ep(), ep(s=np.zeros((4, 3), np.float32))])
    _refused(tmp_path, "episodes[0].frames[d]", feats, [ep(d=np.zeros(5, bool))])
    _refused(tmp_path, "episodes[0].frames[d]", feats, [ep(d=np.zeros(4, np.float32))])
    _refused(tmp_path, "episodes[0].frames[s]", feats, [ep(s=np.full((4, 2), np.nan, np.float32))])
    _refused(tmp_path, "episodes[0].frames[x]", feats, [LeRobotEpisode("t", {**ep().frames, "x": np.zeros(4)})])
    _refused(tmp_path, "episodes[0].task", feats, [ep(task="")])
    _refused(tmp_path, "episodes[0].extra[length]", feats, [ep(extra={"length": 3})])
    _refused(tmp_path, "episodes[0].extra[stats/s/min]", feats, [ep(extra={"stats/s/min": 3})])
    _refused(tmp_path, "episodes", feats, [])
    _refused(tmp_path, "fps", feats, [ep()], fps=0)
    video = {"c": Feature("c", "video", (4, 4, 3))}
    _refused(tmp_path, "vcodec", video, [LeRobotEpisode("t", {"c": np.zeros((1, 4, 4, 3), np.uint8)})], vcodec="png")
    _refused(tmp_path, "episodes[0].frames[c]", video, [LeRobotEpisode("t", {"c": np.zeros((1, 4, 4, 3), np.int16)})])


def test_existing_dataset_and_other_versions_are_refused(written: tuple[Path, dict, list[LeRobotEpisode]],
                                                         tmp_path: Path) -> None:
    root, _, _ = written
    with pytest.raises(InvalidArgument) as info:
        write_dataset(root, episodes(), FEATURES, FPS)
    assert info.value.field == "root"
    old = tmp_path / "old"
    (old / "meta").mkdir(parents=True)
    (old / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v2.1", "fps": 30, "features": {}}))
    with pytest.raises(InvalidArgument, match="v2.1") as info:
        LeRobotReader(old)
    assert info.value.field == "codebase_version"


def test_reader_tolerates_channels_first_and_refuses_misaligned_video(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_dataset(root, [LeRobotEpisode("t", {"cam": camera(6, 0)}), LeRobotEpisode("t", {"cam": camera(4, 1)})],
                  {"cam": Feature("cam", "video", (H, W, 3))}, FPS)
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["features"]["cam"].update(shape=[3, H, W], names=["channels", "height", "width"])  # as some ported datasets
    info_path.write_text(json.dumps(info))
    reader = LeRobotReader(root)
    assert reader.features["cam"].shape == (H, W, 3) and reader.episode(1).frames["cam"].shape == (4, H, W, 3)
    episodes_path = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(episodes_path)
    col = "videos/cam/from_timestamp"
    table = table.set_column(table.schema.get_field_index(col), col, pa.array([0.0, 0.65]))  # half a frame off
    pq.write_table(table, episodes_path)
    with pytest.raises(IntegrityError, match="lacks") as err:
        LeRobotReader(root).episode(1)
    assert err.value.field == "video"
