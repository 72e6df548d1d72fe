"""HG-DAgger (Kelly et al., arXiv 1810.02890) as a continuous SOP learner update.

Behaviour cloning on expert labels: every offline demonstration frame and every online
*intervention* frame (the operator's executed action). With ``train_on='all'`` autonomous online
frames are cloned too (the policy's own actions: useful only as a regulariser / for ablations).

Loss of one learner step, over the batch's *trainable* samples T (offline, plus online interventions
or all online frames by ``train_on``)::

    per_sample_i = mean_d (pi(o_i, task_i) - a_i)^2  +  l1_weight * mean_d |pi(o_i, task_i) - a_i|
    loss = sum_{i in T} w_i * per_sample_i / |T|

with ``w_i`` the staleness gate's weight (``batch.weights``). Normalising by the count |T| (not by
sum w) means a down-weighted sample really contributes less instead of rescaling the others. A batch
with no trainable sample takes no step (``stats['skipped'] = 1``). Optimizer: AdamW (Adam with
decoupled weight decay; exactly Adam at the default ``weight_decay=0``), optional gradient-norm clip.

Staleness default: bound 8 versions, autonomous frames past it dropped, expert labels (interventions,
demos) always admitted: a human's action does not go stale with the policy version.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from learner.algorithms.base import Algorithm, UpdateResult, register
from learner.batch import OFFLINE, ONLINE, Batch
from learner.staleness import StalenessConfig


class HGDaggerConfig(BaseModel):
    """HG-DAgger hyper-parameters."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Decoupled (AdamW) weight decay; 0 = plain Adam.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the global gradient norm to this; None disables.")
    train_on: Literal["interventions", "all"] = Field(
        "interventions", description="Online frames cloned: intervention frames only (HG-DAgger) or all frames.")
    l1_weight: float = Field(0.0, ge=0.0, description="Weight of an added mean absolute error term (0 = pure MSE).")
    staleness_bound: int = Field(8, ge=0, description="Default staleness bound (versions) for autonomous frames.")


@register
class HGDagger(Algorithm):
    """Behaviour cloning on interventions + demos (see the module docstring)."""

    name: ClassVar[str] = "hg_dagger"
    Config: ClassVar[type[BaseModel]] = HGDaggerConfig
    config: HGDaggerConfig

    def make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.AdamW(self.policy.parameters(), lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)

    def eligible(self, source: Literal["online", "offline"]) -> dict[str, Any]:
        """Online: intervention frames only unless ``train_on='all'``; offline: every demo frame."""
        super().eligible(source)
        return {"interventions_only": source == "online" and self.config.train_on == "interventions"}

    def default_staleness(self) -> StalenessConfig:
        return StalenessConfig(bound=self.config.staleness_bound, policy="drop", admit_expert=True)

    def trainable_mask(self, batch: Batch) -> torch.Tensor:
        """Bool [N]: offline frames, and online frames allowed by ``train_on``."""
        offline = batch.source == OFFLINE
        if self.config.train_on == "all":
            return offline | (batch.source == ONLINE)
        return offline | ((batch.source == ONLINE) & batch.interventions)

    def update(self, batch: Batch) -> UpdateResult:
        self.policy.train()
        pred = self.policy(batch.obs, batch.task, None)
        diff = pred - batch.actions
        per_sample = diff.pow(2).mean(dim=-1)
        if self.config.l1_weight > 0:
            per_sample = per_sample + self.config.l1_weight * diff.abs().mean(dim=-1)
        mask = self.trainable_mask(batch)
        n_train = int(mask.sum().item())
        w = batch.weights * mask.to(batch.weights.dtype)
        per_np = per_sample.detach().float().cpu().numpy().astype(np.float32)
        stats: dict[str, float] = {"samples": float(len(batch)), "trained_samples": float(n_train),
                                   "weight_sum": float(w.sum().item())}
        if n_train == 0 or stats["weight_sum"] == 0.0:
            stats["skipped"] = 1.0
            return UpdateResult(loss=0.0, per_sample_loss=per_np, stats=stats)
        loss = (w * per_sample).sum() / n_train
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.grad_clip)
        else:
            grad_norm = torch.sqrt(sum((p.grad.pow(2).sum() for p in self.policy.parameters() if p.grad is not None),
                                       torch.zeros((), device=self.device)))
        self.optimizer.step()
        self.step += 1
        with torch.no_grad():
            m = mask.float()
            stats["mse"] = float((diff.pow(2).mean(dim=-1) * m).sum().item() / n_train)
            stats["grad_norm"] = float(grad_norm.item())
            stats["skipped"] = 0.0
        return UpdateResult(loss=float(loss.item()), per_sample_loss=per_np, stats=stats)
