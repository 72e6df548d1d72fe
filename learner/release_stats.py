"""The sequential test that judges a release candidate against the stable version (pure numpy).

Evidence is one :class:`Tally` per (task) for each side: the canary cohort's episodes with the candidate
and the stable cohort's episodes with the stable version, both ended in the same window (concurrent,
so both see the same fleet, operators and time of day). :func:`judge` is called after each such
episode and returns a :class:`Judgement`.

The test (Bayesian, beta-binomial; every metric is oriented so that larger = better):

- ``autonomous_success`` (an episode that ended ``success`` with no intervention step): per task and
  side ``p ~ Beta(1 + successes, 1 + failures)`` (uniform prior);
- ``intervention_rate`` (operator steps / steps): per task and side the pooled step rate ``r`` with an
  *episode-level* sample size, ``p ~ Beta(1 + n r, 1 + n (1 - r))`` for ``n`` episodes (steps of one
  episode are strongly correlated: counting them as independent trials would make the posterior far
  too sure); oriented as ``-p``;
- ``episode_length`` (lower is better) and ``reward`` (episode return): the mean's posterior
  ``Normal(mean, var / n)`` (tasks with fewer than 2 episodes on a side are left out); their margin is
  ``max_regression x |stable mean|`` (relative: they have units);
- pooled over tasks weighted by episodes: ``d = sum_t w_t (x_cand,t - x_stable,t)``, ``w_t`` the task's
  share of the episodes of both sides, over the tasks both sides have episodes of;
- ``P_m = P(d >= -margin)``, estimated by Monte Carlo (``draws`` samples, fixed-seed RNG: the same
  evidence always gives the same number and the same decision).

Decision, once both sides have ``min_episodes`` (all tasks together): **roll back** as soon as some
metric has ``P_m <= 1 - confidence`` (the candidate is worse by more than the margin with probability
``>= confidence``); **promote** as soon as every metric has ``P_m >= confidence``; at ``max_episodes``
candidate episodes the decision is forced: promote when ``min_m P_m >= 0.5``, else roll back. No
decision while a side lacks ``min_episodes`` or the sides share no task (the window stays open; an
operator can promote or abort).

Error rates (default policy: min 10, max 60 episodes, margin 0.1, confidence 0.95; measured with
:func:`simulate`, 400 runs each, one task, one candidate and one stable episode at a time, ``python -m
learner.release_stats``; the unit test ``tests/unit/test_release_stats.py`` re-measures them):

- equal candidate (autonomous success 0.8 on both sides, failures with 30 % operator steps): false
  rollback 6.3 % (almost all at the forced decision: an early rollback needs an observed regression
  well past the margin), promoted in 93.7 %, after 41 candidate episodes on average (0.5 % at 10);
- clearly broken candidate (0.2 against 0.8): rolled back in 100 % of runs, 79 % of them at the first
  look (10 candidate episodes, the minimum), after 11.2 candidate episodes on average;
- mildly worse candidate (0.6 against 0.8, twice the margin): rolled back in 84 % of runs (43
  episodes on average), promoted in 16 %.

The sequential looks make the early-stop error larger than ``1 - confidence`` for one look; the
forced decision at ``max_episodes`` dominates the false rollbacks. Raise ``max_episodes`` (or lower
``max_regression``'s strictness) to trade speed for fewer false rollbacks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

DRAWS = 4000
SEED = 20261206
HIGHER_IS_BETTER = {"autonomous_success": True, "intervention_rate": False, "episode_length": False, "reward": True}
RATES = ("autonomous_success", "intervention_rate")


@dataclass
class Tally:
    """Running sums of one (version, cohort, task): what the snapshot reports and the test reads."""

    episodes: int = 0
    autonomous_successes: int = 0
    steps: int = 0
    intervention_steps: int = 0
    length_sum: float = 0.0
    length_sq: float = 0.0
    reward_sum: float = 0.0
    reward_sq: float = 0.0

    def add(self, outcome: str, steps: int, intervention_steps: int, reward: float) -> None:
        """Count one ended episode."""
        self.episodes += 1
        self.autonomous_successes += int(outcome == "success" and intervention_steps == 0)
        self.steps += int(steps)
        self.intervention_steps += int(intervention_steps)
        self.length_sum += steps
        self.length_sq += float(steps) ** 2
        self.reward_sum += float(reward)
        self.reward_sq += float(reward) ** 2

    def merge(self, other: "Tally") -> "Tally":
        """A new tally: the sum of both."""
        return Tally(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def mean(self, metric: str) -> float | None:
        """The metric's value over these episodes (None without episodes, or without steps for the rate)."""
        if not self.episodes:
            return None
        if metric == "autonomous_success":
            return self.autonomous_successes / self.episodes
        if metric == "intervention_rate":
            return self.intervention_steps / self.steps if self.steps else None
        if metric == "episode_length":
            return self.length_sum / self.episodes
        return self.reward_sum / self.episodes

    def var(self, metric: str) -> float:
        """Sample variance of episode_length or reward (0 with fewer than 2 episodes)."""
        n = self.episodes
        if n < 2:
            return 0.0
        s, sq = (self.length_sum, self.length_sq) if metric == "episode_length" else (self.reward_sum, self.reward_sq)
        return max(0.0, (sq - s * s / n) / (n - 1))

    def summary(self) -> dict[str, Any]:
        """``{"episodes", "autonomous_success", "intervention_rate", "episode_length", "reward"}`` (None when unknown)."""
        return {"episodes": self.episodes, **{m: _round(self.mean(m)) for m in HIGHER_IS_BETTER}}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Tally":
        return cls(**{k: data[k] for k in asdict(cls()) if k in data})


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def cohort_metrics(tallies: Mapping[str, Tally]) -> dict[str, Any]:
    """The contract's cohort metrics: the pooled summary plus ``per_task`` summaries."""
    total = Tally()
    for t in tallies.values():
        total = total.merge(t)
    return {**total.summary(), "per_task": {task: t.summary() for task, t in sorted(tallies.items())}}


