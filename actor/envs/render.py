"""Offscreen camera images of a MuJoCo scene: the simulated robots' pixel observations.

Contract of :class:`CameraRenderer`:

- one GL context and offscreen buffer per instance (``mujoco.Renderer``'s calls), square ``size``
  x ``size``; :meth:`CameraRenderer.render` returns ``{camera: uint8 [size, size, 3]}`` (RGB, C-contiguous,
  a fresh array per call) for the cameras given at construction, in that order;
- speed settings (measured in docs/notes/issue19-plan.md, Part 1; 130-230 ms -> 5-13 ms per 84 px
  frame on llvmpipe): shadows, reflections and the skybox are off and multisampling is off
  (``model.vis.quality.offsamples = 0``, written into the model before the context is made);
- every image is upright and unmirrored: a fixed (world-attached) camera whose "up" axis points
  below the horizon (Meta-World's ``corner``..``corner4``) is rolled 180 degrees
  (``img[::-1, ::-1]``). A vertical flip alone (``img[::-1]``) would show a mirror image of the
  scene. Cameras attached to the arm (``gripperPOV``, ``behindGripper``) are delivered as MuJoCo
  renders them;
- the caller renders only after ``mujoco.mj_forward`` (or a step) so that ``data`` is current
  (after a reset Meta-World leaves the goal site's ``site_xpos`` stale until the next forward pass).

GL backend: MuJoCo picks its own from ``MUJOCO_GL`` *when it is first imported*.
:func:`default_gl_backend` (called by :mod:`actor.envs` before anything there imports MuJoCo) sets
``egl`` when the variable is unset and ``libEGL`` loads: headless rendering through Mesa (llvmpipe
on a CPU machine, the GPU's driver elsewhere). The renderer makes its context from the variable's
value at construction (:func:`gl_context_class`), so EGL also works in a process that imported
MuJoCo earlier (a test suite, a tool). A renderer that cannot start raises
:class:`~fleetloop.errors.FailedPrecondition` naming the Debian packages to install
(:data:`GL_PACKAGES`) and the OSMesa fallback. llvmpipe starts one render thread per core unless
``LP_NUM_THREADS`` says otherwise (set it to 1 per robot when many robots share few cores).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import weakref
from typing import Any, Sequence

import numpy as np

from fleetloop.errors import FailedPrecondition, InvalidArgument

#: Debian/Ubuntu packages that provide headless EGL rendering through Mesa (`make sysdeps` installs them).
GL_PACKAGES: tuple[str, ...] = ("libegl1", "libopengl0", "libegl-mesa0", "libgl1-mesa-dri", "libgbm1")
#: The fallback when EGL cannot start (software only; installing it may upgrade the mesa packages).
OSMESA_FALLBACK = "MUJOCO_GL=osmesa with `apt-get install libosmesa6`"

# Renderers still open, closed at exit before the GL backend's own exit hook terminates its display
# (a context freed after that raises from __del__ at interpreter shutdown).
_LIVE: "weakref.WeakSet[CameraRenderer]" = weakref.WeakSet()
_EXIT_HOOK: list[bool] = []


def _close_all() -> None:
    for renderer in list(_LIVE):
        renderer.close()


def default_gl_backend() -> str | None:
    """Set ``MUJOCO_GL=egl`` unless it is already set or ``libEGL.so.1`` cannot be loaded; returns
    the value now in force (None: unset, MuJoCo's own default, GLFW, which needs a display).

    Must run before the first ``import mujoco`` in the process (Meta-World imports it through
    Gymnasium), because MuJoCo reads the variable once, at import. Leaving it unset when libEGL is
    missing keeps state-only robots working on a machine without GL libraries: with
    ``MUJOCO_GL=egl`` the MuJoCo import itself would fail there. Loading the library is a
    ``dlopen``, no subprocess.
    """
    if "MUJOCO_GL" not in os.environ:
        try:
            ctypes.CDLL("libEGL.so.1")
        except OSError:
            return None
        os.environ["MUJOCO_GL"] = "egl"
    return os.environ["MUJOCO_GL"]


def gl_unavailable(exc: BaseException, what: str = "start an offscreen renderer") -> FailedPrecondition:
    """The FailedPrecondition for a GL backend that failed to ``what``: names the backend in use, the
    packages for EGL, the OSMesa fallback and the original error."""
    backend = os.environ.get("MUJOCO_GL") or "unset (GLFW: needs a display)"
    return FailedPrecondition(
        f"MuJoCo could not {what} with MUJOCO_GL={backend}: {type(exc).__name__}: {exc}. Camera observations "
        f"render headless through EGL: install {' '.join(GL_PACKAGES)} (`make sysdeps` does; on Debian/Ubuntu "
        f"`apt-get install {' '.join(GL_PACKAGES)}`) and leave MUJOCO_GL unset or set it to egl before the "
        f"process imports mujoco; or fall back to {OSMESA_FALLBACK}.",
        field="MUJOCO_GL", value=os.environ.get("MUJOCO_GL"))


def upside_down(model: Any, camera_id: int) -> bool:
    """True for a camera fixed to the world (body 0, mode fixed) whose image "up" axis (the second
    column of its frame) points downward in the world: its images need a 180 degree roll."""
    import mujoco

    fixed = (int(model.cam_bodyid[camera_id]) == 0
             and int(model.cam_mode[camera_id]) == int(mujoco.mjtCamLight.mjCAMLIGHT_FIXED))
    up_z = float(np.asarray(model.cam_mat0[camera_id]).reshape(3, 3)[2, 1])
    return fixed and up_z < 0.0


def gl_context_class() -> Any:
    """The GL context class for the backend named by ``MUJOCO_GL`` *now*: ``egl`` and ``osmesa`` are
    loaded directly (so they work even when MuJoCo was imported earlier and picked another one, e.g.
    GLFW because ``MUJOCO_GL`` was unset then); anything else is the one MuJoCo picked at import.
    Raises whatever the backend's import raises (a missing library, a conflicting
    ``PYOPENGL_PLATFORM``)."""
    backend = os.environ.get("MUJOCO_GL", "").strip().lower()
    if backend == "egl":
        from mujoco.egl import GLContext
    elif backend == "osmesa":
        from mujoco.osmesa import GLContext
    else:
        from mujoco import GLContext
    if GLContext is None:
        raise RuntimeError(f"MuJoCo rendering is disabled (MUJOCO_GL={backend!r})")
    return GLContext


class CameraRenderer:
    """Renders ``cameras`` of ``model`` as uint8 ``[size, size, 3]`` images (see the module docstring).

    The call sequence is ``mujoco.Renderer``'s (one GL context, an offscreen ``MjrContext``,
    ``mjv_updateScene`` + ``mjr_render`` + ``mjr_readPixels`` per camera), with the context made by
    :func:`gl_context_class`, so the backend follows ``MUJOCO_GL`` whatever the import order was.

    ``cameras`` must name cameras of ``model`` (FailedPrecondition naming the missing one: the caller
    validates names against its own list first); ``size`` is the side in pixels, within the model's
    offscreen buffer (``vis.global_.offwidth/offheight``, 640x480 by default: InvalidArgument
    naming ``image_size`` otherwise). Raises FailedPrecondition (:func:`gl_unavailable`) when the GL
    backend cannot start. Mutates ``model.vis.quality.offsamples``. Not thread-safe: use an instance
    from one thread at a time (any thread: each render makes its context current and releases it).
    """

    def __init__(self, model: Any, cameras: Sequence[str], size: int) -> None:
        self._closed, self._ctx, self._con = True, None, None  # what close()/__del__ need, even if __init__ fails
        try:
            import mujoco
        except Exception as exc:  # noqa: BLE001 - an import that fails on GL is a missing-package problem
            raise gl_unavailable(exc, "be imported") from exc

        names = [model.camera(i).name for i in range(model.ncam)]
        for cam in cameras:
            if cam not in names:
                raise FailedPrecondition(f"camera {cam!r} is not in this model (cameras: {names})", field="cameras",
                                         value=cam)
        self.cameras: tuple[str, ...] = tuple(cameras)
        self.size = int(size)
        if not 1 <= self.size <= min(model.vis.global_.offwidth, model.vis.global_.offheight):
            raise InvalidArgument(f"image_size {size} does not fit the model's offscreen buffer "
                                  f"{model.vis.global_.offwidth}x{model.vis.global_.offheight}", field="image_size",
                                  value=size)
        self._mujoco = mujoco
        self._model = model
        self._ids = {cam: names.index(cam) for cam in self.cameras}
        #: cameras delivered rolled by 180 degrees (fixed cameras mounted upside down)
        self.rolled: frozenset[str] = frozenset(c for c, i in self._ids.items() if upside_down(model, i))
        model.vis.quality.offsamples = 0  # no MSAA: read when the MjrContext is made, so set it first
        self._closed = False
        try:
            self._ctx = gl_context_class()(self.size, self.size)
            self._ctx.make_current()
            self._con = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
            mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._con)
            self._release()
        except Exception as exc:  # noqa: BLE001 - every backend fails differently (FatalError, ImportError, ...)
            self.close()
            raise gl_unavailable(exc) from exc
        _LIVE.add(self)
        if not _EXIT_HOOK:  # registered after the backend's import, so it runs before the backend's hook (LIFO)
            atexit.register(_close_all)
            _EXIT_HOOK.append(True)
        self._scene = mujoco.MjvScene(model, maxgeom=10000)
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                     mujoco.mjtRndFlag.mjRND_SKYBOX):
            self._scene.flags[flag] = 0
        self._option = mujoco.MjvOption()
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._rect = mujoco.MjrRect(0, 0, self.size, self.size)
        self._buf = np.empty((self.size, self.size, 3), dtype=np.uint8)

    def render(self, data: Any) -> dict[str, np.ndarray]:
        """``{camera: uint8 [size, size, 3]}`` of the current ``data`` (after ``mj_forward``/a step),
        in construction order; each image upright, C-contiguous, owned by the caller.
        FailedPrecondition after :meth:`close`."""
        if self._closed:
            raise FailedPrecondition("the camera renderer is closed", field="renderer", value="closed")
        mj = self._mujoco
        out: dict[str, np.ndarray] = {}
        self._ctx.make_current()
        try:
            for cam in self.cameras:
                self._camera.fixedcamid = self._ids[cam]
                mj.mjv_updateScene(self._model, data, self._option, None, self._camera, mj.mjtCatBit.mjCAT_ALL,
                                   self._scene)
                mj.mjr_render(self._rect, self._scene, self._con)
                mj.mjr_readPixels(self._buf, None, self._rect, self._con)
                # GL rows run bottom-up: [::-1] is the camera's view; a rolled camera is also reversed in
                # both axes, which leaves only the columns reversed.
                out[cam] = np.ascontiguousarray(self._buf[:, ::-1] if cam in self.rolled else self._buf[::-1])
        finally:
            self._release()
        return out

    def _release(self) -> None:
        """Make no context current on this thread. An EGL context current on one thread cannot be
        made current on another (EGL_BAD_ACCESS), and robots build their envs on one thread and
        step them on another: every use ends here."""
        backend = type(self._ctx).__module__
        if backend == "mujoco.egl":
            from mujoco import egl

            egl.EGL.eglMakeCurrent(egl.EGL_DISPLAY, egl.EGL.EGL_NO_SURFACE, egl.EGL.EGL_NO_SURFACE,
                                   egl.EGL.EGL_NO_CONTEXT)
        elif backend == "mujoco.osmesa":
            from OpenGL import GL, osmesa

            osmesa.OSMesaMakeCurrent(None, None, GL.GL_FLOAT, 0, 0)
        elif backend == "mujoco.glfw":
            import glfw

            glfw.make_context_current(None)

    def gl_info(self) -> dict[str, str | None]:
        """Which GL draws the images (for reports): ``backend`` (``MUJOCO_GL``), ``renderer`` and
        ``version`` (``glGetString``; e.g. ``llvmpipe (LLVM 15.0.6, 256 bits)``: software rendering).
        Best effort: a value that cannot be read is None; never raises."""
        info: dict[str, str | None] = {"backend": os.environ.get("MUJOCO_GL"), "renderer": None, "version": None}
        if self._closed:
            return info
        try:
            self._ctx.make_current()
            from OpenGL import GL

            for key, name in (("renderer", GL.GL_RENDERER), ("version", GL.GL_VERSION)):
                raw = GL.glGetString(name)
                info[key] = raw.decode(errors="replace") if raw else None
            self._release()
        except Exception:  # noqa: BLE001 - a report detail, never a failure
            pass
        return info

    def close(self) -> None:
        """Free the GL context and buffers (idempotent; never raises)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._con is not None:
                if self._ctx is not None:
                    self._ctx.make_current()
                self._con.free()
            if self._ctx is not None:
                self._ctx.free()
        except Exception:  # noqa: BLE001 - closing must never raise
            pass
        self._con = self._ctx = None

    def __del__(self) -> None:
        # Free with this renderer's own context current: an MjrContext freed by the garbage collector
        # while another renderer's context is current would delete that context's GL objects.
        self.close()
