"""Issue 21's done-when on the simulated fleet: a broken version injected into a real learner whose
robots are real Meta-World robots (the real robot runtime, scripted HG-DAgger operator) is caught by
the canary cohort, never reaches the stable cohort, is rolled back automatically after N canary
episodes, and the job goes on learning.

Set-up: scripted reach-v3 demonstrations and a short behaviour-cloning pretrain give a competent
start policy (its held-out success, no operator, is checked clearly above 0 first); the learner
(``build_learner(cfg).serve()``: gRPC, training thread, weight store) starts from it (``initial_weights``,
the demos as ``offline_dataset``) with ``rollout: canary`` and an explicit canary cohort of 2 of 4
robots. The robots' scripted operator takes over when the policy steers away from the expert and
hands back after a correction; an episode with any takeover step is not an *autonomous* success, so
a broken policy shows as autonomous success 0 and an intervention rate of ~0.65-0.75 (the operator
still rescues most episodes), against ~0.25-0.85 and ~0-0.12 for the stable versions in the same
window (measured; 4-8 stable episodes per window, hence the spread).

The test lets the learner promote a first candidate, then negates the output layer of the learner's
training weights and publishes them (the broken candidate: held-out success 0; training goes on from
them, so every later version descends from it until the rollback retrains from stable). It checks:
the canary cohort runs the broken candidate, the learner rolls it back (decision ``rolled_back`` by
``auto``) after N <= max_episodes canary episodes (N printed), no stable-cohort robot is ever told a
broken version (the learner's per-actor assignments are recorded) nor streams an episode with one,
learner steps keep increasing, and a version newer than the rollback's copy of stable (descending
from stable, held-out success > 0) is offered to the canary cohort and decided on."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from actor.demos import record_demos
from actor.evaluate import evaluate
from actor.main import robot_specs
from actor.policy_runner import PolicyRunner
from fleetloop import wire_settings
from fleetloop.client.weight_client import VerifiedWeights
from fleetloop.weights import load_verified
from learner.config import LearnerConfig
from learner.pretrain import pretrain
from learner.process import build_learner
from tests.integration.helpers import RobotThread, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

JOB, TASKS = "relmw", ["reach-v3"]
CANARY, STABLE = ["mw-canary-0", "mw-canary-1"], ["mw-stable-0", "mw-stable-1"]
EP_STEPS = 80        # max_episode_steps of the demos, the evaluations and the fleet
MIN_EP, MAX_EP = 4, 16
EVAL_TRIALS = 20


def _held_out_success(state: dict) -> float:
    """Success rate of ``state`` on held-out reach-v3 layouts, no operator (actor.evaluate)."""
    obs, act = robot_specs()
    run_config = wire_settings.run_config(policy_factory="fleetloop.policies:mlp_policy", policy_kwargs={}, task_ids=TASKS,
                                          max_episode_steps=EP_STEPS, inference={})
    runner = PolicyRunner(run_config, obs, act)
    runner.load(VerifiedWeights(-1, "", {k: v.detach().cpu() for k, v in state.items()}, 0, 0.0, 0.0))
    res = evaluate(runner, TASKS, EVAL_TRIALS, max_episode_steps=EP_STEPS, hz=0)
    return float(np.mean([r["success_rate"] for r in res.values()]))


def _version_state(core, version: int) -> dict:
    return load_verified(core.weights.blob(version), core.weights.info(version).sha256)


def _wait(what: str, cond, timeout: float, robots=()) -> None:
    wait_until(what, cond, timeout, robots, poll_s=0.05)


@pytest.fixture(scope="module")
def start_policy(tmp_path_factory):
    """Scripted demos (10 successful reach-v3 episodes) and a 500-step BC pretrain; its held-out
    success must be clearly above 0 for the broken version's drop to be measurable."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("relmw_offline")
    counts = record_demos(TASKS, 10, root / "demos", seed=0, progress=False, max_episode_steps=EP_STEPS)
    assert counts == {"reach-v3": 10}
    pretrain(root / "demos", TASKS, root / "bc.safetensors", steps=500, batch_size=256, seed=0, progress=False)
    success = _held_out_success(load_file(str(root / "bc.safetensors")))
    assert success >= 0.3, f"the BC start policy is not competent enough (held-out success {success})"
    return root, success