@dataclass
class Judgement:
    """What :func:`judge` found. ``decision``: "promote", "rollback" or None (keep collecting);
    ``p_not_worse``: min over the judged metrics of P(not worse by more than the margin) (None before
    any metric could be judged); ``per_metric``: each metric's P; ``forced``: decided at max_episodes."""

    decision: str | None
    reason: str
    p_not_worse: float | None = None
    per_metric: dict[str, float] = field(default_factory=dict)
    forced: bool = False
    episodes: dict[str, int] = field(default_factory=dict)


def _posterior(metric: str, t: Tally, rng: np.random.Generator, draws: int) -> np.ndarray | None:
    """Samples of the metric's mean for one task and side (None: not enough data)."""
    n = t.episodes
    if metric == "autonomous_success":
        return rng.beta(1 + t.autonomous_successes, 1 + n - t.autonomous_successes, draws)
    if metric == "intervention_rate":
        if not t.steps:
            return None
        r = t.intervention_steps / t.steps
        return rng.beta(1 + n * r, 1 + n * (1 - r), draws)
    if n < 2:
        return None
    mean = t.mean(metric) or 0.0
    return rng.normal(mean, math.sqrt(max(t.var(metric), 1e-12) / n), draws)


def p_not_worse(metric: str, cand: Mapping[str, Tally], stable: Mapping[str, Tally], max_regression: float,
                draws: int = DRAWS, seed: int = SEED) -> float | None:
    """P(candidate not worse than stable by more than the margin) on ``metric``, pooled over the tasks
    both sides have (see the module docstring); None when no task can be compared."""
    rng = np.random.default_rng(seed)
    diffs, weights, stable_mean = [], [], 0.0
    for task in sorted(set(cand) & set(stable)):
        c, s = cand[task], stable[task]
        if not c.episodes or not s.episodes:
            continue
        pc, ps = _posterior(metric, c, rng, draws), _posterior(metric, s, rng, draws)
        if pc is None or ps is None:
            continue
        diffs.append(pc - ps if HIGHER_IS_BETTER[metric] else ps - pc)
        weights.append(c.episodes + s.episodes)
        stable_mean += (s.mean(metric) or 0.0) * weights[-1]
    if not diffs:
        return None
    w = np.asarray(weights, float) / sum(weights)
    d = np.tensordot(w, np.stack(diffs), axes=1)
    margin = max_regression if metric in RATES else max_regression * abs(stable_mean / sum(weights))
    return float(np.mean(d >= -margin))


