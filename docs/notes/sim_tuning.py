"""Throwaway tuning experiment for the simulated fleet demo (results: docs/notes/sim-tuning.md).

Pipeline: record scripted-expert demos (actor.demos.record_demos) -> behaviour-clone the default
multi-task MLP (fleetloop.policies.mlp_policy) -> evaluate on held-out randomised seeds -> improve
with HG-DAgger (policy drives, actor.operators.ScriptedExpertOperator takes over; train on the
intervention frames + demos) -> evaluate again. Two HG-DAgger modes:

* ``--mode rounds``: classic offline rounds (collect N episodes per task, then train S steps).
* ``--mode online``: a single-process simulation of the fleet: R robots in lockstep, the learner
  interleaved (``--train-per-tick`` steps per tick of all robots), weights published every
  ``--publish-every`` learner steps and swapped by a robot only at its episode boundary; stops after
  ``--online-seconds`` of process CPU time (robust to other load on the machine; evaluation
  excluded). Single-threaded, so CPU seconds are wall seconds on an idle core.

Batches mix like the learner's sampler: tasks uniform, then online (intervention frames) with
probability ``--online-share`` when the task has any, else offline demos.

    .venv/bin/python docs/notes/sim_tuning.py --tasks reach-v3,push-v3 --demos 3 --mode rounds
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from actor.demos import record_demos  # noqa: E402
from actor.envs.metaworld_env import MetaWorldEnv  # noqa: E402
from actor.operators import NoOperator, ScriptedExpertOperator  # noqa: E402
from fleetloop.dataset import iter_episodes  # noqa: E402
from fleetloop.policies import mlp_policy  # noqa: E402

EVAL_SEED0 = 2_000_000   # held out: demos use [seed*1e6, seed*1e6 + 5*demos), rollouts 500_000+
ROLLOUT_SEED0 = 500_000


class Data:
    """Per-task growing arrays of (obs, action)."""

    def __init__(self, n_tasks: int) -> None:
        self.obs: list[list[np.ndarray]] = [[] for _ in range(n_tasks)]
        self.act: list[list[np.ndarray]] = [[] for _ in range(n_tasks)]
        self._cat: list[tuple[np.ndarray, np.ndarray] | None] = [None] * n_tasks

    def add(self, t: int, obs: np.ndarray, act: np.ndarray) -> None:
        if len(obs):
            self.obs[t].append(obs)
            self.act[t].append(act)
            self._cat[t] = None

    def get(self, t: int) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.obs[t]:
            return None
        if self._cat[t] is None:
            self._cat[t] = (np.concatenate(self.obs[t]), np.concatenate(self.act[t]))
        return self._cat[t]

    def size(self, t: int) -> int:
        return sum(len(o) for o in self.obs[t])


def train(policy, opt, off: Data, on: Data, steps: int, batch: int, online_share: float, rng) -> float:
    """``steps`` Adam steps of MSE behaviour cloning; returns the mean loss of the last 100."""
    n_tasks = len(off.obs)
    losses = []
    for _ in range(steps):
        tasks = rng.integers(0, n_tasks, size=batch)
        obs_b = np.empty((batch, 39), np.float32)
        act_b = np.empty((batch, 4), np.float32)
        for t in range(n_tasks):
            idx = np.nonzero(tasks == t)[0]
            if not len(idx):
                continue
            d_on, d_off = on.get(t), off.get(t)
            use_on = rng.random(len(idx)) < (online_share if d_on is not None else 0.0)
            for src, sel in ((d_on, idx[use_on]), (d_off, idx[~use_on])):
                if len(sel):
                    j = rng.integers(0, len(src[0]), size=len(sel))
                    obs_b[sel], act_b[sel] = src[0][j], src[1][j]
        pred = policy(torch.from_numpy(obs_b), torch.from_numpy(tasks))
        loss = ((pred - torch.from_numpy(act_b)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return float(np.mean(losses[-100:])) if losses else float("nan")


def act(policy, obs: np.ndarray, task: int) -> np.ndarray:
    with torch.no_grad():
        return policy(torch.from_numpy(obs[None]), torch.tensor([task]))[0].numpy()


def run_jobs(policy, envs: list[tuple[MetaWorldEnv, int]], seeds: list[list[int]], operators=None) -> list[dict]:
    """Run each env's seeds one after another, all envs in lockstep (batched forward)."""
    results: list[dict] = []
    queue = [list(s) for s in seeds]
    state: list[dict | None] = [None] * len(envs)

    def start(i: int) -> None:
        if not queue[i]:
            state[i] = None
            return
        env, _ = envs[i]
        seed = queue[i].pop(0)
        obs = env.reset(seed)
        op = operators[i] if operators else NoOperator()
        op.reset(env)
        state[i] = {"obs": obs, "op": op, "seed": seed, "t": 0, "O": [], "A": [], "I": []}

    for i in range(len(envs)):
        start(i)
    while any(s is not None for s in state):
        live = [i for i, s in enumerate(state) if s is not None]
        obs_b = torch.from_numpy(np.stack([state[i]["obs"] for i in live]))
        task_b = torch.tensor([envs[i][1] for i in live])
        with torch.no_grad():
            actions = policy(obs_b, task_b).numpy()
        for a, i in zip(actions, live):
            s, (env, task) = state[i], envs[i]
            d = s["op"].decide(s["obs"], a, s["t"])
            r = env.step(d.action)
            s["O"].append(s["obs"]); s["A"].append(d.action); s["I"].append(d.intervened)
            s["obs"], s["t"] = r.obs, s["t"] + 1
            if r.done:
                results.append({"task": task, "seed": s["seed"], "success": r.success, "steps": s["t"],
                                "obs": np.stack(s["O"]), "act": np.stack(s["A"]), "interv": np.array(s["I"]),
                                "takeovers": getattr(s["op"], "stats").takeovers})
                start(i)
    return results


