"""What ``fleetloop experiment`` runs: the options, one :class:`RunSpec` per configuration x seed.

Experiments (issue 3):

* ``main``: pretrained only; HG-DAgger in offline rounds; SOP + HG-DAgger; SOP + RECAP. Equal robot
  time (each run stops when the fleet's robot steps reach ``robots * hz * minutes * 60``) and equal
  intervention budget (a fleet-wide cap of ``intervention_budget`` x that many operator steps; once
  spent, the robots continue without operator).
* ``sampler``: SOP + HG-DAgger with the adaptive sampler vs fixed 50/50 vs online only (same budgets).
* ``scaling``: SOP + HG-DAgger with 1, 2, 4, 8 robots paced at ``hz``, the same *wall-clock* budget
  (``minutes``) for every fleet size, no intervention cap.
* ``releases`` (issue 21): SOP + HG-DAgger, the same job twice per seed at equal robot time: ``strategy:
  all`` (every robot runs the newest version) and ``strategy: canary`` (half the robots, ``robot-0`` ..,
  run the candidate, the rest the stable version; :data:`RELEASES_ROLLOUT`, overridable with
  ``rollout``); no intervention cap, 3 tasks; the final evaluation is of the version the stable fleet
  runs at the end (:mod:`services.harness.experiment_releases`).

``--tiny`` shrinks everything for CI (2 tasks, 2 robots, seconds of robot time, a few evaluation
trials); explicit options still win over the tiny presets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EXPERIMENTS = ("main", "sampler", "scaling", "releases")
DEFAULT_TASKS = ["reach-v3", "push-v3", "pick-place-v3", "drawer-open-v3", "window-open-v3"]
TINY_TASKS = ["reach-v3", "drawer-open-v3"]
RELEASES_TASKS = ["reach-v3", "push-v3", "drawer-open-v3"]
#: the canary job's rollout policy (RolloutPolicy fields; ``canary_actors``: the first half of the robots unless given)
RELEASES_ROLLOUT = {"strategy": "canary", "min_episodes": 6, "max_episodes": 20}
TINY_RELEASES_ROLLOUT = {"strategy": "canary", "min_episodes": 1, "max_episodes": 2}
RECAP_FACTORY = "fleetloop.policies:recap_mlp_policy"
MLP_FACTORY = "fleetloop.policies:mlp_policy"


class RunSpec(BaseModel):
    """One run: a configuration of one experiment with one seed. Written to ``RUN_DIR/spec.json`` and
    copied into the run's JSON."""

    model_config = ConfigDict(extra="forbid")
    experiment: str = Field(description="Experiment name (main, sampler, scaling, releases).")
    config: str = Field(description="Configuration id inside the experiment, e.g. 'sop_hg_dagger'.")
    label: str = Field(description="Human-readable name used in tables and plots.")
    method: Literal["pretrained", "sop", "rounds"] = Field(
        description="pretrained: evaluate the start policy only; sop: closed loop (robots and learner at once); "
                    "rounds: collect a batch with robots, stop, train offline on everything so far, redeploy, repeat.")
    seed: int = Field(description="Seed of demos, pretraining, learner and robot layouts.")
    tasks: list[str] = Field(min_length=1, description="Meta-World v3 tasks of the one multi-task policy.")
    robots: int = Field(4, ge=1, le=64, description="Simulated robots (one process each).")
    hz: float = Field(30.0, gt=0, description="Real-time pacing of every robot (steps per second of robot time).")
    budget_kind: Literal["robot_steps", "wall"] = Field(
        "robot_steps", description="robot_steps: stop at robots*hz*minutes*60 fleet steps (equal robot time); "
                                   "wall: stop after minutes of wall-clock time (scaling).")
    minutes: float = Field(gt=0, description="Robot minutes per robot (robot_steps) or wall minutes (wall).")
    intervention_budget: float | None = Field(
        None, gt=0, le=1, description="Fleet-wide cap on operator steps as a share of the robot-step budget; None = no cap.")
    algorithm: str = Field("hg_dagger", description="Learner algorithm plug-in (hg_dagger, recap).")
    algorithm_params: dict[str, Any] = Field(default_factory=dict, description="Algorithm config fields.")
    policy_factory: str = Field(MLP_FACTORY, description="Policy plug-in 'module:function'.")
    policy_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the policy factory.")
    sampler: dict[str, Any] = Field(default_factory=dict, description="LearnerConfig.sampler fields (mode, fixed_online_share...).")
    rollout: dict[str, Any] | None = Field(None, description="LearnerConfig.rollout (RolloutPolicy fields); None = the "
                                           "learner default (strategy all).")
    rounds: int = Field(5, ge=1, description="Offline rounds (method rounds): the robot-step budget is split evenly.")
    round_train_steps: int | None = Field(
        None, ge=1, description="Learner steps after each round; None = what the closed loop's learner would make in "
                                "the round's robot time (max_updates_per_s x round seconds).")
    max_updates_per_s: float = Field(50.0, gt=0, description="Learner step rate cap of the closed loop.")
    publish_every: int = Field(25, ge=1, description="Closed loop: publish every K learner steps (SOP: 25).")
    batch_size: int = Field(256, ge=1, description="Samples per learner step.")
    max_episode_steps: int = Field(200, ge=1, description="Episode step limit.")
    eval_interval_s: float = Field(30.0, gt=0, description="Seconds of run time between periodic evaluations.")
    eval_mode: Literal["live", "deferred"] = Field(
        "live", description="live: periodic evaluations run during the run (on eval_workers processes beside the robots "
                            "and the learner); deferred: the run only snapshots the newest version every eval_interval_s "
                            "and evaluates the snapshots after the robots and learner have stopped, so evaluation never "
                            "competes with them for CPU (scaling's default).")
    eval_coarse_stride: int = Field(
        1, ge=1, description="Deferred evaluation: evaluate every k-th snapshot until one reaches the target, then refine "
                             "the gap before it (1 = every snapshot up to the first hit).")
    curve_trials: int = Field(20, ge=1, description="Trials per task of each periodic evaluation.")
    eval_trials: int = Field(50, ge=1, description="Trials per task of the final evaluation (the protocol).")
    eval_workers: int = Field(1, ge=1, description="Evaluation worker processes of the run.")
    eval_guidance_beta: float | None = Field(None, ge=0, description="CFG beta for evaluation (RECAP); None = runner default 1.0.")
    poll_s: float = Field(0.5, gt=0, description="How often the run checks budgets and evaluations.")
    demos: Path | None = Field(None, description="Offline demonstrations (filled in by the driver).")
    pretrained: Path | None = Field(None, description="Start policy weights (filled in by the driver).")
    pretrained_eval: dict[str, Any] | None = Field(None, description="Protocol evaluation of the start policy (driver).")
    run_dir: Path | None = Field(None, description="Folder of this run (filled in by the driver).")

    @property
    def run_id(self) -> str:
        """``<experiment>/<config>/seed<seed>``."""
        return f"{self.experiment}/{self.config}/seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        """The fields that decide the result (paths and filled-in evaluations excluded): a finished
        run with the same identity is reused."""
        return self.model_dump(mode="json", exclude={"demos", "pretrained", "pretrained_eval", "run_dir"})


class ExperimentOptions(BaseModel):
    """Options of ``fleetloop experiment NAME`` (None = the experiment's default or the tiny preset)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["main", "sampler", "scaling", "releases"] = Field(description="Which experiment.")
    seeds: int | None = Field(None, ge=1, le=100, description="Seeds 0..seeds-1 per configuration (default 3; tiny: 1).")
    out: Path = Field(description="Output folder: runs/, offline/, summary.json.")
    minutes: float | None = Field(None, gt=0, description="Budget per run (robot minutes per robot; scaling: wall minutes).")
    robots: list[int] | None = Field(None, description="Robots (main, sampler: the first value; scaling: every value).")
    tasks: list[str] | None = Field(None, description="Tasks (default: 5 Meta-World tasks).")
    tiny: bool = Field(False, description="CI preset: 2 tasks, 2 robots, seconds-long budgets, few trials.")
    hz: float | None = Field(None, gt=0, description="Robot pacing (default 30).")
    parallel: int = Field(1, ge=1, le=64, description="Runs executed at once (each its own process; mind the cores).")
    eval_trials: int | None = Field(None, ge=1, description="Final evaluation trials per task (default 50).")
    curve_trials: int | None = Field(None, ge=1, description="Periodic evaluation trials per task (default 20).")
    eval_interval_s: float | None = Field(None, gt=0, description="Seconds between periodic evaluations (default 30).")
    eval_mode: Literal["live", "deferred"] | None = Field(
        None, description="Periodic evaluation during the run (live) or of snapshots after it (deferred); default: "
                          "live for main and sampler, deferred for scaling.")
    eval_coarse_stride: int | None = Field(None, ge=1, description="Deferred evaluation's coarse stride (default 3).")
    intervention_budget: float | None = Field(None, ge=0, le=1, description="Main/sampler intervention cap share "
                                              "(default 0.25; 0 = no cap).")
    rounds: int | None = Field(None, ge=1, description="Offline rounds of the baseline (default 5).")
    max_updates_per_s: float | None = Field(None, gt=0, description="Learner step rate cap (default 50).")
    pretrain_steps: int | None = Field(None, ge=0, description="Behaviour-cloning steps of the start policy (default 3000).")
    demos_per_task: int | None = Field(None, ge=1, description="Scripted demonstrations per task (default 2).")
    eval_workers: int = Field(1, ge=1, description="Evaluation processes per run.")
    only: list[str] | None = Field(None, description="Run only these configuration ids.")
    recap_params: dict[str, Any] = Field(default_factory=dict, description="algorithm_params of the RECAP runs.")
    rollout: dict[str, Any] = Field(default_factory=dict, description="releases: RolloutPolicy fields of the canary "
                                    "runs, over RELEASES_ROLLOUT (strategy canary is forced).")
    eval_guidance_beta: float | None = Field(None, ge=0, description="CFG beta of RECAP evaluations (None = 1.0).")
    reuse: bool = Field(True, description="Reuse a finished run whose spec is unchanged (resume an interrupted experiment).")


_EVAL_MODE = {"main": "live", "sampler": "live", "scaling": "deferred", "releases": "live"}
_CAP = {"main": 0.25, "sampler": 0.25, "scaling": 0.25, "releases": 0}  # releases: the operator stays on (no cap)
_DEFAULTS = {"minutes": {"main": 10.0, "sampler": 10.0, "scaling": 20.0, "releases": 5.0},
             "robots": {"main": [4], "sampler": [4], "scaling": [1, 2, 4, 8], "releases": [4]}, "hz": 30.0,
             "eval_trials": 50, "curve_trials": 20, "eval_interval_s": 30.0,
             "eval_mode": _EVAL_MODE, "eval_coarse_stride": 3, "intervention_budget": _CAP, "rounds": 5,
             "max_updates_per_s": 50.0, "pretrain_steps": 3000, "demos_per_task": 2, "seeds": 3}
_TINY = {"minutes": {"main": 0.3, "sampler": 0.3, "scaling": 0.3, "releases": 0.5},
         "robots": {"main": [2], "sampler": [2], "scaling": [1, 2], "releases": [2]},
         "hz": 30.0, "eval_trials": 3, "curve_trials": 2, "eval_interval_s": 6.0, "eval_mode": _EVAL_MODE,
         "eval_coarse_stride": 1, "intervention_budget": _CAP, "rounds": 2, "max_updates_per_s": 20.0,
         "pretrain_steps": 100, "demos_per_task": 1, "seeds": 1}


def resolved(o: ExperimentOptions) -> dict[str, Any]:
    """Every option with its default (or tiny preset) filled in."""
    base = _TINY if o.tiny else _DEFAULTS
    out: dict[str, Any] = {}
    for key, default in base.items():
        value = getattr(o, key)
        if value is None:
            value = default[o.name] if isinstance(default, dict) else default
        out[key] = value
    out["tasks"] = o.tasks or (TINY_TASKS if o.tiny else RELEASES_TASKS if o.name == "releases" else DEFAULT_TASKS)
    if out["intervention_budget"] == 0:
        out["intervention_budget"] = None
    return out


TINY_RECAP = {"value_pretrain_steps": 50, "policy_pretrain_steps": 50}  # RecapConfig fields, where it has them


def recap_params(o: ExperimentOptions) -> dict[str, Any]:
    """algorithm_params of the RECAP runs: ``o.recap_params`` (over the tiny preset with ``--tiny``)."""
    params = dict(o.recap_params)
    if o.tiny:
        try:
            from learner.algorithms.recap import RecapConfig
            fields = set(RecapConfig.model_fields)
        except ImportError:
            fields = set()
        params = {**{k: v for k, v in TINY_RECAP.items() if k in fields}, **params}
    return params


def _configs(name: str, r: dict[str, Any], o: ExperimentOptions) -> list[dict[str, Any]]:
    recap = {"algorithm": "recap", "policy_factory": RECAP_FACTORY, "algorithm_params": recap_params(o),
             "eval_guidance_beta": o.eval_guidance_beta}
    cap = r["intervention_budget"]
    if name == "main":
        return [
            {"config": "pretrained", "label": "pretrained only (BC)", "method": "pretrained"},
            {"config": "hg_dagger_rounds", "label": "HG-DAgger, offline rounds", "method": "rounds", "intervention_budget": cap},
            {"config": "sop_hg_dagger", "label": "SOP + HG-DAgger", "method": "sop", "intervention_budget": cap},
            {"config": "sop_recap", "label": "SOP + RECAP", "method": "sop", "intervention_budget": cap, **recap},
        ]
    if name == "sampler":
        return [
            {"config": "adaptive", "label": "adaptive (SOP)", "method": "sop", "intervention_budget": cap,
             "sampler": {"mode": "adaptive"}},
            {"config": "fixed_50_50", "label": "fixed 50/50", "method": "sop", "intervention_budget": cap,
             "sampler": {"mode": "fixed", "fixed_online_share": 0.5}},
            {"config": "online_only", "label": "online only", "method": "sop", "intervention_budget": cap,
             "sampler": {"mode": "online_only"}},
        ]
    if name == "releases":
        return [{"config": "all", "label": "strategy: all", "method": "sop", "rollout": {"strategy": "all"}},
                {"config": "canary", "label": "strategy: canary", "method": "sop", "rollout": canary_rollout(o, r)}]
    return [{"config": f"robots_{n}", "label": f"{n} robot{'s' if n > 1 else ''}", "method": "sop", "robots": n,
             "budget_kind": "wall"} for n in r["robots"]]


def canary_rollout(o: ExperimentOptions, r: dict[str, Any]) -> dict[str, Any]:
    """The canary runs' rollout policy: the preset (tiny or not), the first half of the robots as the canary
    cohort (unless the options name a cohort or a fraction), then ``o.rollout``; validated here."""
    from learner.releases_config import RolloutPolicy
    base = dict(TINY_RELEASES_ROLLOUT if o.tiny else RELEASES_ROLLOUT)
    if "canary_actors" not in o.rollout and "canary_fraction" not in o.rollout:
        base["canary_actors"] = [f"robot-{i}" for i in range(max(1, r["robots"][0] // 2))]
    return RolloutPolicy.model_validate({**base, **o.rollout, "strategy": "canary"}).model_dump(mode="json")


def plan(o: ExperimentOptions) -> list[RunSpec]:
    """Every run of the experiment, seeds innermost (so a partial experiment has every configuration);
    scaling and releases: seeds outermost, so runs started together (``parallel``) are one seed's
    configurations side by side, meeting the same machine load."""
    r = resolved(o)
    common = {"experiment": o.name, "tasks": r["tasks"], "robots": r["robots"][0], "hz": r["hz"], "minutes": r["minutes"],
              "rounds": r["rounds"], "max_updates_per_s": r["max_updates_per_s"], "eval_interval_s": r["eval_interval_s"],
              "eval_mode": r["eval_mode"], "eval_coarse_stride": r["eval_coarse_stride"], "curve_trials": r["curve_trials"],
              "eval_trials": r["eval_trials"], "eval_workers": o.eval_workers}
    configs = [cfg for cfg in _configs(o.name, r, o) if not o.only or cfg["config"] in o.only]
    pairs = ([(cfg, seed) for seed in range(r["seeds"]) for cfg in configs] if o.name in ("scaling", "releases")
             else [(cfg, seed) for cfg in configs for seed in range(r["seeds"])])
    specs = []
    for cfg, seed in pairs:
        fields = {**common, **cfg, "seed": seed}
        if fields.get("eval_guidance_beta") is None:
            fields.pop("eval_guidance_beta", None)
        specs.append(RunSpec(**fields))
    return specs
