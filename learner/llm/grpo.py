"""GRPO with the decoupled (behaviour / proximal) PPO objective, as a pure :class:`Algorithm` plug-in.

Registered as ``"grpo"``. Imports only torch / numpy / pydantic: the policy is any Hugging Face causal
LM (anything whose ``model(input_ids=..., attention_mask=...)`` returns an object with ``.logits``
[B, L, V]); transformers itself is never imported here.

**Data** (:mod:`learner.llm.token_batch`). One rollout *group* is G completions of one prompt.
:func:`~learner.llm.token_batch.build_token_batch` packs groups into a
:class:`~learner.llm.token_batch.TokenBatch`: row i holds ``prompt + completion_i`` right-padded to L;
position t of every per-token tensor refers to token ``input_ids[i, t]`` and holds
``log p(x_t | x_<t)`` (``completion_mask`` is True exactly at the generated tokens, so prompt and
padding never count).

**Advantages** (:func:`~learner.llm.token_batch.group_advantages`), per group of rewards r_1..r_G::

    A_j = (r_j - mean(r)) / (std(r) + adv_eps)     normalize_std=True  (GRPO; population std, ddof=0)
    A_j =  r_j - mean(r)                           normalize_std=False (Dr. GRPO, mean-only)

A group whose rewards are all equal carries no learning signal: its advantages are exactly 0 and it
is counted as *zero-variance*. Every token of a completion shares the completion's advantage.

**Loss** (:func:`grpo_token_loss`; AReaL's decoupled PPO, arXiv 2505.24298). Three policies per
token: ``pi_behav`` sampled it (its log-probs come from the rollout, possibly several versions old),
``pi_prox`` is the learner's policy at the start of this update (log-probs computed once, no grad),
``pi_theta`` is being optimised::

    r   = exp(logp_new - logp_prox)                                  (trust-region ratio, has grad)
    w   = min(exp(logp_prox - logp_behav), behaviour_weight_cap)     (importance weight, no grad)
    l_t = -w * min(r * A, clip(r, 1 - clip_eps_low, 1 + clip_eps_high) * A)
          [+ kl_coef * (exp(logp_ref - logp_new) - (logp_ref - logp_new) - 1)]     (k3 KL estimator)

The trust region is centred on the proximal policy, not on the stale behaviour policy, so clipping
stays meaningful however old the sample is, while ``w`` corrects for the distribution shift between
behaviour and proximal policy (capped to bound variance). With on-policy data (behaviour == proximal)
``w = 1`` and this is plain PPO-clip with asymmetric "clip-higher" bounds (DAPO).

Aggregation over the masked tokens: ``token_mean`` (sum of l_t / number of tokens in the (mini)batch)
or ``seq_mean_token_sum`` (sum of l_t per sequence, mean over the B sequences: no length normalisation
inside a sequence, Dr. GRPO style). An optional per-sample ``weights`` [B] (e.g. the staleness gate's)
multiplies l_t.

**Update** (:meth:`GRPO.update`): ``epochs`` passes over the batch, each split into ``minibatches``
shuffled minibatches, one optimizer step (AdamW, grad-norm clip) per minibatch. ``logp_prox`` is taken
once before the first step; with ``epochs = minibatches = 1`` it equals ``logp_new`` exactly, so it is
taken from that forward pass (detached) instead of a second one. The policy runs in ``eval()`` mode
(no dropout) so that r = 1 at the first step. ``kl_coef > 0`` needs reference log-probs: the batch's
``ref_logprobs`` if given, else a frozen copy of the policy as it was when the algorithm was built.
Log-probs are computed from ``logits / temperature`` so they match a sampler that applied the same
temperature to the logits (the engine must report *processed*, post-temperature log-probs).

Staleness: the default gate drops samples more than ``max_staleness`` versions old
(:meth:`GRPO.default_staleness`); admission control (:mod:`learner.llm.admission`) keeps fresh
rollouts within that bound in the first place.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar, Literal, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from learner.algorithms.base import Algorithm, UpdateResult, register
from learner.llm.token_batch import TokenBatch, build_token_batch, group_advantages, zero_variance
from learner.staleness import StalenessConfig

# The batch and advantages live in learner.llm.token_batch; importable from here as before.
__all__ = ["GRPO", "GRPOConfig", "TokenBatch", "build_token_batch", "group_advantages", "grpo_token_loss",
           "sequence_logprobs", "zero_variance"]


class GRPOConfig(BaseModel):
    """GRPO hyper-parameters (see the module docstring for the objective)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-5, gt=0.0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Decoupled (AdamW) weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the global gradient norm to this; None disables.")
    clip_eps_low: float = Field(0.2, ge=0.0, lt=1.0, description="Lower PPO clip: the ratio is clipped below at 1 - clip_eps_low.")
    clip_eps_high: float = Field(0.28, ge=0.0, description="Upper PPO clip ('clip-higher'): the ratio is clipped above at 1 + clip_eps_high.")
    behaviour_weight_cap: float = Field(
        5.0, ge=1.0, description="Cap on the decoupled importance weight exp(logp_prox - logp_behav) of a token.")
    kl_coef: float = Field(0.0, ge=0.0, description="Weight of the k3 KL(new || reference) penalty; 0 = no reference model.")
    normalize_std: bool = Field(
        True, description="Advantages (r - mean) / (std + adv_eps) per group (GRPO); False = r - mean only (Dr. GRPO).")
    adv_eps: float = Field(1e-6, gt=0.0, description="Added to the group std when normalising advantages.")
    epochs: int = Field(1, ge=1, le=100, description="Passes over each batch per update.")
    minibatches: int = Field(1, ge=1, le=4096, description="Minibatches (one optimizer step each) per pass; clipping only binds when epochs * minibatches > 1.")
    loss_agg: Literal["token_mean", "seq_mean_token_sum"] = Field(
        "token_mean", description="token_mean: mean over all completion tokens; seq_mean_token_sum: per-sequence token sum, mean over sequences.")
    max_staleness: int = Field(2, ge=0, le=1_000_000, description="eta: largest staleness (versions) trained on; the default staleness bound.")
    temperature: float = Field(1.0, gt=0.0, description="Logits are divided by this before log-softmax, to match the sampler's temperature.")

    @model_validator(mode="after")
    def _check(self) -> "GRPOConfig":
        if not (0.0 <= self.betas[0] < 1.0 and 0.0 <= self.betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        return self


# ---------------------------------------------------------------------------------------------
# Log-probs and loss
# ---------------------------------------------------------------------------------------------

def sequence_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Float32 [B, L]: position t holds log p(x_t | x_<t) under ``model`` with logits / ``temperature``;
    position 0 (no prefix) holds 0. Differentiable. Works with any HF causal LM (``.logits``)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = out.logits if hasattr(out, "logits") else out[0]
    logits = logits[:, :-1, :].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:].unsqueeze(-1)
    tok = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.cat([torch.zeros_like(tok[:, :1]), tok], dim=1)