def test_metaworld_canary_rolls_back_a_broken_version(start_policy, tmp_path, capsys):
    t_start = time.monotonic()
    root, start_success = start_policy
    cfg = LearnerConfig(
        job_id=JOB, state_dir=tmp_path / "state", tasks=TASKS, device="cpu", seed=5,
        serving={"host": "127.0.0.1", "port": 0},
        optimisation={"initial_weights": root / "bc.safetensors", "offline_dataset": root / "demos", "batch_size": 64,
                      "publish_every": 10, "max_updates_per_s": 10, "checkpoint_every_s": 1e6},
        episodes={"max_episode_steps": EP_STEPS, "chunk_steps": 20},
        rollout={"strategy": "canary", "canary_actors": CANARY, "min_episodes": MIN_EP, "max_episodes": MAX_EP,
                 "retrain_from_stable_on_rollback": True})
    impl = build_learner(cfg).serve()
    core, rm = impl.core, impl.core.releases
    # every (actor, version, channel) the learner assigns: what handshakes and weight subscriptions announce
    assigned: list[tuple[str, int | None, str]] = []
    assigned_lock = threading.Lock()
    real_assignment = rm.assignment

    def spy(actor_id: str):
        version, channel = real_assignment(actor_id)
        with assigned_lock:
            assigned.append((actor_id, version, channel))
        return version, channel

    rm.assignment = spy
    robots = [RobotThread(impl.target, a, TASKS, tmp_path / f"spool-{a}", None, episodes=100_000, seed=100 * (i + 1), job=JOB)
              for i, a in enumerate(CANARY + STABLE)]
    verified: dict[str, list[int]] = {r.client.actor_id: [] for r in robots}  # versions each robot fetched and verified
    for r in robots:
        r.client.on_new_policy(lambda w, a=r.client.actor_id: verified[a].append(w.version))
    history = lambda: rm.snapshot()["history"]  # noqa: E731
    try:
        for r in robots:
            r.start()
        # 1. a first good candidate is judged and promoted
        _wait("a first promotion", lambda: any(h["decision"] == "promoted" for h in history()), 120, robots)
        # 2. the broken candidate: no window open, then the learner's training weights, output layer negated, published
        core.set_paused(True)  # no open window and no retrain pending (a rollback's copy of stable would hide it)
        _wait("no open window", lambda: rm.candidate is None and not rm.retraining, 60, robots)
        with core._train_lock:
            with torch.no_grad():
                for name, t in core.algorithm.policy.state_dict().items():
                    if name.startswith("net.4."):
                        t.neg_()
            broken = core.publish()
        stable_then = rm.stable
        assert rm.candidate == broken and stable_then is not None and stable_then < broken
        core.set_paused(False)
        step_at_broken, t_broken = core.step, time.monotonic()
        _wait("the broken candidate's decision", lambda: any(h["candidate"] == broken for h in history()), 90, robots)
        t_decided = time.monotonic()
        entry = next(h for h in history() if h["candidate"] == broken)
        assert (entry["decision"], entry["by"], entry["stable"]) == ("rolled_back", "auto", stable_then), entry
        _wait("the retrain from stable", lambda: not rm._holding and rm.floor > broken, 30, robots)
        retrained = rm.floor  # the rollback's copy of stable: every version from here on descends from stable
        assert core.step > step_at_broken  # training went on while the broken candidate was judged
        # 3. the job goes on learning: a version after the copy of stable is offered to the canary cohort and decided
        step_at_retrain = core.step
        _wait("a candidate newer than the rollback's copy of stable",
              lambda: any(h["candidate"] > retrained for h in history()), 90, robots)
        assert core.step > step_at_retrain
        later = next(h for h in history() if h["candidate"] > retrained)
    finally:
        for r in robots:
            r.stop_flag.set()
        for r in robots:
            r.join(timeout=30)
        for r in robots:
            r.client.close(flush_timeout=5)
    try:
        assert not [r.error for r in robots if r.error is not None]
        _, episodes = core.episodes_since(0)
        snap = rm.snapshot()
        held_out = {v: _held_out_success(_version_state(core, v)) for v in (stable_then, broken, later["candidate"])}
    finally:
        impl.stop(checkpoint=False, grace_s=1.0, wait_s=10.0)

    n_canary = entry["episodes"]["canary"]
    cm, sm = entry["metrics"]["candidate"], entry["metrics"]["stable"]
    with capsys.disabled():
        print(f"\nMeta-World canary: start policy held-out success {start_success:.2f}; broken v{broken} (held-out "
              f"{held_out[broken]:.2f}) rolled back after N = {n_canary} canary episodes ({entry['episodes']['stable']} "
              f"stable) in {t_decided - t_broken:.1f} s; candidate autonomous success {cm['autonomous_success']:.2f} / "
              f"intervention rate {cm['intervention_rate']:.2f} vs stable v{stable_then} {sm['autonomous_success']:.2f} / "
              f"{sm['intervention_rate']:.2f}; p_not_worse {entry['p_not_worse']}; reason: {entry['reason']}")
        print(f"decisions: {[(h['candidate'], h['decision'], h['by'], h['episodes']['canary']) for h in snap['history']]}; "
              f"later v{later['candidate']} {later['decision']} (held-out {held_out[later['candidate']]:.2f}); "
              f"learner step {core.step}; test body {time.monotonic() - t_start:.0f} s")

    # the broken version was broken, and rolled back automatically after N <= max_episodes canary episodes
    assert held_out[broken] == 0.0 and held_out[stable_then] > 0.0
    assert MIN_EP <= n_canary <= MAX_EP
    assert cm["autonomous_success"] <= sm["autonomous_success"] and cm["intervention_rate"] > sm["intervention_rate"] + 0.2
    bad = set(range(broken, retrained))  # the broken version and its descendants
    stable_versions = {0} | {h["candidate"] for h in snap["history"] if h["decision"] == "promoted"}
    assert not bad & stable_versions
    by_actor: dict[str, list[int]] = {}
    for e in episodes:
        by_actor.setdefault(e["actor_id"], []).append(e["behavior_version"])
    for r in robots:
        a = r.client.actor_id
        told = [(v, c) for actor, v, c in assigned if actor == a]
        assert by_actor.get(a) and told, f"{a} streamed no episode or was never assigned a version"
        if a in STABLE:  # the stable cohort never sees the broken version or its descendants
            assert {c for _, c in told} == {"stable"} and {v for v, _ in told} <= stable_versions, (a, sorted(set(told)))
            assert not bad & {v for v, _ in told} and not bad & set(verified[a]), a
            assert not bad & set(by_actor[a]) and set(by_actor[a]) <= stable_versions, a
            assert not bad & set(r.stats.versions_run), a
        else:  # the canary cohort ran it, and nothing else of the bad range (descendants are never offered)
            assert (broken, "candidate") in told and broken in by_actor[a], a
            assert not (bad - {broken}) & set(by_actor[a]), a
    assert sum(v == broken for a in CANARY for v in by_actor[a]) >= n_canary
    # the job goes on learning: the later candidate descends from stable and is not broken
    assert later["candidate"] > retrained and later["stable"] in stable_versions and held_out[later["candidate"]] > 0.0
    m = core.metrics
    assert m.release_decisions.labels(JOB, "rolled_back", "auto")._value.get() >= 1
