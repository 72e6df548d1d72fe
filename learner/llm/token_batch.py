"""Rollout groups -> a padded :class:`TokenBatch`, with group-relative advantages.

What :class:`learner.llm.grpo.GRPO` trains on. One rollout *group* is G completions of one prompt.
:func:`build_token_batch` packs groups into a :class:`TokenBatch`: row i holds
``prompt + completion_i`` right-padded to L; position t of every per-token tensor refers to token
``input_ids[i, t]`` and holds ``log p(x_t | x_<t)`` (``completion_mask`` is True exactly at the
generated tokens, so prompt and padding never count). Rows are in group order, then completion order.

**Advantages** (:func:`group_advantages`), per group of rewards r_1..r_G::

    A_j = (r_j - mean(r)) / (std(r) + adv_eps)     normalize_std=True  (GRPO; population std, ddof=0)
    A_j =  r_j - mean(r)                           normalize_std=False (Dr. GRPO, mean-only)

A group whose rewards are all equal carries no learning signal: its advantages are exactly 0 and it
is counted as *zero-variance* (:func:`zero_variance`). Every token of a completion shares the
completion's advantage.

Bad input (shapes, dtypes, empty prompts or groups, log-probs that are not finite and <= 0,
non-finite rewards, token ids outside the vocabulary) raises :class:`~fleetloop.errors.InvalidArgument`
naming the field. Imports only torch / numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fleetloop.errors import InvalidArgument


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------

def group_advantages(rewards: np.ndarray | torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> np.ndarray | torch.Tensor:
    """Group-relative advantages of ``rewards`` [N, G] (N groups of G completions); same shape and type.

    Row-wise ``r - mean`` (divided by ``std + eps``, population std, when ``normalize_std``). A row
    whose rewards are all equal gets exactly 0. InvalidArgument for a non-2-D or non-finite input.
    """
    is_tensor = isinstance(rewards, torch.Tensor)
    r = rewards.detach().to("cpu", torch.float64).numpy() if is_tensor else np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2:
        raise InvalidArgument(f"rewards must be [N, G], got shape {r.shape}", field="rewards", value=r.shape)
    if not np.isfinite(r).all():
        raise InvalidArgument("rewards must be finite", field="rewards")
    if r.shape[1] == 0:
        adv = r.copy()
    else:
        mean = r.mean(axis=1, keepdims=True)
        adv = r - mean
        if normalize_std:
            with np.errstate(divide="ignore", invalid="ignore"):  # eps = 0 on a zero-variance row: zeroed below
                adv = adv / (r.std(axis=1, keepdims=True) + eps)
        adv[zero_variance(r)] = 0.0
    if is_tensor:
        return torch.as_tensor(adv, dtype=rewards.dtype if rewards.is_floating_point() else torch.float32, device=rewards.device)
    return adv.astype(np.asarray(rewards).dtype if np.asarray(rewards).dtype.kind == "f" else np.float64)


def zero_variance(rewards: np.ndarray) -> np.ndarray:
    """Bool [N]: rows of ``rewards`` [N, G] whose values are all equal (no learning signal)."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.shape[1] == 0:
        return np.ones(r.shape[0], dtype=bool)
    return (r.max(axis=1) - r.min(axis=1)) == 0.0


# ---------------------------------------------------------------------------------------------
# Token batch
# ---------------------------------------------------------------------------------------------

