"""RECAP (pi*0.6, arXiv 2511.14759) as an SOP learner plug-in: advantage-conditioned behaviour cloning.

One learner step on a batch (see :class:`RecapAlgorithm` for the fields it must carry):

1. **Advantages** (no gradient): ``A_i = nstep_i + bootstrap_i * V(o_next_i) - V(o_i)`` with the
   distributional value function ``V`` of :mod:`learner.algorithms.value` (normalised units).
2. **Threshold** per task: ``eps_task`` = the ``1 - positive_fraction`` quantile of the task's last
   ``threshold_window`` advantage-labelled samples (:class:`ThresholdTracker`, this batch included).
3. **Indicator** ``I_i``: positive if forced (online intervention frames and offline demonstrations,
   each switchable), else positive iff ``A_i > eps_task``; 'unknown' (:data:`COND_NONE`) for frames
   whose advantage is not known yet (``recap_adv_valid`` False).
4. **Dropout**: with probability ``indicator_dropout`` (0.3) the indicator is replaced by 'unknown',
   independently per sample, so the same network also learns the unconditional policy.
5. **Policy loss**: HG-DAgger's behaviour-cloning loss on *all* frames, with ``I_i`` as input::

       per_sample_i = mean_d (pi(o_i, task_i, I_i) - a_i)^2 + l1_weight * mean_d |pi(...) - a_i|
       loss = sum_i w_i * per_sample_i / N        (w = staleness weights; samples with w = 0 do not count in N)

6. **Value**: ``value_mode='frozen'`` (SOP) leaves V untouched (no gradient, no optimizer);
   ``'refit'`` (original RECAP) takes one cross-entropy step on the frames with exact MC targets.

Inference (actors): classifier-free guidance, :func:`fleetloop.policies.cfg_mix` with
``guidance_beta`` (1.0 for fleet rollouts: the positive-conditioned policy itself), configurable for
evaluation. Pure: no I/O, no threads. Choices the papers leave open: ``docs/RECAP.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from fleetloop.errors import InvalidArgument
from fleetloop.policies import COND_NEGATIVE, COND_NONE, COND_POSITIVE
from learner.algorithms.base import Algorithm, UpdateResult, _cpu_copy, register
from learner.algorithms.value import TimeoutAs, episode_targets, value_net_for
from learner.batch import OFFLINE, ONLINE, Batch
from learner.staleness import StalenessConfig

#: ``Batch.extra`` fields RECAP needs (dtype, shape after N). ``recap_next_obs`` is observation-valued:
#: one ``recap_next_obs.<name>`` entry per observation tensor, shaped as ``Batch.obs[name]``.
REQUIRED_EXTRA: dict[str, str] = {
    "recap_nstep_reward": "float32 [N]",
    "recap_bootstrap": "float32 [N]",
    "recap_next_obs": "observation [N, ...] per tensor",
    "recap_adv_valid": "bool [N]",
    "recap_mc_return": "float32 [N]",
    "recap_value_mask": "bool [N]",
}


class RecapConfig(BaseModel):
    """RECAP hyper-parameters (``algorithm_params`` of a job with ``algorithm = "recap"``)."""

    model_config = ConfigDict(extra="forbid")

    # policy optimisation (same meaning as HG-DAgger's)
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Policy Adam learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Policy decoupled (AdamW) weight decay; 0 = Adam.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas (policy and value), each in [0, 1).")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the policy's global gradient norm; None disables.")
    l1_weight: float = Field(0.0, ge=0.0, description="Weight of an added mean-absolute-error term in the BC loss.")
    # rewards and returns (used by episode_targets; the batch carries the results)
    max_episode_steps: int = Field(200, ge=1, le=1_000_000,
                                   description="Default per-task episode limit T_max (normaliser Z = T_max + |C_fail|).")
    fail_penalty: float = Field(1.0, ge=0.0, le=100.0, description="C_fail = -fail_penalty * T_max (reward of a failed last step).")
    timeout_as: TimeoutAs = Field("failure", description="A timeout is a 'failure' (terminal, penalised) or 'truncated' "
                                                         "(bootstrapped, not a value target).")
    # value function
    value_mode: Literal["frozen", "refit"] = Field("frozen", description="'frozen': pretrained offline, never updated (SOP); "
                                                                          "'refit': one value step per learner step (pi*0.6).")
    num_bins: int = Field(201, ge=2, le=10_000, description="Value bins, evenly spaced on [-1, 0].")
    projection: Literal["two_hot", "one_hot"] = Field("two_hot", description="How a scalar return becomes a bin target.")
    value_hidden: tuple[int, ...] = Field((256, 256), description="Value MLP hidden widths (each 1..65536).")
    value_lr: float = Field(3e-4, gt=0.0, le=1.0, description="Value Adam learning rate (refit mode).")
    value_grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the value's gradient norm (refit); None disables.")
    # advantages, threshold, indicator
    n_step: int = Field(25, ge=1, le=100_000, description="N of the N-step advantage (steps).")
    positive_fraction: float = Field(0.35, gt=0.0, lt=1.0, description="Target share of advantage-labelled samples "
                                                                         "marked positive, per task.")
    threshold_window: int = Field(4096, ge=16, le=10_000_000, description="Recent advantages per task the quantile uses.")
    force_positive_interventions: bool = Field(True, description="Online intervention frames are always positive.")
    force_positive_demos: bool = Field(True, description="Offline demonstration frames are always positive.")
    indicator_dropout: float = Field(0.3, ge=0.0, lt=1.0, description="Probability the indicator is replaced by 'unknown'.")
    # inference and data
    guidance_beta: float = Field(1.0, ge=0.0, le=10.0, description="CFG beta announced to fleet actors (1 = conditional policy).")
    eval_guidance_beta: float = Field(1.0, ge=0.0, le=10.0, description="CFG beta for evaluation runs (try 1.5-2.5).")
    staleness_bound: int = Field(8, ge=0, description="Staleness bound (versions) for autonomous frames.")
    staleness_policy: Literal["drop", "downweight", "admit"] = Field(
        "admit", description="Autonomous frames past the bound: RECAP learns from off-policy data, so admitted by default.")
    seed: int = Field(0, ge=0, description="Seed of the indicator-dropout random stream.")
    # start-up of a fresh learner (learner.pretrain.prepare_recap); a checkpoint restart skips all of it
    value_weights: str | None = Field(None, description="safetensors of a pretrained value function (written by "
                                      "learner.pretrain.pretrain(algorithm='recap')); loaded instead of pretraining V.")
    value_datasets: list[str] = Field(default_factory=list, description="Extra fleetloop-demos/v1 datasets (e.g. rollouts "
                                      "of the BC policy, timeouts included) used only to pretrain V, beside the job's demos.")
    value_pretrain_steps: int = Field(2000, ge=0, le=1_000_000, description="Offline value steps at a fresh start when "
                                      "value_weights is unset (batch = the learner's batch_size, lr = value_lr).")
    policy_pretrain_steps: int = Field(1000, ge=0, le=1_000_000, description="RECAP steps on the demos at a fresh start "
                                       "(all forced positive, indicator_dropout unknown) so the positive token is trained; "
                                       "skipped when the initial weights were already pretrained with RECAP.")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {v}")
        return v

    @field_validator("value_hidden")
    @classmethod
    def _hidden(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not all(1 <= w <= 65536 for w in v):
            raise ValueError(f"each width must be in [1, 65536], got {v}")
        return v


class ThresholdTracker:
    """Per-task running quantile: ``eps_task`` such that ``positive_fraction`` of the task's last
    ``window`` advantages are above it.

    Invariants: each task keeps at most ``window`` values (a FIFO ring, newest replace oldest);
    :meth:`threshold` is the ``1 - positive_fraction`` quantile (linear interpolation) of what is
    kept, so for distinct values the share of kept values strictly above it is within
    ``1/len(kept)`` of ``positive_fraction``; None for a task with no values yet.
    """

    def __init__(self, positive_fraction: float, window: int) -> None:
        if not 0.0 < positive_fraction < 1.0:
            raise InvalidArgument(f"positive_fraction must be in (0, 1), got {positive_fraction}",
                                  field="positive_fraction", value=positive_fraction)
        if window < 1:
            raise InvalidArgument(f"window must be >= 1, got {window}", field="window", value=window)
        self.q = 1.0 - float(positive_fraction)
        self.window = int(window)
        self._ring: dict[int, np.ndarray] = {}
        self._written: dict[int, int] = {}

    def add(self, task: int, values: np.ndarray) -> None:
        """Append ``values`` (finite floats) to ``task``'s window."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if not v.size:
            return
        if not np.isfinite(v).all():
            raise InvalidArgument("advantages must be finite", field="advantages", value=float(v[~np.isfinite(v)][0]))
        v = v[-self.window:]
        ring = self._ring.setdefault(task, np.empty(self.window, dtype=np.float64))
        w = self._written.get(task, 0)
        idx = (w + np.arange(v.size)) % self.window
        ring[idx] = v
        self._written[task] = w + v.size

    def values(self, task: int) -> np.ndarray:
        """The kept values of ``task`` (unordered copy)."""
        n = min(self._written.get(task, 0), self.window)
        return self._ring[task][:n].copy() if n else np.empty(0)

    def threshold(self, task: int) -> float | None:
        """``eps_task``, or None with no values."""
        n = min(self._written.get(task, 0), self.window)
        return float(np.quantile(self._ring[task][:n], self.q)) if n else None

    def state_dict(self) -> dict[str, Any]:
        """Kept values per task, oldest first (float64 tensors; checkpoint-friendly, no pickle)."""
        return {"q": self.q, "window": self.window,
                "tasks": {str(k): torch.from_numpy(self._ordered(k)) for k in self._ring}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (values beyond this tracker's window: newest kept)."""
        self._ring, self._written = {}, {}
        for k, vals in state.get("tasks", {}).items():
            arr = vals.numpy() if isinstance(vals, torch.Tensor) else np.asarray(vals)
            self.add(int(k), arr.astype(np.float64))

    def _ordered(self, task: int) -> np.ndarray:
        w = self._written.get(task, 0)
        n = min(w, self.window)
        if n < self.window:
            return self._ring[task][:n].copy()
        start = w % self.window
        return np.concatenate([self._ring[task][start:], self._ring[task][:start]])


def forced_positive(interventions: torch.Tensor, source: torch.Tensor, force_interventions: bool = True,
                    force_demos: bool = True) -> torch.Tensor:
    """Bool [N]: frames labelled positive whatever their advantage (human corrections, demos)."""
    forced = torch.zeros_like(interventions, dtype=torch.bool)
    if force_interventions:
        forced |= interventions.bool() & (source == ONLINE)
    if force_demos:
        forced |= source == OFFLINE
    return forced


def assign_indicators(adv: torch.Tensor, eps: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Int64 [N] tokens: :data:`COND_POSITIVE` where forced or (valid and ``adv > eps``),
    :data:`COND_NEGATIVE` where valid, not forced and ``adv <= eps``, :data:`COND_NONE` otherwise."""
    out = torch.full(adv.shape, COND_NONE, dtype=torch.long, device=adv.device)
    labelled = valid.bool() & ~forced
    out[labelled] = COND_NEGATIVE
    out[labelled & (adv > eps)] = COND_POSITIVE
    out[forced] = COND_POSITIVE
    return out


def drop_indicators(tokens: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A copy of ``tokens`` with each entry replaced by :data:`COND_NONE` with probability ``p``."""
    drop = torch.rand(tokens.shape, generator=generator, device=tokens.device) < p
    return torch.where(drop, torch.full_like(tokens, COND_NONE), tokens)


@register
class RecapAlgorithm(Algorithm):
    """RECAP learner update (module docstring). Pure: ``update(batch) -> UpdateResult``.

    **Batch contract.** Standard fields used: ``obs``, ``actions`` (executed action: the operator's on
    intervention frames), ``task``, ``interventions``, ``source``, ``weights``. ``Batch.extra`` must
    carry, per sample (:data:`REQUIRED_EXTRA`; built per episode by
    :func:`learner.algorithms.value.episode_targets` + ``gather_next_obs``):

    - ``recap_nstep_reward`` f32: sum of the normalised rewards over the sample's N-step window;
    - ``recap_bootstrap`` f32: 1 to add ``V(recap_next_obs)``, 0 if the episode terminated in the window;
    - ``recap_next_obs.<name>``: the observation at the window's end (same episode, same task);
    - ``recap_adv_valid`` bool: the three above are known (False: indicator 'unknown');
    - ``recap_mc_return`` f32: normalised MC return-to-go (value target, refit mode);
    - ``recap_value_mask`` bool: ``recap_mc_return`` is exact (terminal episode).

    Demonstrations need the same columns (offline episodes: outcome from the manifest). Missing
    keys raise InvalidArgument naming them. ``per_sample_loss`` is the policy's BC loss per sample.

    Requires a conditioned policy (``policy.conditioned`` True, e.g.
    ``fleetloop.policies:recap_mlp_policy``); the value network is built by
    :func:`learner.algorithms.value.value_net_for` (the policy's ``value_encoder()`` when it has one).
    """

    name: ClassVar[str] = "recap"
    Config: ClassVar[type[BaseModel]] = RecapConfig
    #: The learner must build its replay store with :meth:`episode_targets` (per-row ``recap_*`` columns).
    needs_episode_targets: ClassVar[bool] = True
    config: RecapConfig

    def __init__(self, policy: nn.Module, config: BaseModel, device: torch.device | str = "cpu") -> None:
        if not isinstance(config, RecapConfig):
            raise InvalidArgument(f"RECAP needs a RecapConfig, got {type(config).__name__}", field="algorithm_params")
        if not getattr(policy, "conditioned", False):
            raise InvalidArgument("RECAP needs an indicator-conditioned policy (policy_factory "
                                  "'fleetloop.policies:recap_mlp_policy' or policy_kwargs conditioned=true)",
                                  field="policy_kwargs.conditioned", value=getattr(policy, "conditioned", None))
        self.value = value_net_for(policy, config.value_hidden, config.num_bins)
        super().__init__(policy, config, device)
        self.value.to(self.device)
        self.value_optimizer = self.make_value_optimizer()
        self.thresholds = ThresholdTracker(config.positive_fraction, config.threshold_window)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        self.set_value_mode(config.value_mode)

    # -- construction ----------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.AdamW(self.policy.parameters(), lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)

    def make_value_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.value.parameters(), lr=self.config.value_lr, betas=self.config.betas)

    def set_value_mode(self, mode: Literal["frozen", "refit"]) -> None:
        """Freeze (no gradients, eval mode) or unfreeze the value function."""
        self.config = self.config.model_copy(update={"value_mode": mode})
        frozen = mode == "frozen"
        self.value.requires_grad_(not frozen)
        self.value.train(not frozen)

    def load_value_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load offline-pretrained value weights (e.g. from :func:`value.pretrain_value`)."""
        self.value.load_state_dict({k: v.to(self.device) for k, v in state.items()})

    def eligible(self, source: Literal["online", "offline"]) -> dict[str, Any]:
        """Every frame of both sources: RECAP clones all data, conditioned on its indicator."""
        super().eligible(source)
        return {"interventions_only": False}

    def default_staleness(self) -> StalenessConfig:
        return StalenessConfig(bound=self.config.staleness_bound, policy=self.config.staleness_policy, admit_expert=True)

    def inference(self, evaluation: bool = False) -> dict[str, float]:
        """The CFG beta of fleet rollouts, or of evaluation runs with ``evaluation``."""
        return {"guidance_beta": self.config.eval_guidance_beta if evaluation else self.config.guidance_beta}

    def inference_settings(self) -> dict[str, Any]:
        """What the learner sends actors in RunConfig ``inference_json``: ``guidance_beta`` (fleet
        rollouts), ``eval_guidance_beta`` (for evaluation harnesses) and ``indicator`` (the token the
        policy is conditioned on at inference: always ``"positive"``)."""
        return {**self.inference(False), "eval_guidance_beta": self.config.eval_guidance_beta, "indicator": "positive"}

    def episode_targets(self, length: int, outcome: str | None, max_len: int | None = None) -> dict[str, np.ndarray]:
        """:func:`value.episode_targets` with this config's reward settings (``max_len`` default
        ``max_episode_steps``)."""
        c = self.config
        return episode_targets(length, outcome, max_len or c.max_episode_steps, c.n_step, c.fail_penalty, c.timeout_as)

    # -- labelling -------------------------------------------------------------------------------
    def _extra(self, batch: Batch) -> dict[str, torch.Tensor]:
        missing = [k for k in REQUIRED_EXTRA if k != "recap_next_obs" and k not in batch.extra]
        if missing:
            raise InvalidArgument(f"RECAP batch lacks per-sample fields {missing} (see RecapAlgorithm docstring)",
                                  field=f"extra.{missing[0]}", value=missing)
        nxt = batch.extra_obs("recap_next_obs")
        for name, t in batch.obs.items():
            if name not in nxt or tuple(nxt[name].shape) != tuple(t.shape):
                got = tuple(nxt[name].shape) if name in nxt else None
                raise InvalidArgument(f"recap_next_obs.{name} must have shape {tuple(t.shape)}, got {got}",
                                      field=f"extra.recap_next_obs.{name}", value=got)
        return batch.extra

    @torch.no_grad()
    def advantages(self, batch: Batch) -> torch.Tensor:
        """``A = nstep + bootstrap * V(next_obs) - V(obs)`` [N] (0 where ``recap_adv_valid`` is False)."""
        ex = self._extra(batch)
        was_training = self.value.training
        self.value.eval()
        v = self.value.value(batch.obs, batch.task)
        v_next = self.value.value(batch.extra_obs("recap_next_obs"), batch.task)
        self.value.train(was_training)
        adv = ex["recap_nstep_reward"].float() + ex["recap_bootstrap"].float() * v_next - v
        return torch.where(ex["recap_adv_valid"].bool(), adv, torch.zeros_like(adv))

    @torch.no_grad()
    def label(self, batch: Batch, update_thresholds: bool = True) -> dict[str, torch.Tensor]:
        """Advantages, per-sample thresholds and indicators (before dropout) of ``batch``.

        With ``update_thresholds`` the advantage-labelled samples (valid, not forced) first enter
        their task's window. Returns ``advantage``, ``eps`` (NaN where a task has no threshold yet),
        ``forced``, ``indicator`` tensors [N]."""
        adv = self.advantages(batch)
        c = self.config
        forced = forced_positive(batch.interventions, batch.source, c.force_positive_interventions, c.force_positive_demos)
        labelled = batch.extra["recap_adv_valid"].bool() & ~forced
        task_np, adv_np, lab_np = (t.cpu().numpy() for t in (batch.task, adv, labelled))
        eps_np = np.full(len(batch), np.nan, dtype=np.float32)
        for k in np.unique(task_np):
            sel = task_np == k
            if update_thresholds:
                self.thresholds.add(int(k), adv_np[sel & lab_np])
            eps = self.thresholds.threshold(int(k))
            if eps is not None:
                eps_np[sel] = eps
        eps_t = torch.from_numpy(eps_np).to(adv.device)
        valid = labelled & torch.isfinite(eps_t)  # no threshold yet: indicator unknown
        indicator = assign_indicators(adv, torch.nan_to_num(eps_t, nan=0.0), valid, forced)
        return {"advantage": adv, "eps": eps_t, "forced": forced, "indicator": indicator}

    # -- the update ------------------------------------------------------------------------------
    def update(self, batch: Batch) -> UpdateResult:
        c = self.config
        labels = self.label(batch)
        cond = drop_indicators(labels["indicator"], c.indicator_dropout, self.generator)
        self.policy.train()
        diff = self.policy(batch.obs, batch.task, cond) - batch.actions
        per_sample = diff.pow(2).mean(dim=-1)
        if c.l1_weight > 0:
            per_sample = per_sample + c.l1_weight * diff.abs().mean(dim=-1)
        w = batch.weights.float()
        n_train = int((w > 0).sum().item())
        per_np = per_sample.detach().float().cpu().numpy().astype(np.float32)
        stats = self._label_stats(labels, cond, len(batch))
        stats.update({"samples": float(len(batch)), "trained_samples": float(n_train), "weight_sum": float(w.sum().item())})
        if c.value_mode == "refit":
            stats.update(self._value_step(batch))
        if n_train == 0:
            stats["skipped"] = 1.0
            return UpdateResult(loss=0.0, per_sample_loss=per_np, stats=stats)
        loss = (w * per_sample).sum() / n_train
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = _clip(self.policy, c.grad_clip)
        self.optimizer.step()
        self.step += 1
        stats.update({"grad_norm": grad_norm, "skipped": 0.0,
                      "mse": float((diff.detach().pow(2).mean(dim=-1) * (w > 0)).sum().item() / n_train)})
        return UpdateResult(loss=float(loss.item()), per_sample_loss=per_np, stats=stats)

    def _value_step(self, batch: Batch) -> dict[str, float]:
        """One cross-entropy step of V on the frames with exact MC targets (refit mode)."""
        ex = batch.extra
        mask = ex["recap_value_mask"].bool() & (batch.weights > 0)
        if not bool(mask.any()):
            return {"value_skipped": 1.0}
        self.value.train()
        loss = self.value.per_sample_loss({k: v[mask] for k, v in batch.obs.items()}, batch.task[mask],
                                          ex["recap_mc_return"][mask].float(),
                                          self.config.projection).mean()
        self.value_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _clip(self.value, self.config.value_grad_clip)
        self.value_optimizer.step()
        return {"value_loss": float(loss.item()), "value_skipped": 0.0}

    @staticmethod
    def _label_stats(labels: Mapping[str, torch.Tensor], cond: torch.Tensor, n: int) -> dict[str, float]:
        ind, forced = labels["indicator"], labels["forced"]
        labelled = (ind != COND_NONE) & ~forced
        out = {
            "forced_share": float(forced.float().mean().item()) if n else 0.0,
            "unknown_share": float((ind == COND_NONE).float().mean().item()) if n else 0.0,
            "dropped_share": float(((cond == COND_NONE) & (ind != COND_NONE)).float().mean().item()) if n else 0.0,
        }
        if bool(labelled.any()):
            out["positive_share"] = float((ind[labelled] == COND_POSITIVE).float().mean().item())
            out["advantage_mean"] = float(labels["advantage"][labelled].mean().item())
        return out

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Base state plus ``value``, ``value_optimizer``, ``thresholds`` and the dropout RNG state."""
        state = super().state_dict()
        state["value"] = {k: v.detach().to("cpu", copy=True) for k, v in self.value.state_dict().items()}
        state["value_optimizer"] = _cpu_copy(self.value_optimizer.state_dict())
        state["thresholds"] = self.thresholds.state_dict()
        state["generator"] = self.generator.get_state().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "value" in state:
            self.load_value_state_dict(state["value"])
        if "value_optimizer" in state:
            import copy
            self.value_optimizer.load_state_dict(copy.deepcopy(state["value_optimizer"]))
        if "thresholds" in state:
            self.thresholds.load_state_dict(state["thresholds"])
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self.set_value_mode(self.config.value_mode)


def _clip(module: nn.Module, max_norm: float | None) -> float:
    """Clip ``module``'s gradient norm to ``max_norm`` (None: no clip); returns the norm before."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm).item())
    return float(torch.sqrt(sum(p.grad.pow(2).sum() for p in params)).item())
