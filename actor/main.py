"""``fleetloop actor``: one stateless robot process (Meta-World simulated robot + scripted operator).

``--kind llm`` runs an LLM rollout server instead (:mod:`actor.llm.main`); the flags below that
both kinds use (learner, job, actor id, token, spool, tasks, minutes, seed, TLS, metrics) mean the
same there, ``--tasks`` is optional for it (default: every task of the job)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from actor.envs import make_env
from actor.metrics import ActorMetrics
from actor.operators import NoOperator, ScriptedExpertOperator
from actor.policy_runner import PolicyRunner
from actor.robot_loop import run_robot
from fleetloop.client.runtime import FleetClient
from fleetloop.codec import make_spec
from fleetloop.logs import event, get_logger
from fleetloop.presets import DEFAULT_CAMERAS, DEFAULT_IMAGE_SIZE, metaworld_specs

log = get_logger("actor.main")


def robot_specs(observations: str = "state", cameras=DEFAULT_CAMERAS, image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[list, list]:
    """Observation/action specs (wire TensorSpecs) of the built-in Meta-World robot in the given
    observation mode (:func:`fleetloop.presets.metaworld_specs`)."""
    obs, act = metaworld_specs(observations, cameras, image_size)
    return ([make_spec(s["name"], s["dtype"], s["shape"], s["low"], s["high"]) for s in obs],
            [make_spec(s["name"], s["dtype"], s["shape"], s["low"], s["high"]) for s in act])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """CLI flags of ``fleetloop actor``."""
    p.add_argument("--kind", choices=["robot", "llm"], default="robot",
                   help="robot: a simulated Meta-World robot; llm: an LLM rollout server (vLLM) for a GRPO job")
    p.add_argument("--learner", required=True, help="learner gRPC target HOST:PORT")
    p.add_argument("--job", default="demo", help="job id")
    p.add_argument("--actor-id", default=None, help="actor id (default: robot-<pid>)")
    p.add_argument("--task", "--tasks", dest="tasks", default=None,
                   help="comma-separated task ids this actor runs (required for robots; llm: default all of the job's)")
    p.add_argument("--token", default=os.environ.get("FLEETLOOP_ROBOT_TOKEN"), help="robot credential (or $FLEETLOOP_ROBOT_TOKEN)")
    p.add_argument("--spool", default=None, help="spool folder (default /tmp/fleetloop-spool-<actor-id>)")
    p.add_argument("--operator", choices=["scripted", "none"], default="scripted", help="who may take over")
    p.add_argument("--deviation-threshold", type=float, default=0.5, help="scripted operator: takeover deviation")
    p.add_argument("--patience", type=int, default=3, help="scripted operator: consecutive deviating steps before takeover")
    p.add_argument("--hold-steps", type=int, default=20, help="scripted operator: steps of each correction")
    p.add_argument("--stall-k", type=int, default=25, help="scripted operator: no-progress steps before takeover (0 = off)")
    p.add_argument("--observations", choices=["state", "pixels"], default="state",
                   help="what the robot observes: state (Meta-World's 39 values) or pixels (cameras + proprioception)")
    p.add_argument("--cameras", default=",".join(DEFAULT_CAMERAS), help="pixels: comma-separated camera names")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="pixels: square image side in pixels")
    p.add_argument("--jpeg-quality", type=int, default=90, help="pixels: JPEG quality of the camera frames on the wire")
    p.add_argument("--hz", type=float, default=0.0, help="real-time pacing (e.g. 30); 0 = as fast as possible")
    p.add_argument("--minutes", type=float, default=None, help="stop after this long (default: run until signalled)")
    p.add_argument("--episodes", type=int, default=None, help="stop after this many episodes")
    p.add_argument("--seed", type=int, default=None, help="seed of this robot's episode layouts")
    p.add_argument("--tls-ca", default=os.environ.get("FLEETLOOP_TLS_CA"), help="CA certificate (PEM) to trust: enables TLS")
    p.add_argument("--tls-cert", default=os.environ.get("FLEETLOOP_TLS_CERT"), help="client certificate (PEM) when the learner requires one")
    p.add_argument("--tls-key", default=os.environ.get("FLEETLOOP_TLS_KEY"), help="private key of --tls-cert")
    p.add_argument("--metrics-port", type=int, default=None, help="serve /metrics on this port (0 = any free one)")
    p.add_argument("--metrics-host", default=os.environ.get("FLEETLOOP_METRICS_HOST", "127.0.0.1"),
                   help="address /metrics binds (0.0.0.0 in a container so Prometheus and probes reach it)")
    from actor.llm.main import add_llm_arguments
    add_llm_arguments(p)


def main(args: argparse.Namespace) -> int:
    """Connect, run episodes until the deadline / signal, flush the spool, exit 0."""
    if not args.tasks:
        print("fleetloop actor: error: the following arguments are required for --kind robot: --task/--tasks", file=sys.stderr)
        return 2
    actor_id = args.actor_id or f"robot-{os.getpid()}"
    tasks = [t for t in args.tasks.split(",") if t]
    cameras = [c for c in args.cameras.split(",") if c]
    obs_specs, act_specs = robot_specs(args.observations, cameras, args.image_size)
    pixels = args.observations == "pixels"
    stop = threading.Event()
    metrics = ActorMetrics(actor_id)
    client = FleetClient(args.learner, args.job, actor_id, obs_specs, act_specs, tasks, credential=args.token,
                         spool_dir=args.spool, connect_timeout_s=None,
                         tls_ca_file=args.tls_ca, tls_cert_file=args.tls_cert, tls_key_file=args.tls_key, capabilities={"robot": "metaworld", "operator": args.operator, "hz": str(args.hz)},
                         metrics=metrics, image_encoding={c: "jpeg" for c in cameras} if pixels else None,
                         jpeg_quality=args.jpeg_quality)
    run = client.connect()  # retries until the learner answers; SIGTERM here just ends the process (spool is on disk)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # from now on: finish the episode, flush, exit
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.metrics_port is not None:
        event(log, "metrics", actor=actor_id, port=metrics.serve(args.metrics_port, args.metrics_host))
    seed = args.seed if args.seed is not None else os.getpid()
    view = {"observations": "pixels", "cameras": cameras, "image_size": args.image_size} if pixels else {}
    envs = {t: make_env(t, seed=seed + i, max_episode_steps=run.max_episode_steps, **view) for i, t in enumerate(tasks)}
    runner = PolicyRunner(run, obs_specs, act_specs)

    def make_operator(env):
        if args.operator == "none":
            return NoOperator()
        return ScriptedExpertOperator(env, deviation_threshold=args.deviation_threshold, patience_k=args.patience,
                                      hold_steps=args.hold_steps, stall_k=args.stall_k, seed=seed)

    deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
    stats = run_robot(client, runner, envs, make_operator, seed, deadline=deadline, max_episodes=args.episodes,
                      hz=args.hz, metrics=metrics, should_stop=stop.is_set)
    flushed = client.flush(timeout=30.0)
    client.close(flush_timeout=0)
    event(log, "actor_done", actor=actor_id, version=runner.version, episodes=stats.episodes, steps=stats.steps,
          interventions=stats.intervention_steps, flushed=flushed, spooled=len(client.spool))
    return 0 if flushed else 3
