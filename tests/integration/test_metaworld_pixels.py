"""MetaWorldEnv in pixels mode: camera observations rendered headless (EGL), no privileged state in
them, upright and unmirrored images, reproducible frames, the scripted expert still working from the
env's private state; state mode unchanged. Rendering setup: actor/envs/render.py."""

from __future__ import annotations

import numpy as np
import pytest

from actor.envs import MetaWorldEnv, make_env
from actor.envs.metaworld_env import PROPRIO_INDEX
from fleetloop.errors import FailedPrecondition, InvalidArgument
from fleetloop.presets import METAWORLD_CAMERAS, metaworld_specs

pytestmark = pytest.mark.filterwarnings("ignore:Constant")

S = 84
CAMS = ("corner3", "gripperPOV")
#: Meta-World's fixed cameras mounted upside down: delivered rolled 180 degrees (a mirror image if only flipped)
ROLLED = {"corner", "corner2", "corner3", "corner4"}


@pytest.fixture(scope="module")
def drawer() -> MetaWorldEnv:
    env = MetaWorldEnv("drawer-open-v3", seed=0, max_episode_steps=200, observations="pixels", cameras=CAMS,
                       image_size=S)
    yield env
    env.close()


@pytest.mark.timeout(120)
def test_keys_dtypes_and_shapes_follow_the_preset(drawer: MetaWorldEnv) -> None:
    obs_specs, _ = metaworld_specs("pixels", CAMS, S)
    expected = [(s["name"], s["dtype"], tuple(s["shape"])) for s in obs_specs]
    obs = drawer.reset(seed=1)
    step = drawer.step(np.zeros(4, np.float32)).obs
    for o in (obs, step):
        assert isinstance(o, dict) and list(o) == ["proprio", *CAMS]
        assert [(k, str(v.dtype), v.shape) for k, v in o.items()] == expected
        assert all(v.flags.c_contiguous for v in o.values())
    assert drawer.obs_dim == 8 and drawer.act_dim == 4 and drawer.cameras == CAMS
    # proprio is the hand and gripper (now, one frame before) and nothing else of the 39-vector
    state = drawer.privileged_state()
    np.testing.assert_array_equal(step["proprio"], state[PROPRIO_INDEX])
    np.testing.assert_array_equal(step["proprio"][4:], obs["proprio"][:4])  # the previous frame is the last one


@pytest.mark.timeout(120)
def test_proprio_hides_the_layout_the_images_show_it(drawer: MetaWorldEnv) -> None:
    a, state_a = drawer.reset(seed=11), drawer.privileged_state()
    b, state_b = drawer.reset(seed=12), drawer.privileged_state()
    assert not np.allclose(state_a[4:7], state_b[4:7]) and not np.allclose(state_a[36:39], state_b[36:39])
    np.testing.assert_array_equal(a["proprio"], b["proprio"])  # t=0: the layout is only in the pixels
    assert not np.array_equal(a["corner3"], b["corner3"])
    for obj_or_goal in (state_a[4:7], state_a[36:39]):  # no object/goal coordinate leaks into proprio
        assert not np.isin(np.round(obj_or_goal, 5), np.round(a["proprio"], 5)).any()


@pytest.mark.timeout(120)
def test_goal_site_is_current_right_after_reset() -> None:
    env = make_env("reach-v3", seed=0, observations="pixels", cameras=("topview",), image_size=32)
    try:
        model, data = env.physics
        goal = model.site("goal").id
        for seed in (0, 1, 2):  # the second reset is the one that used to draw the previous goal
            env.reset(seed=seed)
            np.testing.assert_allclose(data.site_xpos[goal], env.privileged_state()[36:39], atol=1e-6)
    finally:
        env.close()


def _pinhole(model, data, cam: str, point: np.ndarray) -> np.ndarray:
    """(row, col) where ``point`` appears in an S x S image of ``cam`` as MuJoCo's camera frame
    defines it (x right, y up, looking along -z). Independent of the renderer's code."""
    i = model.camera(cam).id
    v = data.cam_xmat[i].reshape(3, 3).T @ (np.asarray(point, float) - data.cam_xpos[i])
    f = (S / 2) / np.tan(np.deg2rad(model.cam_fovy[i]) / 2)
    return np.array([S / 2 - f * v[1] / -v[2], S / 2 + f * v[0] / -v[2]])


