"""LeRobotDataset v3.0: read and write Hugging Face LeRobot's dataset format, and map its features to
a job's tensors. Pure format code: it imports only :mod:`fleetloop.errors`, :mod:`fleetloop.specs`,
:mod:`fleetloop.dataset` and third-party libraries (pyarrow, numpy, PyAV, PyYAML; the ``data`` extra).

Modules, one job each:

- :mod:`.layout`: the on-disk layout (paths, default features), :class:`Feature`,
  :class:`LeRobotEpisode`, feature and frame checks;
- :mod:`.meta`: ``info.json``, ``tasks.parquet``, ``meta/episodes`` and the data parquet schema;
- :mod:`.stats`: per-episode and dataset feature statistics;
- :mod:`.video` (MP4 per camera, PyAV) and :mod:`.png` (``image`` features);
- :mod:`.writer`: :func:`write_dataset`; :mod:`.reader`: :class:`LeRobotReader`;
- :mod:`.mapping`: :class:`FeatureMapping` (YAML: LeRobot feature -> job tensor) and its checks.

Format decisions: videos are ``yuv420p`` (``libx264`` by default; ``libsvtav1`` and ``mpeg4`` work
too), so a ``video`` feature must be RGB with even height and width: odd sizes are refused with an
InvalidArgument naming the feature, never padded (store such cameras as ``image``: lossless PNG in
the data parquet). Each camera's episodes are concatenated in one MP4 per file; an episode's frames
start at its ``from_timestamp``, one every ``1 / fps`` seconds.

LeRobot's own loader (the ``lerobot`` package) cannot be installed beside this project's torch
because it needs torchvision; ``tests/unit/test_lerobot_format.py`` therefore checks the layout
field by field against the facts LeRobot's loader relies on.
"""

from fleetloop.lerobot.layout import CODEBASE_VERSION, DEFAULT_FEATURES, Feature, LeRobotEpisode
from fleetloop.lerobot.mapping import BoundMapping, Converted, FeatureMapping, area_resize
from fleetloop.lerobot.reader import LeRobotReader
from fleetloop.lerobot.writer import write_dataset

__all__ = ["CODEBASE_VERSION", "DEFAULT_FEATURES", "BoundMapping", "Converted", "Feature", "FeatureMapping",
           "LeRobotEpisode", "LeRobotReader", "area_resize", "write_dataset"]
