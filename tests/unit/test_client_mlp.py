"""fleetloop.client.mlp.MlpPolicy (numpy) gives the actions of the learner's torch MLP policies
(fleetloop.policies: mlp_policy, recap_mlp_policy with guidance) from the same state dict, reading the
vector observations in name order and ignoring cameras; it refuses other architectures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleetloop.client.mlp import MlpPolicy
from fleetloop.client.weight_client import VerifiedWeights
from fleetloop.codec import make_spec
from fleetloop.errors import InvalidArgument
from fleetloop.policies import build_policy, guided_action
from fleetloop.specs import PolicySpec
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop import wire_settings

OBS = [make_spec("z_joints", "float32", [5]), make_spec("cam", "uint8", [8, 8, 3]), make_spec("a_gripper", "float64", [2])]
ACT = [make_spec("action", "float32", [3], low=[-1] * 3, high=[1] * 3)]
TASKS = ["pick", "place"]


def _obs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"z_joints": rng.normal(size=5).astype(np.float32), "cam": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
            "a_gripper": rng.normal(size=2)}


@pytest.mark.parametrize("factory, beta", [("fleetloop.policies:mlp_policy", 1.0),
                                           ("fleetloop.policies:recap_mlp_policy", 1.0),
                                           ("fleetloop.policies:recap_mlp_policy", 1.7)])
def test_numpy_mlp_equals_the_torch_policy(factory, beta):
    torch.manual_seed(0)
    spec = PolicySpec.from_specs(OBS, ACT, TASKS)
    policy = build_policy(factory, {"hidden": [16, 8]}, spec).eval()
    rc = pb.RunConfig(policy_factory=factory, task_ids=TASKS)
    rc.inference.CopyFrom(wire_settings.inference_message({"guidance_beta": beta}))
    weights = VerifiedWeights(1, "x", dict(policy.state_dict()), 0, 0.0, 0.0)
    ours = MlpPolicy.from_weights(weights, rc, OBS)
    arrays = {k: v.numpy() for k, v in policy.state_dict().items()}
    numpy_weights = VerifiedWeights(1, "x", arrays, 0, 0.0, 0.0, tensor_format="numpy")
    assert MlpPolicy.from_weights(numpy_weights, rc, OBS).layers[0][0].shape == ours.layers[0][0].shape
    rng = np.random.default_rng(1)
    for task in TASKS:
        obs = _obs(rng)
        t_obs = {k: torch.as_tensor(v).unsqueeze(0) for k, v in obs.items()}
        t_task = torch.tensor([TASKS.index(task)])
        with torch.no_grad():
            want = guided_action(policy, t_obs, t_task, beta).squeeze(0).numpy()
        got = ours.act(obs, task)
        assert got.dtype == np.float32 and got.shape == (3,)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_refusals():
    rc = pb.RunConfig(policy_factory="fleetloop.vision:visuomotor_policy", task_ids=TASKS)
    with pytest.raises(InvalidArgument, match="policy_factory"):
        MlpPolicy.from_weights(VerifiedWeights(1, "x", {}, 0, 0.0, 0.0), rc, OBS)
    with pytest.raises(InvalidArgument, match="state_dict"):
        MlpPolicy({"conv.weight": np.zeros((2, 2))}, OBS, TASKS)
    policy = build_policy("fleetloop.policies:mlp_policy", {"hidden": [4]}, PolicySpec.from_specs(OBS, ACT, TASKS))
    ours = MlpPolicy(policy.state_dict(), OBS, TASKS)
    with pytest.raises(InvalidArgument, match="task_id"):
        ours.act(_obs(np.random.default_rng(0)), "fly")
    with pytest.raises(InvalidArgument, match=r"obs\[a_gripper\]"):
        ours.act({"z_joints": np.zeros(5), "a_gripper": np.zeros(3)}, "pick")
    with pytest.raises(InvalidArgument, match="wide"):
        MlpPolicy(policy.state_dict(), OBS[:1], TASKS)