@dataclass
class TokenBatch:
    """B completions as padded token tensors (all on one device; B rows, L positions).

    ``input_ids`` int64 [B, L]: prompt + completion, right-padded. ``attention_mask`` int64 [B, L]: 1 on
    real tokens. ``completion_mask`` bool [B, L]: True at generated tokens. ``behaviour_logprobs`` f32
    [B, L]: the sampler's log p(x_t | x_<t) at completion positions, 0 elsewhere. ``advantages`` f32 [B].
    ``versions`` int64 [B]: behaviour policy version of each completion. ``groups`` int64 [B]: group
    index (0..num_groups-1). Optional: ``ref_logprobs`` f32 [B, L] (reference policy, for the KL term),
    ``weights`` f32 [B] (per-sample loss weight, default 1), ``rewards`` f32 [B] (for stats),
    ``learner_version`` (the version being trained, for staleness stats), ``zero_variance_groups``
    (how many groups had all-equal rewards).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    behaviour_logprobs: torch.Tensor
    advantages: torch.Tensor
    versions: torch.Tensor
    groups: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    learner_version: int | None = None
    zero_variance_groups: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device | str) -> "TokenBatch":
        """A copy on ``device`` (tensors already there are not copied)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def select(self, rows: torch.Tensor) -> "TokenBatch":
        """The sub-batch of ``rows`` (index tensor)."""
        return replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def validate(self) -> "TokenBatch":
        """Check shapes and dtypes; InvalidArgument naming the field on a mismatch. Returns self."""
        if self.input_ids.dim() != 2:
            raise InvalidArgument(f"input_ids must be [B, L], got {tuple(self.input_ids.shape)}", field="input_ids")
        b, l = self.input_ids.shape
        for name in ("attention_mask", "completion_mask", "behaviour_logprobs", "ref_logprobs"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (b, l):
                raise InvalidArgument(f"{name} must have shape {(b, l)}, got {tuple(t.shape)}", field=name)
        for name in ("advantages", "versions", "groups", "weights", "rewards"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (b,):
                raise InvalidArgument(f"{name} must have shape ({b},), got {tuple(t.shape)}", field=name)
        if self.completion_mask.dtype != torch.bool:
            raise InvalidArgument(f"completion_mask must be bool, got {self.completion_mask.dtype}", field="completion_mask")
        if self.input_ids.dtype != torch.int64:
            raise InvalidArgument(f"input_ids must be int64, got {self.input_ids.dtype}", field="input_ids")
        if l > 0 and bool(self.completion_mask[:, 0].any()):
            raise InvalidArgument("completion_mask must be False at position 0 (a completion token needs a prefix)",
                                  field="completion_mask")
        return self


def build_token_batch(
    groups: Sequence[Mapping[str, Any]],
    pad_id: int,
    device: torch.device | str = "cpu",
    *,
    normalize_std: bool = True,
    adv_eps: float = 1e-6,
    vocab_size: int | None = None,
    learner_version: int | None = None,
) -> TokenBatch:
    """Pack rollout groups into a :class:`TokenBatch` (rows in group order, then completion order).

    Each group is ``{"prompt_token_ids": [...], "completions": [{"token_ids": [...], "logprobs": [...],
    "reward": float, "policy_version": int}, ...]}``. Advantages are computed per group
    (:func:`group_advantages`; groups may differ in size). Checks, each an InvalidArgument naming
    ``groups[i].completions[j].<field>``: a non-empty prompt; ``len(logprobs) == len(token_ids)``;
    finite log-probs <= 0 (1e-4 tolerance); a finite reward; token ids in ``[0, vocab_size)`` when
    ``vocab_size`` is given; at least one completion per group and one group overall.
    """
    if not groups:
        raise InvalidArgument("no groups to build a batch from", field="groups", value=0)
    rows: list[tuple[list[int], list[int], list[float]]] = []
    advantages: list[float] = []
    rewards_all: list[float] = []
    versions: list[int] = []
    group_idx: list[int] = []
    zero_var = 0
    for gi, group in enumerate(groups):
        prompt = [int(t) for t in group.get("prompt_token_ids", [])]
        if not prompt:
            raise InvalidArgument("prompt_token_ids must be non-empty", field=f"groups[{gi}].prompt_token_ids", value=0)
        _check_ids(prompt, vocab_size, f"groups[{gi}].prompt_token_ids")
        comps = list(group.get("completions", []))
        if not comps:
            raise InvalidArgument("a group needs at least one completion", field=f"groups[{gi}].completions", value=0)
        rewards = []
        for ci, c in enumerate(comps):
            where = f"groups[{gi}].completions[{ci}]"
            ids = [int(t) for t in c.get("token_ids", [])]
            lps = [float(x) for x in c.get("logprobs", [])]
            if len(ids) != len(lps):
                raise InvalidArgument(f"logprobs has {len(lps)} values for {len(ids)} token_ids",
                                      field=f"{where}.logprobs", value=len(lps))
            _check_ids(ids, vocab_size, f"{where}.token_ids")
            lp = np.asarray(lps, dtype=np.float64)
            if lp.size and (not np.isfinite(lp).all() or lp.max() > 1e-4):
                raise InvalidArgument("logprobs must be finite and <= 0", field=f"{where}.logprobs",
                                      value=float(lp[~np.isfinite(lp) | (lp > 1e-4)][0]))
            reward = float(c.get("reward", float("nan")))
            if not math.isfinite(reward):
                raise InvalidArgument("reward must be finite", field=f"{where}.reward", value=reward)
            rewards.append(reward)
            rows.append((prompt, ids, lps))
            versions.append(int(c.get("policy_version", 0)))
            group_idx.append(gi)
        r = np.asarray([rewards], dtype=np.float64)
        zero_var += int(zero_variance(r)[0])
        advantages.extend(group_advantages(r, normalize_std, adv_eps)[0].tolist())
        rewards_all.extend(rewards)
    b = len(rows)
    length = max(len(p) + len(c) for p, c, _ in rows)
    input_ids = torch.full((b, length), int(pad_id), dtype=torch.int64)
    attention = torch.zeros((b, length), dtype=torch.int64)
    comp_mask = torch.zeros((b, length), dtype=torch.bool)
    behav = torch.zeros((b, length), dtype=torch.float32)
    for i, (prompt, ids, lps) in enumerate(rows):
        p, n = len(prompt), len(ids)
        input_ids[i, :p + n] = torch.tensor(prompt + ids, dtype=torch.int64)
        attention[i, :p + n] = 1
        comp_mask[i, p:p + n] = True
        behav[i, p:p + n] = torch.tensor(lps, dtype=torch.float32)
    return TokenBatch(
        input_ids=input_ids, attention_mask=attention, completion_mask=comp_mask, behaviour_logprobs=behav,
        advantages=torch.tensor(advantages, dtype=torch.float32), versions=torch.tensor(versions, dtype=torch.int64),
        groups=torch.tensor(group_idx, dtype=torch.int64), rewards=torch.tensor(rewards_all, dtype=torch.float32),
        learner_version=learner_version, zero_variance_groups=zero_var,
    ).validate().to(device)


def _check_ids(ids: list[int], vocab_size: int | None, where: str) -> None:
    """InvalidArgument naming ``where`` if a token id is negative or (with ``vocab_size``) >= it."""
    if not ids:
        return
    lo, hi = min(ids), max(ids)
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        bad = lo if lo < 0 else hi
        raise InvalidArgument(f"token id {bad} outside the vocabulary [0, {vocab_size})", field=where, value=bad)