#: the image transforms a renderer could apply, as maps of a (row, col) position
TRANSFORMS = {"none": lambda rc: rc, "roll180": lambda rc: S - rc,
              "vflip": lambda rc: np.array([S - rc[0], rc[1]]), "hflip": lambda rc: np.array([rc[0], S - rc[1]])}


def _seen_at(model, data, cam: str, point: np.ndarray) -> np.ndarray:
    return TRANSFORMS["roll180" if cam in ROLLED else "none"](_pinhole(model, data, cam, point))


@pytest.mark.timeout(180)
def test_every_camera_is_upright_and_unmirrored() -> None:
    """A magenta marker moved through the scene appears where a pinhole camera puts it, rolled 180
    degrees for the upside-down fixed cameras and untouched otherwise; not where a flip (a mirror
    image) would put it. Under that mapping world-up is image-up (fixed cameras), and the gripper
    camera has forward at the top and its right on the right."""
    env = make_env("drawer-open-v3", seed=0, observations="pixels", cameras=METAWORLD_CAMERAS, image_size=S)
    try:
        import mujoco

        env.reset(seed=3)
        model, data = env.physics
        site = model.site("goal").id
        model.site_rgba[site] = [1.0, 0.0, 1.0, 1.0]
        model.site_size[site][0] = 0.03
        hand = env.privileged_state()[:3].astype(float)
        points = ([np.array([x, y, z]) for x in (-0.2, 0.0, 0.2) for y in (0.45, 0.65, 0.85) for z in (0.05, 0.3)]
                  + [hand + np.array([dx, dy, -0.12]) for dx in (-0.06, 0.06) for dy in (-0.06, 0.06)])
        seen = {cam: 0 for cam in METAWORLD_CAMERAS}
        for p in points:
            model.site_pos[site] = p
            mujoco.mj_forward(model, data)
            for cam, img in env.render().items():
                px = img.astype(int)
                mask = (px[..., 0] > 100) & (px[..., 2] > 100) & (px[..., 1] < 80) & (abs(px[..., 0] - px[..., 2]) < 60)
                raw = _pinhole(model, data, cam, p)
                expected = _seen_at(model, data, cam, p)
                others = [t(raw) for name, t in TRANSFORMS.items() if name != ("roll180" if cam in ROLLED else "none")]
                if mask.sum() < 6 or not ((4 <= expected) & (expected <= S - 4)).all():
                    continue  # occluded, clipped or off-screen
                centroid = np.argwhere(mask).mean(axis=0) + 0.5
                assert np.abs(centroid - expected).max() < 2.0, (cam, p, centroid, expected)
                seen[cam] += all(np.abs(centroid - o).max() > 4.0 for o in others)  # only this transform fits
        assert min(seen.values()) >= 2, seen
        # Up is up: for every fixed camera, a point 10 cm higher is drawn higher in the image.
        p = np.array([0.0, 0.65, 0.1])
        for cam in ("corner", "corner2", "corner3", "corner4", "behindGripper"):
            low, high = (_seen_at(model, data, cam, q) for q in (p, p + [0, 0, 0.1]))
            assert high[0] < low[0], cam
        # The gripper camera looks down at the table like the robot: forward at the top, its right on the right.
        q = hand - [0, 0, 0.15]
        base, ahead, right = (_seen_at(model, data, "gripperPOV", x) for x in (q, q + [0, 0.05, 0], q + [0.05, 0, 0]))
        assert ahead[0] < base[0] and right[1] > base[1]
        # And plainly, for the view that shows the horizon: the dark background is above the table.
        dark = env.render()["corner"].astype(int).sum(axis=-1) < 30
        assert dark[: S // 2].sum() > 10 * max(1, dark[S // 2:].sum())
    finally:
        env.close()


@pytest.mark.timeout(180)
def test_scripted_expert_succeeds_from_a_pixel_observation(drawer: MetaWorldEnv) -> None:
    """expert_action reads the env's private state: handed the pixel observation, it still opens the drawer."""
    from actor.operators import ScriptedExpertOperator

    for seed in (0, 1):
        obs = drawer.reset(seed=seed)
        for step in range(drawer.max_episode_steps):
            result = drawer.step(drawer.expert_action(obs))
            obs = result.obs
            if result.done:
                break
        assert result.success and result.terminated, (seed, step)
        assert list(obs) == ["proprio", *CAMS]
    # the scripted operator (it plays the human) hands the policy's observation to the env: the expert's action
    obs = drawer.reset(seed=2)
    op = ScriptedExpertOperator(drawer, deviation_threshold=1e-6, patience_k=1, hold_steps=5)
    decision = op.decide(obs, np.zeros(4, np.float32), 0)
    assert decision.intervened
    np.testing.assert_array_equal(decision.action, drawer.expert_action(obs))


@pytest.mark.timeout(120)
def test_same_seed_same_first_frame(drawer: MetaWorldEnv) -> None:
    first = drawer.reset(seed=7)
    drawer.step(np.ones(4, np.float32))
    drawer.reset(seed=8)
    again = drawer.reset(seed=7)
    other = MetaWorldEnv("drawer-open-v3", seed=99, observations="pixels", cameras=CAMS, image_size=S)
    try:
        elsewhere = other.reset(seed=7)
    finally:
        other.close()
    for o in (again, elsewhere):
        assert list(o) == list(first)
        for k in first:
            np.testing.assert_array_equal(o[k], first[k], err_msg=k)


@pytest.mark.timeout(120)
def test_state_mode_is_unchanged() -> None:
    """State mode: float32 [39] arrays, no renderer, the expert acts on the observation's own values."""
    from metaworld.policies import ENV_POLICY_MAP

    env = make_env("push-v3", seed=0, max_episode_steps=20)
    expert = ENV_POLICY_MAP["push-v3"]()
    try:
        assert env.obs_dim == 39 and env.cameras == ()
        obs = env.reset(seed=4)
        for _ in range(20):
            assert isinstance(obs, np.ndarray) and obs.dtype == np.float32 and obs.shape == (39,)
            np.testing.assert_array_equal(obs, env.privileged_state())
            action = env.expert_action(obs)
            np.testing.assert_array_equal(action, np.clip(expert.get_action(obs.astype(np.float64)), -1, 1)
                                          .astype(np.float32))
            result = env.step(action)
            obs = result.obs
            if result.done:
                break
        obs[:] = 0  # the caller owns the observation: the env's private state is a separate array
        assert env.privileged_state().any()
        with pytest.raises(FailedPrecondition, match="observations"):
            env.render()
    finally:
        env.close()


@pytest.mark.timeout(60)
def test_bad_options_name_the_field_and_value() -> None:
    cases = [(dict(cameras=("corner3", "bogus")), "cameras[1]", "bogus"),
             (dict(cameras=("corner3", "corner3")), "cameras[1]", "corner3"),
             (dict(cameras=()), "cameras", []),
             (dict(cameras="corner3"), "cameras", "corner3"),
             (dict(image_size=8), "image_size", 8),
             (dict(image_size=512), "image_size", 512),
             (dict(image_size=True), "image_size", True),
             (dict(observations="rgb"), "observations", "rgb")]
    for kwargs, field, value in cases:
        with pytest.raises(InvalidArgument) as info:
            MetaWorldEnv("reach-v3", observations=kwargs.pop("observations", "pixels"), **kwargs)
        assert info.value.field == field and info.value.value == value, (kwargs, info.value)
    with pytest.raises(InvalidArgument, match="gripperPOV"):  # the message lists the valid cameras
        MetaWorldEnv("reach-v3", observations="pixels", cameras=("nope",))


@pytest.mark.timeout(60)
def test_a_gl_backend_that_cannot_start_names_the_packages(monkeypatch) -> None:
    from actor.envs import render

    class Broken:
        def __init__(self, width: int, height: int) -> None:
            raise RuntimeError("eglInitialize failed")

    monkeypatch.setattr(render, "gl_context_class", lambda: Broken)
    with pytest.raises(FailedPrecondition) as info:
        make_env("reach-v3", observations="pixels", cameras=("topview",))
    msg = str(info.value)
    assert info.value.field == "MUJOCO_GL" and "eglInitialize failed" in msg
    assert all(pkg in msg for pkg in ("libegl1", "libopengl0", "libegl-mesa0", "libgl1-mesa-dri", "libgbm1"))
    assert "MUJOCO_GL=osmesa" in msg and "libosmesa6" in msg


@pytest.mark.timeout(60)
def test_default_gl_backend_respects_a_choice(monkeypatch) -> None:
    from actor.envs.render import default_gl_backend

    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    assert default_gl_backend() == "osmesa"
    monkeypatch.delenv("MUJOCO_GL")
    assert default_gl_backend() == "egl"  # libEGL is on this machine (make sysdeps)


@pytest.mark.timeout(60)
def test_built_on_one_thread_stepped_on_another() -> None:
    """Robots build envs on one thread and step them on another: the GL context follows the caller
    (EGL refuses a context still current on another thread)."""
    import threading

    env = make_env("reach-v3", observations="pixels", cameras=("topview",), image_size=32)
    try:
        first = env.reset(seed=0)
        got: dict[str, object] = {}

        def robot() -> None:
            try:
                got["obs"] = env.step(np.zeros(4, np.float32)).obs
            except Exception as exc:  # noqa: BLE001 - reported below
                got["error"] = exc

        thread = threading.Thread(target=robot)
        thread.start()
        thread.join(30)
        assert "error" not in got, got.get("error")
        assert got["obs"]["topview"].shape == (32, 32, 3) and first["topview"].any()
        assert env.step(np.zeros(4, np.float32)).obs["topview"].shape == (32, 32, 3)  # and back on this thread
    finally:
        env.close()


@pytest.mark.timeout(120)
def test_renders_through_egl_when_mujoco_was_imported_first(tmp_path) -> None:
    """A process that imported mujoco before actor.envs (MUJOCO_GL unset: MuJoCo picked GLFW, which
    needs a display) still renders headless: the renderer follows MUJOCO_GL when it is built."""
    import os
    import subprocess
    import sys

    code = ("import mujoco\n"
            "assert mujoco.GLContext.__module__ == 'mujoco.glfw', mujoco.GLContext\n"
            "from actor.envs import make_env\n"
            "env = make_env('reach-v3', observations='pixels', cameras=('corner3',), image_size=32)\n"
            "img = env.reset(seed=0)['corner3']\n"
            "assert img.shape == (32, 32, 3) and img.std() > 10, img.std()\n"
            "env.close()\n"
            "print('ok', env.__class__.__name__)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "DISPLAY",
                                                              "WAYLAND_DISPLAY")}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0 and "ok MetaWorldEnv" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.timeout(60)
