"""fleetloop.vision: the built-in visuomotor policy (and the image probe helper of the integration tests)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fleetloop.errors import InvalidArgument
from fleetloop.policies import COND_POSITIVE, build_policy, guided_action
from fleetloop.specs import PolicySpec
from fleetloop.vision import ResNet18, VisuomotorPolicy, random_shift, visuomotor_policy
from fleetloop.weights import sha256_hex, state_dict_to_blob
from tests.helpers.image_probe_policy import KEEP, image_digest, image_probe_policy

VISION = "fleetloop.vision:visuomotor_policy"
CAMS = ("corner3", "gripperPOV")


def pixel_spec(px: int = 16, cams=CAMS, proprio: int = 8, tasks=("a", "b", "c")) -> PolicySpec:
    obs = ([{"name": "proprio", "dtype": "float32", "shape": [proprio]}] if proprio else []) + \
          [{"name": c, "dtype": "uint8", "shape": [px, px, 3]} for c in cams]
    return PolicySpec.from_specs(obs, [{"name": "action", "dtype": "float32", "shape": [4]}], list(tasks))


def batch(spec: PolicySpec, n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for o in spec.observations:
        if o.is_image:
            out[o.name] = torch.randint(0, 256, (n, *o.shape), dtype=torch.uint8, generator=g)
        else:
            out[o.name] = torch.randn(n, *o.shape, generator=g)
    return out


def tasks(n: int = 6) -> torch.Tensor:
    return torch.arange(n) % 3


@pytest.mark.parametrize("px", [16, 84])
def test_forward_shape_and_range(px):
    spec = pixel_spec(px)
    policy = visuomotor_policy(spec)
    assert isinstance(policy, VisuomotorPolicy) and policy.conditioned is False
    assert policy.cameras == CAMS and len(policy.trunk.encoders) == 2
    for mode in (policy.train, policy.eval):
        mode()
        out = policy(batch(spec), tasks())
        assert out.shape == (6, 4) and out.dtype == torch.float32
        assert torch.isfinite(out).all() and out.abs().max() <= 1.0


def test_builds_through_build_policy_with_json_kwargs():
    spec = pixel_spec(16)
    kwargs = {"cameras": ["gripperPOV"], "feature_dim": 32, "hidden": [64, 64], "shift_pad": 2}
    for given in (kwargs, json.dumps(kwargs)):
        policy = build_policy(VISION, given, spec)
        assert isinstance(policy, VisuomotorPolicy) and policy.cameras == ("gripperPOV",)
        assert policy.trunk.out_dim == 32 + 64
        assert policy(batch(spec), tasks()).shape == (6, 4)


def test_shift_only_in_train_mode():
    spec = pixel_spec(16)
    policy = visuomotor_policy(spec, shift_pad=4)
    obs, t = batch(spec), tasks()
    policy.eval()
    with torch.no_grad():
        assert torch.equal(policy(obs, t), policy(obs, t))
    policy.train()
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.allclose(policy(obs, t), policy(obs, t))
    no_shift = visuomotor_policy(spec, shift_pad=0).train()
    with torch.no_grad():
        assert torch.equal(no_shift(obs, t), no_shift(obs, t))


def test_random_shift_is_replicate_pad_then_crop():
    img = torch.randint(0, 256, (5, 12, 10, 3), dtype=torch.uint8)
    pad = 3
    torch.manual_seed(7)
    got = random_shift(img, pad)
    torch.manual_seed(7)  # the same draws, in the same order: row offsets, then column offsets
    sy = torch.randint(-pad, pad + 1, (5, 1))[:, 0] + pad
    sx = torch.randint(-pad, pad + 1, (5, 1))[:, 0] + pad
    padded = F.pad(img.permute(0, 3, 1, 2).float(), (pad,) * 4, mode="replicate")
    want = torch.stack([padded[i, :, sy[i]:sy[i] + 12, sx[i]:sx[i] + 10] for i in range(5)])
    assert got.dtype == torch.uint8 and got.shape == img.shape
    assert torch.equal(got.permute(0, 3, 1, 2).float(), want)
    assert random_shift(img, 0) is img


def test_output_depends_on_each_selected_camera_only():
    spec = pixel_spec(16)
    policy = visuomotor_policy(spec).eval()
    obs, t = batch(spec), tasks()
    with torch.no_grad():
        base = policy(obs, t)
        for cam in CAMS:
            changed = dict(obs, **{cam: 255 - obs[cam]})
            assert not torch.allclose(policy(changed, t), base)
        one = visuomotor_policy(spec, cameras=["corner3"]).eval()
        ref = one(obs, t)
        assert torch.equal(one(dict(obs, gripperPOV=255 - obs["gripperPOV"]), t), ref)
        assert not torch.allclose(one(dict(obs, corner3=255 - obs["corner3"]), t), ref)


def test_state_dict_loads_into_a_second_instance():
    spec = pixel_spec(16)
    torch.manual_seed(0)
    a = visuomotor_policy(spec, conditioned=True).eval()
    torch.manual_seed(1)
    b = visuomotor_policy(spec, conditioned=True).eval()
    obs, t = batch(spec), tasks()
    with torch.no_grad():
        assert not torch.allclose(a(obs, t), b(obs, t))
        b.load_state_dict(a.state_dict())
        assert torch.equal(a(obs, t), b(obs, t))
    # the safetensors round trip the learner -> robot path uses
    from safetensors.torch import load as st_load
    c = visuomotor_policy(spec, conditioned=True).eval()
    c.load_state_dict(st_load(state_dict_to_blob(a.state_dict())))
    with torch.no_grad():
        assert torch.equal(a(obs, t), c(obs, t))


def test_unknown_camera_names_the_field_and_value():
    with pytest.raises(InvalidArgument) as err:
        visuomotor_policy(pixel_spec(16), cameras=["corner3", "wrist"])
    assert err.value.field == "policy_kwargs.cameras" and err.value.value == "wrist"
    assert "policy_kwargs.cameras" in str(err.value) and "wrist" in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        build_policy(VISION, {"cameras": "nope"}, pixel_spec(16))
    assert err.value.field == "policy_kwargs.cameras"


@pytest.mark.parametrize("kwargs, field", [
    ({"encoder": "vit"}, "policy_kwargs.encoder"),
    ({"feature_dim": 0}, "policy_kwargs.feature_dim"),
    ({"shift_pad": -1}, "policy_kwargs.shift_pad"),
    ({"hidden": [64, 0]}, "policy_kwargs.hidden"),
    ({"hidden": 64}, "policy_kwargs.hidden"),
    ({"cameras": ["corner3", "corner3"]}, "policy_kwargs.cameras"),
    ({"encoder_weights": "/x.safetensors"}, "policy_kwargs.encoder_weights"),  # drq takes none
    ({"encoder": "resnet18", "encoder_weights": "/no/such/file.safetensors"}, "policy_kwargs.encoder_weights"),
])
def test_bad_kwargs_name_their_field(kwargs, field):
    with pytest.raises(InvalidArgument) as err:
        visuomotor_policy(pixel_spec(16), **kwargs)
    assert err.value.field == field


def test_no_input_at_all_is_refused_but_cameras_only_works():
    with pytest.raises(InvalidArgument):
        visuomotor_policy(pixel_spec(16, proprio=0), cameras=[])
    spec = pixel_spec(16, proprio=0)
    policy = visuomotor_policy(spec)
    assert policy.trunk.proprio is None and policy(batch(spec), tasks()).shape == (6, 4)


def test_conditioned_policy_uses_cond_and_guided_action():
    spec = pixel_spec(16)
    policy = visuomotor_policy(spec, conditioned=True, cond_dim=4).eval()
    assert policy.conditioned is True
    obs, t = batch(spec), tasks()
    with torch.no_grad():
        unc = policy(obs, t, None)
        assert torch.equal(unc, policy(obs, t, torch.zeros(6, dtype=torch.long)))
        pos = policy(obs, t, torch.full((6,), COND_POSITIVE))
        assert not torch.allclose(unc, pos)
    assert torch.equal(guided_action(policy, obs, t, beta=1.0), pos)


def test_value_encoder_is_fresh_and_maps_obs_to_features():
    spec = pixel_spec(16)
    policy = visuomotor_policy(spec, feature_dim=32)
    enc, width = policy.value_encoder()
    assert width == 2 * 32 + 64 == policy.trunk.out_dim
    own = {p.data_ptr() for p in policy.parameters()}
    assert not any(p.data_ptr() in own for p in enc.parameters())
    assert enc.state_dict().keys() == policy.trunk.state_dict().keys()
    assert any(not torch.equal(a, b) for a, b in zip(enc.parameters(), policy.trunk.parameters()))
    feats = enc.eval()(batch(spec))
    assert feats.shape == (6, width)
    feats.sum().backward()  # trainable on its own
    assert all(p.grad is not None for p in enc.parameters())
    assert all(p.grad is None for p in policy.parameters())


def test_channels_last_and_bf16_autocast_keep_working():
    spec = pixel_spec(16)
    policy = visuomotor_policy(spec).eval()
    obs, t = batch(spec), tasks()
    with torch.no_grad():
        ref = policy(obs, t)
        policy.to(memory_format=torch.channels_last)
        conv = policy.trunk.encoders[0].backbone[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(policy(obs, t), ref, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = policy(obs, t)
        assert out.shape == (6, 4) and torch.isfinite(out).all()


def test_resnet18_encoder_weights_load_strictly(tmp_path):
    spec = pixel_spec(16, cams=("corner3",))
    torch.manual_seed(3)
    source = ResNet18(3)
    tensors = dict(source.state_dict(), **{"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)})
    path = tmp_path / "r18.safetensors"
    path.write_bytes(state_dict_to_blob(tensors))
    policy = visuomotor_policy(spec, encoder="resnet18", encoder_weights=str(path),
                               encoder_sha256=sha256_hex(path.read_bytes()))
    loaded = policy.trunk.encoders[0].backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    assert policy.eval()(batch(spec), tasks()).shape == (6, 4)
    with pytest.raises(InvalidArgument) as err:
        visuomotor_policy(spec, encoder="resnet18", encoder_weights=str(path), encoder_sha256="0" * 64)
    assert err.value.field == "policy_kwargs.encoder_sha256"
    del tensors["layer1.0.conv1.weight"]
    path.write_bytes(state_dict_to_blob(tensors))
    with pytest.raises(InvalidArgument) as err:
        visuomotor_policy(spec, encoder="resnet18", encoder_weights=str(path))
    assert err.value.field == "policy_kwargs.encoder_weights" and "layer1.0.conv1.weight" in str(err.value)


def test_bc_learns_action_from_brightness_at_16px():
    """Behaviour cloning: action = sign of the first camera's mean brightness (state is noise)."""
    torch.manual_seed(0)
    spec = pixel_spec(16)
    policy = visuomotor_policy(spec, feature_dim=32, hidden=(64, 64), shift_pad=2)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)

    def sample(n: int = 32):
        bright = torch.rand(n) < 0.5
        level = torch.where(bright, 150.0, 100.0).view(n, 1, 1, 1)
        cam = (level + 40 * torch.randn(n, 16, 16, 3)).clamp(0, 255).to(torch.uint8)
        other = torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8)
        obs = {"proprio": torch.randn(n, 8), "corner3": cam, "gripperPOV": other}
        return obs, torch.randint(0, 3, (n,)), torch.where(bright, 0.8, -0.8).view(n, 1).expand(n, 4)

    def eval_loss() -> float:
        policy.eval()
        with torch.no_grad():
            obs, t, act = sample(256)
            return float(F.mse_loss(policy(obs, t), act))

    torch.manual_seed(1)
    before = eval_loss()
    start = time.monotonic()
    for _ in range(300):
        policy.train()
        obs, t, act = sample()
        loss = F.mse_loss(policy(obs, t), act)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.1 * before and after < 0.05, (before, after)
    assert time.monotonic() - start < 10


