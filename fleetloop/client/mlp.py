"""The job's default policy run with numpy: a robot without torch acts with the weights it receives.

:class:`MlpPolicy` is the inference of ``fleetloop.policies:mlp_policy`` / ``recap_mlp_policy``
(``fleetloop.policies.MLPPolicy``), the learner's default architecture, on a verified state dict
of numpy arrays (``FleetClient(weights_format="numpy")``; torch tensors are converted): the same
input (the job's vector observations flattened to float32 and concatenated in *name* order, as
:mod:`fleetloop.specs` orders them, then the task one-hot, then, for a conditioned policy, the
advantage-indicator embedding), ``Linear`` + ReLU per hidden layer, ``tanh`` on the output: one
float32 action in [-1, 1], the job's action specs concatenated in name order. Camera tensors are
not read (the MLP ignores them, as on the learner). A conditioned (RECAP) policy is asked for the
positive indicator and mixed with its unconditional output by the RunConfig's ``guidance_beta``
(classifier-free guidance, clamped to [-1, 1]), as ``actor.policy_runner.PolicyRunner`` does.

Refusals (InvalidArgument naming the field): a RunConfig naming another policy factory, a state
dict that is not such an MLP, an observation missing a vector tensor or of the wrong size, an
unknown task.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from fleetloop import wire_settings
from fleetloop.errors import InvalidArgument

#: Policy factories whose state dicts :class:`MlpPolicy` runs.
FACTORIES = ("fleetloop.policies:mlp_policy", "fleetloop.policies:recap_mlp_policy")
_UINT8, _COND_POSITIVE = 7, 2
_LAYER = re.compile(r"^net\.(\d+)\.weight$")


def _is_image(spec: Any) -> bool:
    shape = [int(d) for d in spec.shape]
    return int(spec.dtype) == _UINT8 and len(shape) == 3 and shape[2] in (1, 3, 4) and min(shape[:2]) >= 1


class MlpPolicy:
    """Deterministic action of the default MLP policy for one observation (module docstring).

    ``state_dict``: name -> array (numpy, or anything ``np.asarray`` takes: torch CPU tensors);
    ``observation_specs``: the job's specs (wire ``TensorSpec`` s, as given to ``FleetClient``);
    ``tasks``: the job's task ids in the policy's order (``RunConfig.task_ids``)."""

    def __init__(self, state_dict: Mapping[str, Any], observation_specs: Sequence[Any], tasks: Sequence[str],
                 guidance_beta: float = 1.0) -> None:
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in state_dict.items()}
        idx = sorted(int(m.group(1)) for k in arrays if (m := _LAYER.match(k)))
        if not idx or any(f"net.{i}.bias" not in arrays for i in idx):
            raise InvalidArgument(f"state dict is not a fleetloop MLP policy (keys {sorted(arrays)[:8]})",
                                  field="state_dict", value=sorted(arrays)[:8])
        self.layers = [(arrays[f"net.{i}.weight"], arrays[f"net.{i}.bias"]) for i in idx]
        self.cond = arrays.get("cond_embed.weight")
        self.vectors = sorted(((s.name, int(np.prod([int(d) for d in s.shape], dtype=np.int64)))
                               for s in observation_specs if not _is_image(s)))
        self.tasks = {t: i for i, t in enumerate(tasks)}
        self.guidance_beta = float(guidance_beta)
        width = sum(n for _, n in self.vectors) + len(self.tasks) + (0 if self.cond is None else self.cond.shape[1])
        if self.layers[0][0].shape[1] != width:
            raise InvalidArgument(f"the policy's input is {self.layers[0][0].shape[1]} wide; these specs and tasks give "
                                  f"{width}", field="state_dict", value=int(self.layers[0][0].shape[1]))
        self.act_dim = int(self.layers[-1][0].shape[0])

    @classmethod
    def from_weights(cls, weights: Any, run_config: Any, observation_specs: Sequence[Any]) -> "MlpPolicy":
        """From a :class:`~fleetloop.client.weight_client.VerifiedWeights` and the handshake's
        RunConfig (factory checked, tasks, ``guidance_beta``); InvalidArgument naming
        ``policy_factory`` when the job runs another architecture."""
        factory = run_config.policy_factory or FACTORIES[0]
        if factory not in FACTORIES:
            raise InvalidArgument(f"policy factory {factory!r} is not one MlpPolicy runs ({list(FACTORIES)}): run it "
                                  "with its own code (e.g. torch and fleetloop.policies)", field="policy_factory",
                                  value=factory)
        state = weights.arrays() if hasattr(weights, "arrays") else weights.state_dict
        beta = float(wire_settings.inference(run_config).get("guidance_beta", 1.0))
        return cls(state, observation_specs, list(run_config.task_ids), guidance_beta=beta)

    @classmethod
    def from_bundle(cls, folder: Any, guidance_beta: float = 1.0) -> "MlpPolicy":
        """From an exported policy folder (``fleetloop policy export``: ``model.safetensors`` +
        ``fleetloop-policy.json``), sha256-verified by :func:`fleetloop.policy_bundle.load_policy_bundle`
        before anything is read; no job, learner or torch needed. InvalidArgument naming
        ``policy_factory`` when the bundle is another architecture."""
        from fleetloop.codec import make_spec
        from fleetloop.policy_bundle import load_policy_bundle

        meta, state = load_policy_bundle(folder, build=False)
        factory = meta.get("policy_factory") or FACTORIES[0]
        if factory not in FACTORIES:
            raise InvalidArgument(f"policy factory {factory!r} is not one MlpPolicy runs ({list(FACTORIES)}): load it "
                                  "with fleetloop.policy_bundle.policy_from_bundle (torch)", field="policy_factory",
                                  value=factory)
        specs = [make_spec(s["name"], s["dtype"], s["shape"]) for s in meta["observation_specs"]]
        return cls(state, specs, meta["tasks"], guidance_beta=guidance_beta)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        return np.tanh(x)

    def act(self, obs: Mapping[str, Any], task_id: str) -> np.ndarray:
        """float32 ``[act_dim]`` in [-1, 1] for ``obs`` (name -> per-step array; images ignored)."""
        if task_id not in self.tasks:
            raise InvalidArgument(f"task {task_id!r} is not one of {sorted(self.tasks)}", field="task_id", value=task_id)
        parts = []
        for name, size in self.vectors:
            if name not in obs:
                raise InvalidArgument(f"observation has no {name!r}", field=f"obs[{name}]", value=None)
            v = np.asarray(obs[name], dtype=np.float32).reshape(-1)
            if v.size != size:
                raise InvalidArgument(f"obs[{name!r}] has {v.size} values, its spec {size}", field=f"obs[{name}]",
                                      value=int(v.size))
            parts.append(v)
        onehot = np.zeros(len(self.tasks), np.float32)
        onehot[self.tasks[task_id]] = 1.0
        x = np.concatenate(parts + [onehot])
        if self.cond is None:
            return self._forward(x).astype(np.float32)
        pos = self._forward(np.concatenate([x, self.cond[_COND_POSITIVE]]))
        if self.guidance_beta == 1.0:
            return np.clip(pos, -1.0, 1.0).astype(np.float32)
        unc = self._forward(np.concatenate([x, self.cond[0]]))
        return np.clip(unc + self.guidance_beta * (pos - unc), -1.0, 1.0).astype(np.float32)