def judge(cand: Mapping[str, Tally], stable: Mapping[str, Tally], metrics: Iterable[str], min_episodes: int,
          max_episodes: int, max_regression: float, confidence: float, draws: int = DRAWS,
          seed: int = SEED) -> Judgement:
    """Decide on the evidence so far (module docstring). Pure: the same evidence gives the same answer."""
    n_c = sum(t.episodes for t in cand.values())
    n_s = sum(t.episodes for t in stable.values())
    eps = {"canary": n_c, "stable": n_s}
    if n_c < min_episodes or n_s < min_episodes:
        return Judgement(None, f"waiting for {min_episodes} episodes per cohort (canary {n_c}, stable {n_s})",
                         episodes=eps)
    per = {}
    for m in metrics:
        p = p_not_worse(m, cand, stable, max_regression, draws, seed)
        if p is not None:
            per[m] = round(p, 4)
    if not per:
        return Judgement(None, "no task with episodes of both cohorts to compare", episodes=eps)
    worst = min(per, key=per.get)
    p_min = per[worst]
    detail = ", ".join(f"{m} {p:.3f}" for m, p in per.items())
    after = f"after {n_c} canary / {n_s} stable episodes"
    if p_min <= 1 - confidence:
        return Judgement("rollback", f"{worst} regressed: P(not worse by more than {max_regression:g}) = {p_min:.3f} "
                         f"<= {1 - confidence:.3f} ({detail}) {after}", p_min, per, episodes=eps)
    if p_min >= confidence:
        return Judgement("promote", f"not worse: P(not worse by more than {max_regression:g}) >= {confidence:.3f} on "
                         f"every metric ({detail}) {after}", p_min, per, episodes=eps)
    if n_c >= max_episodes:
        decision = "promote" if p_min >= 0.5 else "rollback"
        return Judgement(decision, f"forced at max_episodes {max_episodes}: min P(not worse by more than "
                         f"{max_regression:g}) = {p_min:.3f} {'>=' if decision == 'promote' else '<'} 0.5 ({detail}) "
                         f"{after}", p_min, per, forced=True, episodes=eps)
    return Judgement(None, f"undecided: P(not worse by more than {max_regression:g}): {detail}", p_min, per, episodes=eps)


def simulate(p_stable: float, p_cand: float, runs: int, seed: int = 0, min_episodes: int = 10, max_episodes: int = 60,
             max_regression: float = 0.1, confidence: float = 0.95, steps: int = 100,
             failure_intervention_share: float = 0.3, draws: int = DRAWS) -> dict[str, float]:
    """Run the sequential test ``runs`` times on simulated episodes of one task, one candidate and one
    stable episode at a time: an episode succeeds autonomously with probability p (no operator step),
    otherwise it fails with ``failure_intervention_share`` of its ``steps`` taken by the operator.
    Returns rollback / promotion / undecided shares and the mean candidate episodes to the decision,
    and the share decided at the minimum."""
    rng = np.random.default_rng(seed)
    metrics = ["autonomous_success", "intervention_rate"]
    rolled = promoted = at_min = 0
    n_to_decision: list[int] = []
    inter = int(steps * failure_intervention_share)
    for _ in range(runs):
        cand, stable = {"t": Tally()}, {"t": Tally()}
        for _ep in range(max_episodes):
            for side, p in ((cand, p_cand), (stable, p_stable)):
                ok = rng.random() < p
                side["t"].add("success" if ok else "failure", steps, 0 if ok else inter, float(ok))
            j = judge(cand, stable, metrics, min_episodes, max_episodes, max_regression, confidence, draws)
            if j.decision is not None:
                rolled += j.decision == "rollback"
                promoted += j.decision == "promote"
                n_to_decision.append(cand["t"].episodes)
                at_min += cand["t"].episodes == min_episodes
                break
    decided = max(1, len(n_to_decision))
    return {"rollback": rolled / runs, "promote": promoted / runs, "undecided": (runs - rolled - promoted) / runs,
            "mean_episodes": float(np.mean(n_to_decision)) if n_to_decision else float("nan"),
            "decided_at_min": at_min / decided}


if __name__ == "__main__":  # the numbers of the module docstring
    for name, (ps, pc) in {"equal": (0.8, 0.8), "broken": (0.8, 0.2), "mildly worse": (0.8, 0.6)}.items():
        print(name, simulate(ps, pc, runs=400, seed=1))