def evaluate(policy, eval_envs, tasks, n_seeds: int) -> dict[str, float]:
    per = len(eval_envs) // len(tasks)
    seeds = [[EVAL_SEED0 + k for k in range(j, n_seeds, per)] for _ in tasks for j in range(per)]
    res = run_jobs(policy, eval_envs, seeds)
    return {task: float(np.mean([r["success"] for r in res if r["task"] == t])) for t, task in enumerate(tasks)}


def make_operator(env, a, seed):
    return ScriptedExpertOperator(env, deviation_threshold=a.thr, patience_k=a.k, hold_steps=a.hold,
                                  stall_k=a.stall_k, budget=a.budget, expert_noise=a.op_noise, seed=seed)


def hg_rounds(a, policy, opt, tasks, off, on, rng, eval_envs, log) -> None:
    envs = [(MetaWorldEnv(t, seed=1), i) for i, t in enumerate(tasks)]
    for rnd in range(a.rounds):
        t0 = time.time()
        seeds = [[ROLLOUT_SEED0 + rnd * 1000 + j for j in range(a.eps_per_round)] for _ in tasks]
        ops = [make_operator(e, a, rnd * 100 + i) for i, (e, _) in enumerate(envs)]
        res = run_jobs(policy, envs, seeds, ops)
        n_int = 0
        for r in res:
            m = r["interv"] if not a.all_frames else np.ones_like(r["interv"])
            on.add(r["task"], r["obs"][m], r["act"][m])
            n_int += int(r["interv"].sum())
        steps = sum(r["steps"] for r in res)
        t1 = time.time()
        loss = train(policy, opt, off, on, a.round_steps, a.batch, a.online_share, rng)
        t2 = time.time()
        row = {"round": rnd + 1, "rollout_success": float(np.mean([r["success"] for r in res])),
               "interv_share": n_int / steps, "takeovers": sum(r["takeovers"] for r in res),
               "steps": steps, "loss": loss, "collect_s": t1 - t0, "train_s": t2 - t1}
        if a.eval_every and (rnd + 1) % a.eval_every == 0 and rnd + 1 < a.rounds:
            row["eval"] = evaluate(policy, eval_envs, tasks, a.round_eval_seeds)
            row["eval_mean"] = float(np.mean(list(row["eval"].values())))
        log(row)


