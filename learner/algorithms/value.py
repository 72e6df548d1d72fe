"""RECAP's value side: rewards, normalised Monte-Carlo returns, N-step advantage pieces, and the
distributional value function trained on them (pi*0.6, arXiv 2511.14759; SOP, arXiv 2601.03044).

Everything here is pure (numpy / torch, no I/O). The choices the papers leave open are documented in
``docs/RECAP.md``; in short:

**Rewards** of one episode of T steps (step t = the action taken on observation o_t)::

    r_t = -1                         for t < T - 1
    r_{T-1} = 0                      outcome "success" (the step whose action achieved the task)
    r_{T-1} = C_fail                 outcome "failure", and "timeout" when ``timeout_as='failure'``
    r_{T-1} = -1                     "timeout" when ``timeout_as='truncated'``, "aborted", or still running

with ``C_fail = -fail_penalty * max_len``. **Normaliser** ``Z = max_len + |C_fail|``: the largest
possible undiscounted return magnitude, so every normalised return ``G_t / Z`` lies in [-1, 0]
(success returns in (-max_len/Z, 0], failure returns below that). All further quantities
(normalised rewards ``r_t / Z``, values, advantages) are in these normalised units; no discounting.

**Terminal vs truncated.** Success and failure (and timeouts treated as failure) are *terminal*: the
return after the last step is 0, so MC returns are exact value targets. Truncated episodes (timeouts
with ``timeout_as='truncated'``, aborted episodes) and still-running ones have no exact return: their
frames are excluded from value training (``recap_value_mask`` False) and N-step windows that run
past the last stored step are shortened and bootstrapped from the last stored observation.

**Per-step target columns** (:func:`episode_targets`), exactly what a RECAP batch carries in
``Batch.extra`` (plus ``recap_next_obs``, the observation at ``recap_next_step``):

==================== ====== ==================================================================
recap_mc_return      f32    normalised MC return-to-go G_t / Z, in [-1, 0]
recap_value_mask     bool   G_t is an exact value target (terminal episode)
recap_nstep_reward   f32    sum_{k < n_t} r_{t+k} / Z over the (possibly shortened) window n_t
recap_next_step      i64    t + n_t: step whose observation is bootstrapped (-1: none)
recap_bootstrap      f32    1.0 add V(o_{t+n_t}); 0.0 the episode terminated inside the window
recap_adv_valid      bool   the advantage pieces are known (False: indicator 'unknown')
==================== ====== ==================================================================

so that ``A_t = recap_nstep_reward + recap_bootstrap * V(o_{next}) - V(o_t)``.

**Value function**: :class:`DistributionalValue`, an MLP on (observation, one-hot task) -- the same
task encoding as :class:`fleetloop.policies.MLPPolicy` -- giving logits over ``num_bins`` bins whose
centres are evenly spaced on [-1, 0] (201 bins: spacing 0.005). Trained by cross-entropy against the
two-hot (default) or one-hot projection of the normalised MC return; ``V(o) = sum_b p_b * centre_b``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fleetloop.errors import InvalidArgument
from fleetloop.specs import PolicySpec, flatten_vectors

V_MIN, V_MAX = -1.0, 0.0
TERMINAL_OUTCOMES = ("success", "failure")
OUTCOMES = ("success", "failure", "timeout", "aborted")
TimeoutAs = Literal["failure", "truncated"]
Projection = Literal["two_hot", "one_hot"]
TARGET_FIELDS = ("recap_mc_return", "recap_value_mask", "recap_nstep_reward", "recap_next_step",
                 "recap_bootstrap", "recap_adv_valid")


# -- rewards and returns ---------------------------------------------------------------------------
def fail_reward(max_len: int, fail_penalty: float) -> float:
    """``C_fail = -fail_penalty * max_len`` (the reward of a failed episode's last step)."""
    return -float(fail_penalty) * float(max_len)


def normaliser(max_len: int, fail_penalty: float) -> float:
    """``Z = max_len + |C_fail|``: dividing any return of a task by Z maps it into [-1, 0]."""
    if max_len < 1:
        raise InvalidArgument(f"max_len must be >= 1, got {max_len}", field="max_len", value=max_len)
    if fail_penalty < 0:
        raise InvalidArgument(f"fail_penalty must be >= 0, got {fail_penalty}", field="fail_penalty", value=fail_penalty)
    return float(max_len) + abs(fail_reward(max_len, fail_penalty))


def is_terminal(outcome: str | None, timeout_as: TimeoutAs = "failure") -> bool:
    """True when the episode's return after its last step is exactly 0 (success, failure, and
    timeout when treated as failure). ``None`` = still running."""
    if outcome is not None and outcome not in OUTCOMES:
        raise InvalidArgument(f"outcome {outcome!r} is not one of {OUTCOMES}", field="outcome", value=outcome)
    return outcome in TERMINAL_OUTCOMES or (outcome == "timeout" and timeout_as == "failure")


def episode_rewards(length: int, outcome: str | None, max_len: int, fail_penalty: float = 1.0,
                    timeout_as: TimeoutAs = "failure") -> np.ndarray:
    """RECAP rewards (not normalised) of an episode of ``length`` steps: float64 [length].

    -1 per step; the last step gets 0 on success and ``C_fail`` on failure (or timeout as failure);
    truncated, aborted and running (``None``) episodes keep -1 there (see the module docstring)."""
    if length < 0:
        raise InvalidArgument(f"length must be >= 0, got {length}", field="length", value=length)
    r = -np.ones(length, dtype=np.float64)
    if length and is_terminal(outcome, timeout_as):
        r[-1] = 0.0 if outcome == "success" else fail_reward(max_len, fail_penalty)
    return r


def mc_returns(rewards: np.ndarray) -> np.ndarray:
    """Undiscounted returns-to-go ``G_t = sum_{k >= t} r_k`` (same shape and float64)."""
    r = np.asarray(rewards, dtype=np.float64)
    return np.cumsum(r[::-1])[::-1].copy() if r.size else r.copy()


def normalised_returns(length: int, outcome: str | None, max_len: int, fail_penalty: float = 1.0,
                       timeout_as: TimeoutAs = "failure") -> np.ndarray:
    """``G_t / Z`` clipped to [-1, 0], float32 [length] (clipping only matters for episodes longer
    than ``max_len``). Exact value targets only when :func:`is_terminal`."""
    z = normaliser(max_len, fail_penalty)
    g = mc_returns(episode_rewards(length, outcome, max_len, fail_penalty, timeout_as)) / z
    return np.clip(g, V_MIN, V_MAX).astype(np.float32)


# -- N-step pieces ----------------------------------------------------------------------------------
def episode_targets(length: int, outcome: str | None, max_len: int, n_step: int, fail_penalty: float = 1.0,
                    timeout_as: TimeoutAs = "failure") -> dict[str, np.ndarray]:
    """Per-step RECAP target columns (:data:`TARGET_FIELDS`, see the module docstring) of one episode
    of ``length`` stored steps. ``outcome`` None = still running: frames whose full N-step window is
    already stored get valid advantage pieces, the others become valid once more steps or the outcome
    arrive (recompute then).

    Window of step t: terminal episode: ``n_t = min(N, T - t)``; the window reaches the end iff
    ``t + N >= T``, then ``bootstrap = 0``. Otherwise ``n_t = min(N, T - 1 - t)`` (the bootstrap
    observation must be stored), ``bootstrap = 1``, valid iff ``n_t >= 1`` and (running) ``n_t == N``.
    """
    if n_step < 1:
        raise InvalidArgument(f"n_step must be >= 1, got {n_step}", field="n_step", value=n_step)
    terminal = is_terminal(outcome, timeout_as)
    z = normaliser(max_len, fail_penalty)
    r = episode_rewards(length, outcome, max_len, fail_penalty, timeout_as) / z
    csum = np.concatenate([[0.0], np.cumsum(r)])
    t = np.arange(length, dtype=np.int64)
    if terminal:
        n = np.minimum(n_step, length - t)
        ends = t + n_step >= length
        valid = np.ones(length, dtype=bool)
    else:
        n = np.minimum(n_step, length - 1 - t)
        ends = np.zeros(length, dtype=bool)
        valid = n >= 1 if outcome is not None else n == n_step
    n = np.maximum(n, 0)
    nstep = csum[t + n] - csum[t]
    next_step = np.where(ends | ~valid, -1, t + n)
    return {
        "recap_mc_return": normalised_returns(length, outcome, max_len, fail_penalty, timeout_as),
        "recap_value_mask": np.full(length, terminal, dtype=bool),
        "recap_nstep_reward": np.where(valid, nstep, 0.0).astype(np.float32),
        "recap_next_step": next_step.astype(np.int64),
        "recap_bootstrap": np.where(valid & ~ends, 1.0, 0.0).astype(np.float32),
        "recap_adv_valid": valid,
    }


def gather_next_obs(obs: np.ndarray, next_step: np.ndarray) -> np.ndarray:
    """``recap_next_obs`` of one episode: ``obs[next_step]`` where ``next_step >= 0``, else the frame's
    own observation (any value works there: it is multiplied by ``recap_bootstrap = 0``)."""
    idx = np.where(next_step >= 0, next_step, np.arange(len(next_step)))
    return np.asarray(obs, dtype=np.float32)[idx]


def nstep_advantages(targets: Mapping[str, np.ndarray], values: np.ndarray) -> np.ndarray:
    """Advantages of one episode from its :func:`episode_targets` and per-step values ``V(o_t)``
    (normalised units): ``A_t = nstep_t + bootstrap_t * V(o_{next_t}) - V(o_t)``; NaN where the pieces
    are not valid. The learner computes the same on a batch (``RecapAlgorithm``)."""
    v = np.asarray(values, dtype=np.float64)
    nxt = targets["recap_next_step"]
    v_next = np.where(nxt >= 0, v[np.maximum(nxt, 0)], 0.0)
    adv = targets["recap_nstep_reward"] + targets["recap_bootstrap"] * v_next - v
    return np.where(targets["recap_adv_valid"], adv, np.nan)


# -- bins ---------------------------------------------------------------------------------------------
def bin_centers(num_bins: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [num_bins] evenly spaced on [V_MIN, V_MAX] (both ends included)."""
    if num_bins < 2:
        raise InvalidArgument(f"num_bins must be >= 2, got {num_bins}", field="num_bins", value=num_bins)
    return torch.linspace(V_MIN, V_MAX, num_bins, device=device)


def project(targets: torch.Tensor, num_bins: int, how: Projection = "two_hot") -> torch.Tensor:
    """Distribution over bins for each scalar target: float32 [N, num_bins], rows sum to 1.

    ``two_hot``: mass split between the two neighbouring centres in proportion to closeness, so the
    expectation equals the (clipped) target exactly. ``one_hot``: all mass on the nearest centre
    (expectation off by at most half a bin). Targets are clipped to [V_MIN, V_MAX] first."""
    x = targets.float().clamp(V_MIN, V_MAX)
    pos = (x - V_MIN) / (V_MAX - V_MIN) * (num_bins - 1)
    out = torch.zeros(x.shape[0], num_bins, device=x.device)
    if how == "one_hot":
        return out.scatter_(1, pos.round().long().unsqueeze(1), 1.0)
    if how != "two_hot":
        raise InvalidArgument(f"projection must be 'two_hot' or 'one_hot', got {how!r}", field="projection", value=how)
    lo = pos.floor().long().clamp(0, num_bins - 1)
    hi = (lo + 1).clamp(max=num_bins - 1)
    w_hi = (pos - lo.float()).unsqueeze(1)
    out.scatter_add_(1, lo.unsqueeze(1), 1.0 - w_hi)
    out.scatter_add_(1, hi.unsqueeze(1), w_hi)
    return out


# -- the value network ---------------------------------------------------------------------------------
class DistributionalValue(nn.Module):
    """V(o, task) as a categorical distribution over ``num_bins`` return bins on [-1, 0].

    Input: observation features and one-hot task id. The features are, by default, the vector
    observation tensors flattened in spec order (a bare float tensor as is): for a state job this
    is the network of :class:`fleetloop.policies.MLPPolicy`'s input. With ``encoder`` (e.g. a
    policy's ``value_encoder()``: a fresh trainable image encoder) they are ``encoder(obs)``, of
    width ``obs_dim``. Invariant: :meth:`value` is always in [-1, 0] (a convex combination of the
    bin centres)."""

    def __init__(self, obs_dim: int, num_tasks: int, hidden: Sequence[int] = (256, 256), num_bins: int = 201,
                 encoder: nn.Module | None = None, spec: PolicySpec | None = None) -> None:
        super().__init__()
        self.obs_dim, self.num_tasks, self.num_bins = int(obs_dim), int(num_tasks), int(num_bins)
        self.encoder, self.spec = encoder, spec
        self.register_buffer("centers", bin_centers(self.num_bins), persistent=False)
        layers: list[nn.Module] = []
        width_in = self.obs_dim + self.num_tasks
        for width in hidden:
            layers += [nn.Linear(width_in, int(width)), nn.ReLU()]
            width_in = int(width)
        layers.append(nn.Linear(width_in, self.num_bins))
        self.net = nn.Sequential(*layers)

    def features(self, obs) -> torch.Tensor:
        """[B, obs_dim] float features of an observation batch (dict of tensors, or one flat tensor)."""
        return self.encoder(obs) if self.encoder is not None else flatten_vectors(obs, self.spec)

    def forward(self, obs, task: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_bins]."""
        feats = self.features(obs)
        one_hot = nn.functional.one_hot(task.long(), self.num_tasks).to(feats.dtype)
        return self.net(torch.cat([feats, one_hot], dim=-1))

    def value(self, obs, task: torch.Tensor) -> torch.Tensor:
        """Expected normalised return [B]: ``softmax(logits) @ centres``."""
        return torch.softmax(self.forward(obs, task), dim=-1) @ self.centers

    def per_sample_loss(self, obs, task: torch.Tensor, target: torch.Tensor,
                        how: Projection = "two_hot") -> torch.Tensor:
        """Cross-entropy [B] between the predicted bins and the projection of ``target``."""
        logp = torch.log_softmax(self.forward(obs, task), dim=-1)
        return -(project(target, self.num_bins, how) * logp).sum(dim=-1)


def value_net_for(policy: nn.Module, hidden: Sequence[int], num_bins: int) -> DistributionalValue:
    """RECAP's value network for ``policy``: on the features of ``policy.value_encoder()`` (a fresh
    trainable encoder, e.g. for cameras) when the policy has one, else on the vector observations
    of its spec (``policy.spec``, or the adapter's) or its ``obs_dim``. InvalidArgument naming
    ``policy_factory`` when none of these can be found."""
    num_tasks = getattr(policy, "num_tasks", None)
    spec = getattr(policy, "spec", None) or getattr(policy, "_flat_spec", None)
    if num_tasks is None and spec is not None:
        num_tasks = spec.num_tasks
    if hasattr(policy, "value_encoder"):
        encoder, width = policy.value_encoder()
        return DistributionalValue(width, int(num_tasks), hidden, num_bins, encoder=encoder, spec=spec)
    width = getattr(policy, "obs_dim", None)
    if width is None and spec is not None:
        width = spec.vector_dim
    if width is None or num_tasks is None:
        raise InvalidArgument("RECAP's policy must expose obs_dim and num_tasks, a PolicySpec, or value_encoder()",
                              field="policy_factory")
    return DistributionalValue(int(width), int(num_tasks), hidden, num_bins, spec=spec)


# -- offline pretraining -------------------------------------------------------------------------------
@dataclass
class ValueEpisode:
    """One episode for value pretraining: observations (``[T, obs_dim]`` float, or a dict of named
    ``[T, *shape]`` arrays), task index, outcome, the task's episode limit. Build from a
    :class:`fleetloop.dataset.DemoEpisode` with :meth:`from_demo`."""

    obs: Any
    task: int
    outcome: str
    max_len: int

    @classmethod
    def from_demo(cls, ep, task_index: Mapping[str, int], max_len: int) -> "ValueEpisode":
        """From a dataset episode (``ep.obs``, ``ep.task_id``, ``ep.outcome``)."""
        obs = ep.obs if isinstance(ep.obs, Mapping) else np.asarray(ep.obs, np.float32)
        return cls(obs, int(task_index[ep.task_id]), str(ep.outcome), int(max_len))


def value_dataset(episodes: Iterable[ValueEpisode], fail_penalty: float = 1.0,
                  timeout_as: TimeoutAs = "failure") -> tuple[Any, np.ndarray, np.ndarray]:
    """Stack the exact-target frames of ``episodes``: (obs [M, ...] -- an array, or a dict of arrays
    when the episodes hold dicts --, task i64 [M], target f32 [M]). Non-terminal episodes
    (truncated, aborted) contribute nothing."""
    obs, task, tgt = [], [], []
    for ep in episodes:
        n = _length(ep.obs)
        if not is_terminal(ep.outcome, timeout_as) or n == 0:
            continue
        obs.append(ep.obs if isinstance(ep.obs, Mapping) else np.asarray(ep.obs, np.float32))
        task.append(np.full(n, ep.task, np.int64))
        tgt.append(normalised_returns(n, ep.outcome, ep.max_len, fail_penalty, timeout_as))
    if not obs:
        raise InvalidArgument("no episode with an exact return (success/failure) to pretrain the value on",
                              field="episodes", value=0)
    if isinstance(obs[0], Mapping):
        stacked: Any = {k: np.concatenate([o[k] for o in obs]) for k in obs[0]}
    else:
        stacked = np.concatenate(obs)
    return stacked, np.concatenate(task), np.concatenate(tgt)


def _length(obs: Any) -> int:
    return len(next(iter(obs.values()))) if isinstance(obs, Mapping) else len(obs)


def pretrain_value(value: DistributionalValue, episodes: Iterable[ValueEpisode], steps: int = 2000,
                   batch_size: int = 256, lr: float = 3e-4, fail_penalty: float = 1.0,
                   timeout_as: TimeoutAs = "failure", projection: Projection = "two_hot", seed: int = 0,
                   device: torch.device | str = "cpu") -> list[float]:
    """Fit ``value`` offline (in place) by cross-entropy on the episodes' normalised MC returns, with
    Adam, minibatches drawn uniformly with replacement *per task in equal shares* (as the BC pretrain).
    Returns the loss of every step. Caller loads episodes (e.g. ``fleetloop.dataset.iter_episodes``)."""
    obs, task, tgt = value_dataset(episodes, fail_penalty, timeout_as)
    rng = np.random.default_rng(seed)
    by_task = [np.flatnonzero(task == k) for k in np.unique(task)]
    k_t, g_t = (torch.from_numpy(a).to(device) for a in (task, tgt))
    o_t: Any = {k: torch.from_numpy(v).to(device) for k, v in obs.items()} if isinstance(obs, Mapping) \
        else torch.from_numpy(obs).to(device)
    value.to(device).train()
    opt = torch.optim.Adam(value.parameters(), lr=lr)
    losses: list[float] = []
    per = max(1, batch_size // len(by_task))
    for _ in range(int(steps)):
        idx = torch.from_numpy(np.concatenate([rng.choice(ix, per) for ix in by_task])).to(device)
        o_b = {k: v[idx] for k, v in o_t.items()} if isinstance(o_t, dict) else o_t[idx]
        loss = value.per_sample_loss(o_b, k_t[idx], g_t[idx], projection).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
    value.eval()
    return losses