def grpo_token_loss(
    logp_new: torch.Tensor,
    logp_prox: torch.Tensor,
    logp_behav: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOConfig,
    logp_ref: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The decoupled GRPO loss (module docstring) over masked tokens.

    Per-token inputs are [B, L]; ``adv`` and ``weights`` are [B]; ``mask`` is bool [B, L]. Returns
    ``(loss, per_sample, stats)``: the scalar to minimise (aggregated by ``cfg.loss_agg``, weighted by
    ``weights``), ``per_sample`` [B] (detached, unweighted: the mean token loss of each sequence for
    ``token_mean``, its token sum for ``seq_mean_token_sum``; 0 for a sequence with no tokens), and
    float stats: ``tokens``, ``clip_fraction`` (tokens whose clipped term is the active one, split into
    ``clip_low_fraction`` / ``clip_high_fraction``), ``mean_ratio``, ``max_ratio``,
    ``mean_behaviour_weight``, ``capped_weight_fraction``, ``kl`` (mean k3, when ``logp_ref`` is used).
    Values at unmasked positions are ignored (they may be anything finite or not).
    """
    m = mask.to(torch.bool)
    mf = m.to(logp_new.dtype)
    zero = torch.zeros((), dtype=logp_new.dtype, device=logp_new.device)
    a = adv.to(logp_new.dtype).unsqueeze(1).expand_as(logp_new)
    log_r = torch.where(m, logp_new - logp_prox.detach(), zero)
    ratio = torch.exp(log_r)
    log_w = torch.where(m, (logp_prox - logp_behav).detach(), zero)
    w = torch.exp(torch.clamp(log_w, max=math.log(cfg.behaviour_weight_cap)))
    lo, hi = 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high
    surr = torch.minimum(ratio * a, torch.clamp(ratio, lo, hi) * a)
    loss_tok = -w * surr
    kl_tok = None
    if cfg.kl_coef > 0.0 and logp_ref is not None:
        d = torch.where(m, logp_ref.detach() - logp_new, zero)
        kl_tok = torch.exp(d) - d - 1.0
        loss_tok = loss_tok + cfg.kl_coef * kl_tok
    loss_tok = torch.where(m, loss_tok, zero)
    n_tok = mf.sum(dim=1)
    seq_sum = loss_tok.sum(dim=1)
    wt = torch.ones_like(n_tok) if weights is None else weights.to(logp_new.dtype)
    if cfg.loss_agg == "token_mean":
        loss = (seq_sum * wt).sum() / n_tok.sum().clamp(min=1.0)
        per_sample = seq_sum / n_tok.clamp(min=1.0)
    else:
        loss = (seq_sum * wt).sum() / max(int(logp_new.shape[0]), 1)
        per_sample = seq_sum
    with torch.no_grad():
        total = float(mf.sum().item())
        denom = max(total, 1.0)
        r_d = ratio.detach()
        clip_hi = m & (a > 0) & (r_d > hi)
        clip_lo = m & (a < 0) & (r_d < lo)
        stats = {
            "tokens": total,
            "clip_fraction": float((clip_hi | clip_lo).sum().item()) / denom,
            "clip_high_fraction": float(clip_hi.sum().item()) / denom,
            "clip_low_fraction": float(clip_lo.sum().item()) / denom,
            "mean_ratio": float((r_d * mf).sum().item()) / denom,
            "max_ratio": float(r_d[m].max().item()) if total else 1.0,
            "mean_behaviour_weight": float((w * mf).sum().item()) / denom,
            "capped_weight_fraction": float((m & (log_w >= math.log(cfg.behaviour_weight_cap))).sum().item()) / denom,
        }
        if kl_tok is not None:
            stats["kl"] = float((kl_tok.detach() * mf).sum().item()) / denom
    return loss, per_sample.detach(), stats


# ---------------------------------------------------------------------------------------------
# The algorithm
# ---------------------------------------------------------------------------------------------

@register
class GRPO(Algorithm):
    """GRPO on a causal LM with the decoupled objective (see the module docstring)."""

    name: ClassVar[str] = "grpo"
    Config: ClassVar[type[BaseModel]] = GRPOConfig
    config: GRPOConfig

    def __init__(self, policy: torch.nn.Module, config: BaseModel, device: torch.device | str = "cpu") -> None:
        super().__init__(policy, config, device)
        self.ref_policy: torch.nn.Module | None = None
        if self.config.kl_coef > 0.0:
            self.ref_policy = copy.deepcopy(self.policy).eval()
            for p in self.ref_policy.parameters():
                p.requires_grad_(False)

    def make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)

    def default_staleness(self) -> StalenessConfig:
        """Drop completions more than ``max_staleness`` versions old (rollouts have no expert labels)."""
        return StalenessConfig(bound=self.config.max_staleness, policy="drop", admit_expert=False)

    def build_batch(self, groups: Sequence[Mapping[str, Any]], pad_id: int, *, vocab_size: int | None = None,
                    learner_version: int | None = None) -> TokenBatch:
        """:func:`build_token_batch` with this algorithm's advantage settings, on its device."""
        return build_token_batch(groups, pad_id, self.device, normalize_std=self.config.normalize_std,
                                 adv_eps=self.config.adv_eps, vocab_size=vocab_size, learner_version=learner_version)

    def logprobs(self, batch: TokenBatch, model: torch.nn.Module | None = None) -> torch.Tensor:
        """[B, L] log-probs of ``batch`` under ``model`` (default the policy), with grad."""
        return sequence_logprobs(model or self.policy, batch.input_ids, batch.attention_mask, self.config.temperature)

    def update(self, batch: TokenBatch) -> UpdateResult:  # type: ignore[override]
        """``epochs`` x ``minibatches`` optimizer steps on ``batch`` (moved to the device if needed).

        Takes no step (``stats['skipped'] = 1``) when no completion token has non-zero weight, or when
        every advantage is 0 and there is no KL term (the gradient would be exactly 0).
        """
        c = self.config
        batch = batch.validate().to(self.device)
        b = len(batch)
        mask = batch.completion_mask
        weights = batch.weights
        stats: dict[str, float] = {
            "samples": float(b), "tokens": float(mask.sum().item()),
            "zero_variance_groups": float(batch.zero_variance_groups),
            "groups": float(torch.unique(batch.groups).numel()) if b else 0.0,
        }
        if batch.rewards is not None and b:
            stats["mean_reward"] = float(batch.rewards.float().mean().item())
        if batch.learner_version is not None and b:
            st = int(batch.learner_version) - batch.versions
            stats["mean_staleness"] = float(st.float().mean().item())
            stats["max_staleness"] = float(st.max().item())
        live = mask.any(dim=1) if weights is None else mask.any(dim=1) & (weights > 0)
        has_signal = bool((batch.advantages[live] != 0).any().item()) or c.kl_coef > 0.0
        if not bool(live.any().item()) or not has_signal:
            stats["skipped"] = 1.0
            return UpdateResult(loss=0.0, per_sample_loss=np.zeros(b, dtype=np.float32), stats=stats)
        self.policy.eval()  # no dropout: the ratio is exactly 1 at the first step
        single = c.epochs * c.minibatches == 1
        logp_prox = None
        if not single:
            with torch.no_grad():
                logp_prox = self.logprobs(batch)
        logp_ref = batch.ref_logprobs
        if c.kl_coef > 0.0 and logp_ref is None:
            with torch.no_grad():
                logp_ref = self.logprobs(batch, self.ref_policy)
        per_sample = torch.zeros(b, dtype=torch.float32, device=self.device)
        losses: list[float] = []
        agg: dict[str, list[float]] = {}
        gen = torch.Generator().manual_seed(1_000_003 * self.step + 17)
        n_mb = min(c.minibatches, b)
        for _ in range(c.epochs):
            order = torch.randperm(b, generator=gen) if n_mb > 1 else torch.arange(b)
            for rows in torch.tensor_split(order, n_mb):
                rows = rows.to(self.device)
                mb = batch.select(rows)
                logp_new = self.logprobs(mb)
                prox = logp_new.detach() if single else logp_prox[rows]
                loss, ps, st = grpo_token_loss(logp_new, prox, mb.behaviour_logprobs, mb.advantages, mb.completion_mask,
                                               c, None if logp_ref is None else logp_ref[rows], mb.weights)
                if st["tokens"] == 0:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                params = [p for p in self.policy.parameters() if p.requires_grad]
                if c.grad_clip is not None:
                    gn = torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
                else:
                    gn = torch.sqrt(sum((p.grad.pow(2).sum() for p in params if p.grad is not None),
                                        torch.zeros((), device=self.device)))
                self.optimizer.step()
                self.step += 1
                per_sample[rows] = ps.float()
                losses.append(float(loss.item()))
                st["grad_norm"] = float(gn.item())
                for k, v in st.items():
                    if k != "tokens":
                        agg.setdefault(k, []).append(v)
        stats.update({k: float(np.mean(v)) for k, v in agg.items()})
        stats["optimizer_steps"] = float(len(losses))
        stats["skipped"] = 0.0
        return UpdateResult(loss=float(np.mean(losses)) if losses else 0.0,
                            per_sample_loss=per_sample.cpu().numpy().astype(np.float32), stats=stats)
