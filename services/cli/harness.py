"""``fleetloop demo`` (robots or LLM), ``fleetloop eval`` and ``fleetloop experiment``: the harness
(:mod:`services.harness`) from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.cli.common import DEFAULT_TASKS


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.mode == "llm":
        from services.harness.llm_demo import LlmDemoOptions, run_llm_demo
        model = "tiny" if args.tiny else (args.model or "smollm2")
        # the robot demo's defaults (9 minutes, runs/demo) mean "not given" here
        minutes = args.minutes if args.minutes is not None else (0.75 if args.tiny else 12.0)
        out = args.out if args.out != "runs/demo" else "runs/llm-demo"
        run_llm_demo(LlmDemoOptions(minutes=minutes, out=Path(out), model=model, task=args.task, servers=args.servers,
                                    eta=args.eta, lr=args.lr, seed=args.seed, live=not args.no_live),
                     command=" ".join(["fleetloop", *sys.argv[1:]]))
        return 0
    from services.harness.demo import demo_options, run_demo
    tasks = args.tasks.split(",") if args.tasks else (None if args.observations == "pixels" else DEFAULT_TASKS.split(","))
    cameras = [c for c in args.cameras.split(",") if c] if args.cameras else None
    opts = demo_options(args.observations, algorithm=args.algorithm, robots=args.robots, tasks=tasks,
                        minutes=args.minutes, out=Path(args.out), seed=args.seed, demos_per_task=args.demos_per_task,
                        pretrain_steps=args.pretrain_steps, eval_trials=args.eval_trials, hz=args.hz,
                        live=not args.no_live, demos=args.demos, cameras=cameras, image_size=args.image_size,
                        batch_size=args.batch_size)
    report = run_demo(opts)
    return 0 if report["overall"]["duplicates_stored"] == 0 else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    from services.harness.evaluation import evaluate_file, policy_view, read_bundle, read_policy_file, resolve_weights, summarize
    state = Path(args.state_dir) if args.state_dir else None
    saved = read_policy_file(state) if state else {}
    if args.weights and Path(args.weights).is_dir():  # an export folder (fleetloop policy export): verified, self-describing
        weights, saved = read_bundle(Path(args.weights))
        args.weights = str(weights)
    if not saved and args.checkpoint:  # a checkpoint inside a state dir: STATE/checkpoints[/ckpt-*]
        ck = Path(args.checkpoint)
        saved = next((read_policy_file(d) for d in (ck, ck.parent, ck.parent.parent) if read_policy_file(d)), {})
    path = resolve_weights(weights=Path(args.weights) if args.weights else None, state_dir=state, version=args.version,
                           checkpoint=Path(args.checkpoint) if args.checkpoint else None,
                           scratch=Path(args.out).parent if args.out else Path("runs/eval"))
    tasks = args.tasks.split(",") if args.tasks else saved.get("tasks", DEFAULT_TASKS.split(","))
    factory = args.policy_factory or saved.get("policy_factory", "fleetloop.policies:mlp_policy")
    kwargs = json.loads(args.policy_kwargs) if args.policy_kwargs else saved.get("policy_kwargs", {})
    res = evaluate_file(path, tasks, args.trials, workers=args.workers, policy_factory=factory, policy_kwargs=kwargs,
                        hz=args.hz, guidance_beta=args.guidance_beta, max_steps=args.max_steps, view=policy_view(saved))
    report = {"weights": str(path), "tasks": res, **summarize(res), "trials": args.trials, "hz": args.hz,
              "guidance_beta": args.guidance_beta, "policy_factory": factory}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from services.harness.experiment import run_experiment
    from services.harness.experiment_config import ExperimentOptions
    opts = ExperimentOptions(
        name=args.name, seeds=args.seeds, out=Path(args.out or f"runs/experiments/{args.name}"), minutes=args.minutes,
        robots=[int(x) for x in args.robots.split(",")] if args.robots else None,
        tasks=args.tasks.split(",") if args.tasks else None, tiny=args.tiny, hz=args.hz, parallel=args.parallel,
        eval_trials=args.eval_trials, curve_trials=args.curve_trials, eval_interval_s=args.eval_interval,
        eval_mode=args.eval_mode, eval_coarse_stride=args.eval_stride,
        intervention_budget=args.intervention_budget, rounds=args.rounds, max_updates_per_s=args.max_updates_per_s,
        pretrain_steps=args.pretrain_steps, demos_per_task=args.demos_per_task, eval_workers=args.eval_workers,
        only=args.only.split(",") if args.only else None, eval_guidance_beta=args.guidance_beta,
        recap_params=json.loads(args.recap_params) if args.recap_params else {}, reuse=not args.no_reuse,
        rollout=json.loads(args.rollout) if args.rollout else {})
    summary = run_experiment(opts, command=" ".join(["fleetloop", *sys.argv[1:]]) if sys.argv[1:2] == ["experiment"]
                             else f"fleetloop experiment {args.name}")
    return 0 if summary["ok"] == summary["runs"] else 1


def add_demo(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="the main job: a simulated Meta-World fleet improving one policy online; "
                                    "'demo llm': GRPO on an LLM with vLLM rollout servers")
    d.add_argument("mode", nargs="?", choices=["robots", "llm"], default="robots",
                   help="robots (default): the Meta-World fleet; llm: services.harness.llm_demo (see --model, --servers, --eta)")
    dl = d.add_argument_group("demo llm")
    dl.add_argument("--model", default=None, help="llm: smollm2 (default) | tiny | a Hugging Face folder")
    dl.add_argument("--task", default="arith", help="llm: built-in verifiable task")
    dl.add_argument("--servers", type=int, default=2, help="llm: rollout servers (one vLLM engine each)")
    dl.add_argument("--eta", type=int, default=1, help="llm: max staleness in versions (0 = synchronous)")
    dl.add_argument("--lr", type=float, default=None, help="llm: GRPO learning rate (default: the model preset's)")
    dl.add_argument("--tiny", action="store_true", help="llm: tiny random Llama, about a minute after start-up (CI)")
    d.add_argument("--robots", type=int, default=4, help="number of simulated robots")
    d.add_argument("--tasks", default=None, help=f"comma-separated Meta-World v3 task ids (default {DEFAULT_TASKS}; "
                   "pixels: push-v3,drawer-open-v3,window-open-v3)")
    d.add_argument("--minutes", type=float, default=None, help="length of the online phase (default 9; pixels 10)")
    d.add_argument("--observations", choices=["state", "pixels"], default="state",
                   help="state: the 39 Meta-World values and an MLP; pixels: 2 cameras + proprioception (no object or "
                        "goal coordinates) and the visuomotor policy, with its own defaults (services.harness.demo.PIXEL_PRESET)")
    d.add_argument("--cameras", default=None, help="pixels: comma-separated cameras (default corner3,gripperPOV)")
    d.add_argument("--image-size", type=int, default=None, help="pixels: square image side in pixels (default 84)")
    d.add_argument("--batch-size", type=int, default=None, help="learner batch size (default 256; pixels 64)")
    d.add_argument("--out", default="runs/demo", help="output folder (report.json, report.png, logs, state)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--demos", default=None, help="existing demo dataset (default: record into OUT/demos)")
    d.add_argument("--demos-per-task", type=int, default=None, help="scripted demonstrations recorded per task (default 2)")
    d.add_argument("--pretrain-steps", type=int, default=None, help="behaviour-cloning steps of the initial policy (default 3000)")
    d.add_argument("--eval-trials", type=int, default=None, help="evaluation trials per task, pretrained and final (default 50)")
    d.add_argument("--hz", type=float, default=0.0, help="robot pacing (0 = as fast as the CPU allows)")
    d.add_argument("--no-live", action="store_true", help="plain log lines instead of the live view")
    d.add_argument("--algorithm", choices=["hg_dagger", "recap"], default="hg_dagger", help="learner algorithm")
    d.set_defaults(func=_cmd_demo)


def add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate a frozen policy on fixed held-out seeds (no operator): success, "
                                     "episodes per hour at the robot's pace, mean episode length")
    ev.add_argument("--weights", default=None, help="a safetensors weights file, or an export folder (fleetloop policy "
                    "export: its policy, tasks and observation layout come with it)")
    ev.add_argument("--state-dir", default=None, help="a job's learner state folder (weights/, checkpoints/)")
    ev.add_argument("--version", default=None, help="policy version in --state-dir (a number or 'latest')")
    ev.add_argument("--checkpoint", default=None, help="a learner checkpoint folder (ckpt-*, or checkpoints/: the newest)")
    ev.add_argument("--tasks", default=None, help=f"comma-separated tasks (default: the state dir's, else {DEFAULT_TASKS})")
    ev.add_argument("--trials", type=int, default=50, help="trials per task (fixed seeds)")
    ev.add_argument("--workers", type=int, default=2, help="evaluation processes")
    ev.add_argument("--hz", type=float, default=30.0, help="robot pace for episodes per hour (resets excluded)")
    ev.add_argument("--max-steps", type=int, default=200, help="episode step limit")
    ev.add_argument("--guidance-beta", type=float, default=None,
                    help="classifier-free guidance beta for indicator-conditioned (RECAP) policies (default 1.0)")
    ev.add_argument("--policy-factory", default=None, help="policy plug-in (default: the state dir's, else the MLP)")
    ev.add_argument("--policy-kwargs", default=None, help="JSON keyword arguments of the policy factory")
    ev.add_argument("--out", default=None, help="also write the JSON result here")
    ev.set_defaults(func=_cmd_eval)


def add_experiment(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("experiment", help="run an experiment of issue 3 (main, sampler, scaling) or issue 21 "
                                           "(releases: strategy all vs canary): every configuration x seed, one JSON "
                                           "per run and a summary")
    ex.add_argument("name", choices=["main", "sampler", "scaling", "releases"])
    ex.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per configuration (default 3; --tiny: 1)")
    ex.add_argument("--out", default=None, help="output folder (default runs/experiments/NAME)")
    ex.add_argument("--minutes", type=float, default=None,
                    help="budget per run: robot minutes per robot (main, sampler: default 10; releases: 5) or wall "
                         "minutes (scaling: 20)")
    ex.add_argument("--robots", default=None, help="robots (main/sampler: default 4; scaling: list, default 1,2,4,8)")
    ex.add_argument("--tasks", default=None, help="comma-separated tasks (default reach, push, pick-place, drawer-open, "
                                                 "window-open; releases: reach, push, drawer-open)")
    ex.add_argument("--tiny", action="store_true", help="CI preset: 2 tasks, 2 robots, seconds-long budgets")
    ex.add_argument("--hz", type=float, default=None, help="robot pacing (default 30)")
    ex.add_argument("--parallel", type=int, default=1, help="runs at once (each its own process)")
    ex.add_argument("--eval-trials", type=int, default=None, help="final evaluation trials per task (default 50)")
    ex.add_argument("--curve-trials", type=int, default=None, help="periodic evaluation trials per task (default 20)")
    ex.add_argument("--eval-interval", type=float, default=None, help="seconds between periodic evaluations (default 30)")
    ex.add_argument("--eval-mode", choices=["live", "deferred"], default=None,
                    help="periodic evaluation during the run (live) or of snapshots taken every --eval-interval and "
                         "evaluated after the run (deferred: never competes with robots and learner for CPU); default: "
                         "live for main and sampler, deferred for scaling")
    ex.add_argument("--eval-stride", type=int, default=None,
                    help="deferred evaluation: every k-th snapshot until one reaches 0.8, then the gap before it (default 3)")
    ex.add_argument("--intervention-budget", type=float, default=None,
                    help="fleet-wide operator-step cap as a share of the robot-step budget (default 0.25; releases: "
                         "0 = none)")
    ex.add_argument("--rounds", type=int, default=None, help="offline rounds of the baseline (default 5)")
    ex.add_argument("--max-updates-per-s", type=float, default=None, help="learner step rate cap (default 50)")
    ex.add_argument("--pretrain-steps", type=int, default=None, help="behaviour-cloning steps (default 3000)")
    ex.add_argument("--demos-per-task", type=int, default=None, help="scripted demos per task (default 2)")
    ex.add_argument("--eval-workers", type=int, default=1, help="evaluation processes per run")
    ex.add_argument("--only", default=None, help="comma-separated configuration ids to run")
    ex.add_argument("--guidance-beta", type=float, default=None, help="CFG beta of RECAP evaluations (default 1.0)")
    ex.add_argument("--recap-params", default=None, help="JSON algorithm_params of the RECAP runs")
    ex.add_argument("--rollout", default=None, help="releases: JSON RolloutPolicy fields of the canary runs (default "
                    "min_episodes 6, max_episodes 20, canary_actors: the first half of the robots)")
    ex.add_argument("--no-reuse", action="store_true", help="rerun finished runs even when their spec is unchanged")
    ex.set_defaults(func=_cmd_experiment)