def hg_online(a, policy, opt, tasks, off, on, rng, eval_envs, log) -> None:
    """R robots in lockstep with the learner interleaved; robots swap weights at episode ends."""
    n_t = len(tasks)
    envs = {t: [MetaWorldEnv(task, seed=10 + r) for r in range(a.robots)] for t, task in enumerate(tasks)}
    published = (0, copy.deepcopy(policy.state_dict()))
    robots = []
    next_task, next_seed = 0, ROLLOUT_SEED0
    for r in range(a.robots):
        robots.append({"policy": copy.deepcopy(policy), "version": 0})

    def start(rb: dict, r: int) -> None:
        nonlocal next_task, next_seed
        if rb["version"] < published[0]:
            rb["policy"].load_state_dict(published[1])
            rb["version"] = published[0]
        t = next_task % n_t
        next_task += 1
        env = envs[t][r]
        rb.update(task=t, env=env, obs=env.reset(next_seed), t=0, O=[], A=[], I=[])
        next_seed += 1
        rb["op"] = make_operator(env, a, next_seed)
        rb["op"].reset(env)

    for r, rb in enumerate(robots):
        start(rb, r)
    learner_steps, episodes, successes, int_steps, all_steps = 0, 0, 0, 0, 0
    clock, last_eval, last_tick, wall0 = 0.0, 0.0, time.process_time(), time.time()
    while clock < a.online_seconds:
        for r, rb in enumerate(robots):
            d = rb["op"].decide(rb["obs"], act(rb["policy"], rb["obs"], rb["task"]), rb["t"])
            res = rb["env"].step(d.action)
            rb["O"].append(rb["obs"]); rb["A"].append(d.action); rb["I"].append(d.intervened)
            rb["obs"], rb["t"] = res.obs, rb["t"] + 1
            if res.done:
                m = np.array(rb["I"]) if not a.all_frames else np.ones(len(rb["I"]), bool)
                on.add(rb["task"], np.stack(rb["O"])[m], np.stack(rb["A"])[m])
                episodes += 1; successes += res.success
                int_steps += int(np.sum(rb["I"])); all_steps += rb["t"]
                start(rb, r)
        for _ in range(a.train_per_tick):
            train(policy, opt, off, on, 1, a.batch, a.online_share, rng)
            learner_steps += 1
            if learner_steps % a.publish_every == 0:
                published = (published[0] + 1, copy.deepcopy(policy.state_dict()))
        now = time.process_time()  # CPU seconds of this (single-threaded) process: robust to load
        clock += now - last_tick
        last_tick = now
        if clock - last_eval >= a.eval_interval_s or clock >= a.online_seconds:
            last_eval = clock
            ev = evaluate(policy, eval_envs, tasks, a.round_eval_seeds if clock < a.online_seconds else a.eval_seeds)
            log({"cpu_s": round(clock, 1), "wall_s": round(time.time() - wall0, 1), "learner_steps": learner_steps, "version": published[0],
                 "episodes": episodes, "rollout_success": successes / max(episodes, 1),
                 "interv_share": int_steps / max(all_steps, 1), "eval": ev, "eval_mean": float(np.mean(list(ev.values())))})
            last_tick = time.process_time()  # evaluation time excluded from the clock


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="reach-v3,push-v3,pick-place-v3,drawer-open-v3")
    p.add_argument("--demos", type=int, default=2)
    p.add_argument("--demo-noise", type=float, default=0.1)
    p.add_argument("--bc-steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-seeds", type=int, default=30)
    p.add_argument("--round-eval-seeds", type=int, default=10)
    p.add_argument("--eval-envs", type=int, default=3, help="parallel eval envs per task")
    p.add_argument("--mode", choices=["rounds", "online", "none"], default="rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--eps-per-round", type=int, default=8)
    p.add_argument("--round-steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--robots", type=int, default=4)
    p.add_argument("--online-seconds", type=float, default=180)
    p.add_argument("--eval-interval-s", type=float, default=60)
    p.add_argument("--train-per-tick", type=int, default=1)
    p.add_argument("--publish-every", type=int, default=25)
    p.add_argument("--online-share", type=float, default=0.5)
    p.add_argument("--all-frames", action="store_true")
    p.add_argument("--thr", type=float, default=0.5)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--hold", type=int, default=20)
    p.add_argument("--stall-k", type=int, default=25)
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--op-noise", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append a JSON line of results here")
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    tasks = a.tasks.split(",")
    t_start = time.time()
    rows: list[dict] = []

    def log(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row, default=lambda x: round(x, 3) if isinstance(x, float) else str(x)), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        counts = record_demos(tasks, a.demos, tmp, seed=a.seed, action_noise=a.demo_noise, progress=False)
        off = Data(len(tasks))
        for ep in iter_episodes(tmp):
            off.add(tasks.index(ep.task_id), ep.obs, ep.actions)
    t_demo = time.time() - t_start
    policy = mlp_policy(39, 4, len(tasks))
    opt = torch.optim.Adam(policy.parameters(), lr=a.lr)
    on = Data(len(tasks))
    t0 = time.time()
    bc_loss = train(policy, opt, off, on, a.bc_steps, a.batch, 0.0, rng)
    t_bc = time.time() - t0
    eval_envs = [(MetaWorldEnv(task, seed=2), t) for t, task in enumerate(tasks) for _ in range(a.eval_envs)]
    t0 = time.time()
    pre = evaluate(policy, eval_envs, tasks, a.eval_seeds)
    t_eval = time.time() - t0
    log({"phase": "pretrained", "demos": counts, "demo_frames": [off.size(t) for t in range(len(tasks))],
         "bc_loss": bc_loss, "demo_s": t_demo, "bc_s": t_bc, "eval_s": t_eval,
         "eval": pre, "eval_mean": float(np.mean(list(pre.values())))})
    t0, c0 = time.time(), time.process_time()
    if a.mode == "rounds":
        hg_rounds(a, policy, opt, tasks, off, on, rng, eval_envs, log)
    elif a.mode == "online":
        hg_online(a, policy, opt, tasks, off, on, rng, eval_envs, log)
    t_hg, c_hg = time.time() - t0, time.process_time() - c0
    post = evaluate(policy, eval_envs, tasks, a.eval_seeds) if a.mode == "rounds" else rows[-1].get("eval", pre)
    summary = {"phase": "final", "args": vars(a), "pre": pre, "post": post,
               "pre_mean": float(np.mean(list(pre.values()))), "post_mean": float(np.mean(list(post.values()))),
               "online_frames": [on.size(t) for t in range(len(tasks))], "hg_s": t_hg, "hg_cpu_s": c_hg,
               "total_s": time.time() - t_start, "total_cpu_s": time.process_time()}
    summary["gain"] = summary["post_mean"] - summary["pre_mean"]
    summary["history"] = [{k: v for k, v in r.items() if k != "phase"} for r in rows[1:]]
    log(summary)
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