def test_image_probe_records_only_in_train_mode_and_reads_only_its_camera(tmp_path):
    spec = pixel_spec(8)
    record = tmp_path / "seen.txt"
    probe = build_policy("tests.helpers.image_probe_policy:image_probe_policy",
                         {"camera": "gripperPOV", "record_to": str(record)}, spec)
    assert probe.conditioned is False and probe.camera == "gripperPOV"
    obs, t = batch(spec, n=4), tasks(4)
    probe.eval()
    out = probe(obs, t)
    assert out.shape == (4, 4) and probe.seen == [] and probe.calls == 0
    changed = dict(obs, corner3=255 - obs["corner3"], proprio=obs["proprio"] + 1)
    assert torch.equal(probe(changed, t), out)
    assert not torch.equal(probe(dict(obs, gripperPOV=255 - obs["gripperPOV"]), t), out)
    probe.train()
    probe(obs, t)
    assert probe.calls == 1
    assert probe.seen == [image_digest(obs["gripperPOV"][i].numpy()) for i in range(4)]
    assert record.read_text().split() == probe.seen
    probe.seen = ["x"] * KEEP
    probe(obs, t)
    assert len(probe.seen) == KEEP and probe.seen[-1] == image_digest(np.asarray(obs["gripperPOV"][3]))
    with pytest.raises(InvalidArgument) as err:
        image_probe_policy(spec, camera="wrist")
    assert err.value.field == "policy_kwargs.camera"


