"""One camera's MP4 files of a LeRobotDataset: encode episodes back to back, decode one episode's
frames, and probe a file's ``info.json`` block. PyAV (FFmpeg) does the codec work.

Encoding contract (:class:`VideoWriter`): frames uint8 ``[T, H, W, 3]`` RGB, even H and W (checked by
:func:`fleetloop.lerobot.layout.check_features`), pixel format ``yuv420p``, frame rate ``fps``, one
frame every ``1 / fps`` seconds. Episodes are appended to the open file: an episode that starts at
frame ``n`` of its file has ``from_timestamp = n / fps`` and ``to_timestamp = (n + T) / fps``, and its
first frame is forced to be a key frame. A GOP of 2 frames (LeRobot's default) keeps random access
cheap for training-time loaders. When a file reaches ``video_files_size_in_mb`` after an episode, the
next episode starts a new file (``next_file``).

Decoding contract (:func:`decode_episode`): frame ``i`` of an episode is the decoded frame whose
presentation time is within ``tolerance_s`` of ``from_timestamp + timestamp[i]`` (LeRobot's own rule,
``tolerance_s`` 1e-4 by default); the file is sought to the key frame before ``from_timestamp`` and
decoded up to the episode's last frame only, so memory is one episode. A frame that is not found, or
of another size, raises IntegrityError naming the file and the frame.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from fleetloop.errors import IntegrityError, InvalidArgument
from fleetloop.lerobot.layout import PIX_FMT, next_file, video_path

#: Encoder options per codec: GOP 2, and a quality good enough for training frames.
CODEC_OPTIONS: dict[str, dict[str, str]] = {
    "libx264": {"g": "2", "crf": "18", "preset": "fast"},
    "libsvtav1": {"g": "2", "crf": "20", "preset": "10", "svtav1-params": "lp=2"},
    "mpeg4": {"g": "2", "qmax": "4"},
}
DEFAULT_TOLERANCE_S = 1e-4


def check_vcodec(vcodec: str) -> str:
    """``vcodec`` when FFmpeg can encode ``yuv420p`` video with it (``libx264``, ``libsvtav1``, ``mpeg4``);
    InvalidArgument naming ``vcodec`` otherwise."""
    import av

    try:
        codec = av.Codec(str(vcodec), "w")
        formats = [f.name for f in (codec.video_formats or ())] if codec.type == "video" else []
    except Exception:  # noqa: BLE001  (UnknownCodecError and friends: all mean "not usable")
        formats = []
    if PIX_FMT not in formats:
        raise InvalidArgument(f"vcodec {vcodec!r} is not a video encoder of this FFmpeg that writes {PIX_FMT} "
                              "(e.g. libx264, libsvtav1, mpeg4)", field="vcodec", value=vcodec)
    return vcodec


class VideoWriter:
    """The video files of one camera ``key`` under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, key: str, shape: tuple[int, ...], fps: int, vcodec: str, file_mb: float,
                 chunks_size: int) -> None:
        self.root, self.key, self.fps, self.vcodec = Path(root), key, int(fps), check_vcodec(vcodec)
        self.height, self.width = int(shape[0]), int(shape[1])
        self.limit_bytes, self.chunks_size = file_mb * (1 << 20), chunks_size
        self.chunk_index, self.file_index = 0, 0
        self.frames_in_file = 0
        self._container: Any = None
        self._stream: Any = None
        self.paths: list[Path] = []

    def _open(self) -> None:
        import av

        path = self.root / video_path(self.key, self.chunk_index, self.file_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.vcodec == "libsvtav1":
            os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its banner to stderr otherwise; errors still show
        self._container = av.open(str(path), "w", options={"movflags": "faststart"})
        stream = self._container.add_stream(self.vcodec, rate=self.fps, options=dict(CODEC_OPTIONS.get(self.vcodec, {"g": "2"})))
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, PIX_FMT
        stream.time_base = Fraction(1, self.fps)
        self._stream, self.frames_in_file = stream, 0
        self.paths.append(path)

    def add_episode(self, frames: np.ndarray) -> dict[str, Any]:
        """Append one episode's frames ``[T, H, W, 3]``; returns its ``videos/<key>/...`` episode columns."""
        import av

        if self._container is None:
            self._open()
        start = self.frames_in_file
        for i, rgb in enumerate(np.asarray(frames, dtype=np.uint8)):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = start + i
            if i == 0:
                frame.pict_type = av.video.frame.PictureType.I
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        self.frames_in_file = start + len(frames)
        row = {f"videos/{self.key}/chunk_index": self.chunk_index, f"videos/{self.key}/file_index": self.file_index,
               f"videos/{self.key}/from_timestamp": start / self.fps,
               f"videos/{self.key}/to_timestamp": self.frames_in_file / self.fps}
        if self.paths[-1].exists() and os.path.getsize(self.paths[-1]) >= self.limit_bytes:
            self._finish()
            self.chunk_index, self.file_index = next_file(self.chunk_index, self.file_index, self.chunks_size)
        return row

    def _finish(self) -> None:
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = self._stream = None

    def close(self) -> None:
        """Flush the encoder and close the open file (idempotent)."""
        self._finish()


def video_info(path: Path) -> dict[str, Any]:
    """A video feature's ``info`` block of ``info.json``, read from the file ``path``."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pix_fmt = stream.pix_fmt or PIX_FMT
        channels = 1 if "gray" in pix_fmt else 4 if ("rgba" in pix_fmt or "yuva" in pix_fmt) else 3
        return {"video.height": stream.height, "video.width": stream.width, "video.codec": stream.codec.canonical_name,
                "video.pix_fmt": pix_fmt, "video.is_depth_map": False, "video.fps": int(stream.base_rate),
                "video.channels": channels, "has_audio": bool(container.streams.audio)}


def decode_episode(path: Path, from_timestamp: float, timestamps: np.ndarray, shape: tuple[int, ...],
                   tolerance_s: float = DEFAULT_TOLERANCE_S) -> np.ndarray:
    """The episode's frames uint8 ``[T, *shape]`` from video ``path`` (see the module docstring)."""
    import av

    want = float(from_timestamp) + np.asarray(timestamps, dtype=np.float64)
    t_count = want.shape[0]
    out = np.empty((t_count, *shape), dtype=np.uint8)
    got = np.zeros(t_count, dtype=bool)
    if t_count == 0:
        return out
    h, w = int(shape[0]), int(shape[1])
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise IntegrityError(f"video {path} cannot be opened ({exc})", field="video", value=str(path)) from None
    with container:
        stream = container.streams.video[0]
        if (stream.height, stream.width) != (h, w):
            raise IntegrityError(f"video {path} is {stream.height}x{stream.width}, the feature is {h}x{w}", field="video",
                                 value=str(path))
        target = max(0.0, want[0] - tolerance_s)
        container.seek(int(math.floor(target / stream.time_base)), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * frame.time_base)
            if t > want[-1] + tolerance_s:
                break
            j = int(np.searchsorted(want, t))
            best = min((k for k in (j - 1, j) if 0 <= k < t_count), key=lambda k: abs(want[k] - t))
            if abs(want[best] - t) <= tolerance_s and not got[best]:
                out[best] = frame.to_ndarray(format="rgb24")
                got[best] = True
    if not got.all():
        missing = np.flatnonzero(~got)
        raise IntegrityError(f"video {path} lacks {missing.size} frame(s) of the episode (first: frame {int(missing[0])} at "
                             f"{want[missing[0]]:.6f}s, tolerance {tolerance_s}s)", field="video", value=str(path))
    return out