def test_close_releases_the_renderer() -> None:
    env = make_env("reach-v3", observations="pixels", cameras=("gripperPOV",), image_size=16)
    env.reset(seed=0)
    assert env.render()["gripperPOV"].shape == (16, 16, 3)
    env.close()
    env.close()  # idempotent
    with pytest.raises(FailedPrecondition):
        env.render()
    with pytest.raises(FailedPrecondition):
        env.reset(seed=0)


@pytest.mark.timeout(180)
def test_bench_render_runs_and_reports(tmp_path) -> None:
    """``fleetloop bench render`` at a tiny size: the JSON holds every figure beside its baseline."""
    import json

    from services.cli import build_parser

    out = tmp_path / "render.json"
    args = build_parser().parse_args(["bench", "render", "--cameras", "corner3,gripperPOV", "--image-size", "16",
                                      "--steps", "3", "--out", str(out)])
    assert args.func(args) == 0
    doc = json.loads(out.read_text())
    assert doc["bench"] == "render" and doc["config"]["gl"]["backend"] == "egl"
    task = doc["tasks"]["drawer-open-v3"]
    assert set(task["camera_alone"]) == {"corner3@16", "gripperPOV@16"}
    assert task["pixel_step"]["16"]["raw_bytes"] == 16 * 16 * 3 and task["pixel_step"]["16"]["step"]["n"] == 3
    assert all(r["pixels"] is not None and r["baseline"] is not None and r["ratio"] is not None for r in doc["rows"])