def test_bc_weights_lift_into_a_conditioned_policy(tmp_path):
    """A BC (unconditioned) visuomotor file starts a RECAP (conditioned) one: the indicator embedding's
    columns come last in the head's first layer, so learner.pretrain's lift pads them with zeros."""
    from learner.pretrain import load_initial_weights

    spec = pixel_spec(16)
    bc = visuomotor_policy(spec).eval()
    path = tmp_path / "bc.safetensors"
    path.write_bytes(state_dict_to_blob(bc.state_dict()))
    recap = visuomotor_policy(spec, conditioned=True)
    assert load_initial_weights(recap, path).get("lifted") == "true"
    obs, t = batch(spec), tasks()
    with torch.no_grad():
        want = bc(obs, t)
        recap.eval()
        assert torch.allclose(recap(obs, t, torch.full((6,), COND_POSITIVE)), want, atol=1e-6)


def test_image_probe_fits_a_brightness_target_quickly():
    """The integration test asks for the loss to halve within ~150 learner steps (AdamW, lr 1e-3)."""
    torch.manual_seed(0)
    spec = pixel_spec(16)
    probe = image_probe_policy(spec, camera="corner3")
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3)
    losses = []
    for _ in range(150):
        b = torch.rand(16) * 215 + 20
        cam = (b.view(16, 1, 1, 1) + 12 * torch.randn(16, 16, 16, 3)).clamp(0, 255).to(torch.uint8)
        target = torch.stack([b / 127.5 - 1, 0.5 - b / 255, b * 0, b * 0], dim=1).clamp(-1, 1)
        loss = F.mse_loss(probe({"corner3": cam}, torch.zeros(16, dtype=torch.long)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.25 * losses[0], (losses[0], losses[-10:])
