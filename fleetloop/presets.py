"""Tensor spec presets shared by the actor, the learner and the control plane.

A job's per-step tensors are declared as specs (see :mod:`fleetloop.specs`). The built-in simulated
robot (Meta-World) has exactly two layouts, and everything that starts or talks to one (the control
plane's ``JobSpec``, the robot process, the benches) takes them from :func:`metaworld_specs`, so the
learner's config and the robot's handshake agree by construction.

Contract: :func:`metaworld_specs` returns *plain dicts* ``{"name", "dtype", "shape", "low",
"high"}`` (new lists on every call, safe to mutate), accepted as they are by
``learner.config.SpecModel`` and, unpacked, by :func:`fleetloop.codec.make_spec`.

- ``"state"``: ``state`` float32 ``[39]`` (Meta-World's full observation vector).
- ``"pixels"``: ``proprio`` float32 ``[8]`` (the robot's own state, as the simulated robot's
  pixel mode defines it), then one uint8 ``[S, S, 3]`` image per camera (channels last, RGB), in
  the order of ``cameras``.
- Both: ``action`` float32 ``[4]`` bounded to ``[-1, 1]``.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from fleetloop.errors import InvalidArgument

#: Observation layouts of the simulated robot.
OBSERVATION_MODES: tuple[str, ...] = ("state", "pixels")
#: Meta-World's observation vector (``state``) width.
STATE_DIM = 39
#: Width of the ``proprio`` vector of the pixel layout.
PROPRIO_DIM = 8
#: Action width and bounds of the simulated robot.
ACTION_DIM = 4
ACTION_LOW, ACTION_HIGH = -1.0, 1.0
#: Meta-World's cameras (``MujocoEnv`` camera names).
METAWORLD_CAMERAS: tuple[str, ...] = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper",
                                      "gripperPOV")
#: Cameras of the pixel layout when none are named: a fixed view of the scene and one on the gripper.
DEFAULT_CAMERAS: tuple[str, ...] = ("corner3", "gripperPOV")
#: Side of the square camera images (pixels) when none is given, and the allowed range.
DEFAULT_IMAGE_SIZE = 84
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 256


def _spec(name: str, dtype: str, shape: Sequence[int], low: Sequence[float] = (), high: Sequence[float] = ()) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": [int(d) for d in shape], "low": [float(x) for x in low],
            "high": [float(x) for x in high]}


def check_cameras(cameras: Sequence[str], field: str = "cameras") -> list[str]:
    """``cameras`` as a list, each one of :data:`METAWORLD_CAMERAS`, at least one, no repeats;
    InvalidArgument naming ``field[i]`` (or ``field``) and the offending value otherwise."""
    if isinstance(cameras, str):  # "corner3" is one camera, not seven one-letter ones
        raise InvalidArgument(f"{field} is a list of camera names, got the string {cameras!r}", field=field, value=cameras)
    cams = [str(c) for c in cameras]
    if not cams:
        raise InvalidArgument(f"{field} must name at least one camera of {list(METAWORLD_CAMERAS)}", field=field,
                              value=cams)
    for i, cam in enumerate(cams):
        if cam not in METAWORLD_CAMERAS:
            raise InvalidArgument(f"{field}[{i}] {cam!r} is not a Meta-World camera ({list(METAWORLD_CAMERAS)})",
                                  field=f"{field}[{i}]", value=cam)
        if cam in cams[:i]:
            raise InvalidArgument(f"{field}[{i}] {cam!r} repeats {field}[{cams.index(cam)}]", field=f"{field}[{i}]",
                                  value=cam)
    return cams


def metaworld_specs(observations: Literal["state", "pixels"] = "state", cameras: Sequence[str] = DEFAULT_CAMERAS,
                    image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(observation specs, action specs) of the simulated Meta-World robot, as plain dicts (see the
    module docstring). ``cameras`` and ``image_size`` matter only for ``"pixels"`` (they are still
    validated). InvalidArgument naming ``observations`` / ``cameras[i]`` / ``image_size`` and the
    value for an unknown mode, camera, a repeated camera, or a size outside
    [:data:`MIN_IMAGE_SIZE`, :data:`MAX_IMAGE_SIZE`]."""
    if observations not in OBSERVATION_MODES:
        raise InvalidArgument(f"observations {observations!r} is not one of {list(OBSERVATION_MODES)}",
                              field="observations", value=observations)
    cams = check_cameras(cameras)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise InvalidArgument(f"image_size {image_size!r} must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]",
                              field="image_size", value=image_size)
    act = [_spec("action", "float32", [ACTION_DIM], [ACTION_LOW] * ACTION_DIM, [ACTION_HIGH] * ACTION_DIM)]
    if observations == "state":
        return [_spec("state", "float32", [STATE_DIM])], act
    return [_spec("proprio", "float32", [PROPRIO_DIM])] + [_spec(c, "uint8", [image_size, image_size, 3]) for c in cams], act
