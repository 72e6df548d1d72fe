"""A small LeRobotDataset v3.0 written by hand, independently of :mod:`fleetloop.lerobot` (which it
never imports), the way LeRobot's own recorder lays one out: pyarrow for the data parquet, pandas for
``meta/tasks.parquet`` (task strings as the index), one MP4 per episode (PyAV, libx264, yuv420p, GOP
2) then concatenated per camera with FFmpeg's concat demuxer (stream copy), each episode's
``from_timestamp`` / ``to_timestamp`` taken from the per-episode video durations.

:func:`make_lerobot_dataset` takes plain episodes ``{"task": str, "state": f32 [T, S], "action":
f32 [T, A], "reward": f32 [T], "camera": optional uint8 [T, H, W, 3]}`` and writes features
``observation.state``, ``action``, ``next.reward``, ``next.done`` and, when the episodes carry
frames, the video feature ``observation.images.top``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

CAMERA = "observation.images.top"


def _encode_episode(frames: np.ndarray, path: Path, fps: int) -> float:
    """One episode's MP4; returns its duration in seconds (as LeRobot measures it)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"g": "2", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with av.open(str(path)) as probe:
        st = probe.streams.video[0]
        return float(st.duration * st.time_base)


def _concatenate(parts: Sequence[Path], out_path: Path) -> None:
    """Stream-copy ``parts`` into one MP4 with the concat demuxer."""
    listing = out_path.with_suffix(".ffconcat")
    listing.write_text("ffconcat version 1.0\n" + "".join(f"file '{p.resolve()}'\n" for p in parts))
    with av.open(str(listing), "r", format="concat", options={"safe": "0"}) as src, \
            av.open(str(out_path), "w", options={"movflags": "faststart"}) as dst:
        in_stream = src.streams.video[0]
        out_stream = dst.add_stream_from_template(template=in_stream, opaque=True)
        out_stream.time_base = in_stream.time_base
        for packet in src.demux(in_stream):
            if packet.dts is None:
                continue
            packet.stream = out_stream
            dst.mux(packet)
    listing.unlink()


def _stats(arr: np.ndarray) -> dict[str, Any]:
    a = arr.reshape(arr.shape[0], -1).astype(np.float64)
    return {"min": a.min(0).tolist(), "max": a.max(0).tolist(), "mean": a.mean(0).tolist(), "std": a.std(0).tolist(),
            "count": [int(arr.shape[0])]}


def make_lerobot_dataset(root: Path, episodes: Sequence[dict[str, Any]], fps: int = 10) -> dict[str, Any]:
    """Write the dataset (module docstring); returns its info.json."""
    root = Path(root)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    tasks = list(dict.fromkeys(ep["task"] for ep in episodes))
    s_dim, a_dim = episodes[0]["state"].shape[1], episodes[0]["action"].shape[1]
    has_cam = "camera" in episodes[0]
    cols: dict[str, list] = {k: [] for k in ("observation.state", "action", "next.reward", "next.done", "timestamp",
                                             "frame_index", "episode_index", "index", "task_index")}
    meta_rows, total, video_parts, durations = [], 0, [], []
    tmp = Path(tempfile.mkdtemp(prefix="lerobot-fixture-"))
    try:
        for e, ep in enumerate(episodes):
            t = ep["state"].shape[0]
            cols["observation.state"] += list(ep["state"].astype(np.float32))
            cols["action"] += list(ep["action"].astype(np.float32))
            cols["next.reward"] += ep["reward"].astype(np.float32).tolist()
            cols["next.done"] += [i == t - 1 for i in range(t)]
            cols["timestamp"] += [i / fps for i in range(t)]
            cols["frame_index"] += list(range(t))
            cols["episode_index"] += [e] * t
            cols["index"] += list(range(total, total + t))
            cols["task_index"] += [tasks.index(ep["task"])] * t
            row = {"episode_index": e, "tasks": [ep["task"]], "length": t, "data/chunk_index": 0, "data/file_index": 0,
                   "dataset_from_index": total, "dataset_to_index": total + t}
            if has_cam:
                part = tmp / f"episode-{e:06d}.mp4"
                duration = _encode_episode(ep["camera"], part, fps)
                start = sum(durations)
                video_parts.append(part)
                durations.append(duration)
                row.update({f"videos/{CAMERA}/chunk_index": 0, f"videos/{CAMERA}/file_index": 0,
                            f"videos/{CAMERA}/from_timestamp": start, f"videos/{CAMERA}/to_timestamp": start + duration})
            for name, arr in (("observation.state", ep["state"]), ("action", ep["action"])):
                row.update({f"stats/{name}/{k}": v for k, v in _stats(arr).items()})
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            meta_rows.append(row)
            total += t
        if has_cam:
            video = root / "videos" / CAMERA / "chunk-000" / "file-000.mp4"
            video.parent.mkdir(parents=True, exist_ok=True)
            _concatenate(video_parts, video)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    schema = pa.schema([("observation.state", pa.list_(pa.float32(), s_dim)), ("action", pa.list_(pa.float32(), a_dim)),
                        ("next.reward", pa.float32()), ("next.done", pa.bool_()), ("timestamp", pa.float32()),
                        ("frame_index", pa.int64()), ("episode_index", pa.int64()), ("index", pa.int64()),
                        ("task_index", pa.int64())])
    data = root / "data" / "chunk-000" / "file-000.parquet"
    data.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict({k: [np.asarray(v).tolist() for v in vals] if k in ("observation.state", "action")
                                         else vals for k, vals in cols.items()}, schema=schema), data)
    pd.DataFrame({"task_index": range(len(tasks))}, index=tasks).to_parquet(root / "meta" / "tasks.parquet")
    episodes_file = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    episodes_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(meta_rows), episodes_file)
    features: dict[str, Any] = {
        "observation.state": {"dtype": "float32", "shape": [s_dim], "names": None},
        "action": {"dtype": "float32", "shape": [a_dim], "names": None},
        "next.reward": {"dtype": "float32", "shape": [1], "names": None},
        "next.done": {"dtype": "bool", "shape": [1], "names": None}}
    if has_cam:
        h, w = episodes[0]["camera"].shape[1:3]
        features[CAMERA] = {"dtype": "video", "shape": [int(h), int(w), 3], "names": ["height", "width", "channels"],
                            "info": {"video.height": int(h), "video.width": int(w), "video.codec": "h264",
                                     "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                                     "video.channels": 3, "has_audio": False}}
    for name, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                        ("index", "int64"), ("task_index", "int64")):
        features[name] = {"dtype": dtype, "shape": [1], "names": None}
    info = {"codebase_version": "v3.0", "robot_type": "sawyer", "total_episodes": len(episodes), "total_frames": total,
            "total_tasks": len(tasks), "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
            "fps": fps, "splits": {"train": f"0:{len(episodes)}"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if has_cam else None,
            "features": features}
    stats = {name: _stats(np.concatenate([ep[key] for ep in episodes])) for name, key in
             (("observation.state", "state"), ("action", "action"))}
    (root / "meta" / "stats.json").write_text(json.dumps(stats, indent=4))
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    return info
