"""A real Prometheus scrapes a real learner and a real simulated robot, and PromQL sees the values
the learner and the robot themselves report.

Setup: the learner in-process (real gRPC server and /metrics on free loopback ports, no Ray), one
Meta-World robot on the real actor runtime in a thread with its own ActorMetrics endpoint, and
Debian's ``prometheus`` binary scraping both every second with ``honor_labels: true`` (the
learner's series keep ``job=<fleetloop job id>`` instead of being renamed to ``exported_job``) and
the target labels ops/prometheus/rules.yml relies on (``fleetloop_component``; the robot target's
``job`` is the fleetloop job id). It loads ops/prometheus/rules.yml as shipped, except that every
group is evaluated every second instead of its production interval. A third learner-labelled
target points at a closed port, standing in for a learner that went away.

Holds: both targets are up; after the robot finishes and its spool is drained, Prometheus'
``fleetloop_learner_ingested_steps_total`` for the job equals the learner's own count of stored
steps, and plus the steps dropped at ingest (stale autonomous frames) equals the steps the robot
sent; ``fleetloop_actor_steps_total`` equals the robot's own count; the staleness
histogram has samples (its ``+Inf`` bucket equals its ``_count``, which equals the learner's
registry once training is paused); the staleness bound gauge equals the configured bound. Every
shipped rule evaluates without error on this real data; a recording rule produces the job's ingest
rate; FleetloopLearnerDown is never active for the live learner but is (pending, it has ``for: 3m``)
for the unreachable one.

Prometheus missing is a failure, not a skip: CI installs it (``make install``'s sysdeps target).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import start_http_server

from actor.envs import make_env
from actor.metrics import ActorMetrics
from actor.operators import ScriptedExpertOperator
from actor.policy_runner import PolicyRunner
from actor.robot_loop import run_robot
from learner.config import LearnerConfig
from learner.process import build_learner
from learner.staleness import StalenessConfig
from tests.helpers.prometheus_server import PrometheusMissing, PrometheusServer, find_prometheus, free_port, static_scrape
from tests.integration.helpers import RobotThread

JOB = "prom-job"
TASKS = ["reach-v3"]
BOUND = 5
EPISODES = 4
HZ = 60.0  # real-time pacing: the counters then grow across several 1 s scrapes, so rate() sees it
RULES = Path(__file__).resolve().parents[2] / "ops" / "prometheus" / "rules.yml"


@pytest.fixture()
def learner(tmp_path):
    """The learner in this process: gRPC and /metrics on free loopback ports, bound BOUND."""
    cfg = LearnerConfig(job_id=JOB, state_dir=tmp_path / "learner", tasks=TASKS, robot_tokens=["tok"], chunk_steps=20,
                        publish_every=5, min_publish_interval_s=0.2, max_updates_per_s=30, metrics_port=0,
                        max_episode_steps=120, staleness=StalenessConfig(bound=BOUND))
    impl = build_learner(cfg.model_dump_json()).serve()
    yield impl
    impl.stop()


@pytest.fixture()
def actor_metrics():
    """An ActorMetrics registry served on a free loopback port; the HTTP server is shut down after."""
    metrics = ActorMetrics("robot-p")
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    yield metrics, int(server.server_port)
    server.shutdown()
    server.server_close()
    thread.join(5)


class MeteredRobot(RobotThread):
    """RobotThread that also updates an ActorMetrics (as ``fleetloop actor --metrics-port`` does)."""

    def __init__(self, *args, metrics: ActorMetrics, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    def run(self) -> None:
        try:
            run = self.client.connect()
            runner = PolicyRunner(run, 39, 4)
            envs = {t: make_env(t, seed=self.seed + i, max_episode_steps=run.max_episode_steps) for i, t in enumerate(self.tasks)}
            self.stats = run_robot(self.client, runner, envs, lambda e: ScriptedExpertOperator(e), self.seed,
                                   max_episodes=self.episodes, hz=HZ, metrics=self.metrics, should_stop=self.stop_flag.is_set)
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def _fast_rules(dest: Path) -> Path:
    """ops/prometheus/rules.yml with every group evaluated every 1 s (expressions untouched)."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        group["interval"] = "1s"
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


@pytest.mark.timeout(240)
def test_prometheus_scrapes_learner_and_actor(learner, actor_metrics, tmp_path):
    try:
        find_prometheus()
    except PrometheusMissing as exc:
        pytest.fail(str(exc))
    metrics, actor_port = actor_metrics
    assert RULES.is_file(), f"{RULES} is missing"
    learner_target, gone_target = f"127.0.0.1:{learner.metrics_port}", f"127.0.0.1:{free_port()}"
    scrape = [static_scrape("fleetloop-learner", [learner_target], labels={"fleetloop_component": "learner"}),
              static_scrape("fleetloop-robots", [f"127.0.0.1:{actor_port}"], labels={"fleetloop_component": "robot", "job": JOB}),
              static_scrape("fleetloop-learner-gone", [gone_target], labels={"fleetloop_component": "learner"})]
    robot = MeteredRobot(f"127.0.0.1:{learner.port}", "robot-p", TASKS, tmp_path / "spool", "tok", episodes=EPISODES, seed=7,
                         job=JOB, metrics=metrics)
    rules = _fast_rules(tmp_path / "rules.yml")
    with PrometheusServer(tmp_path / "prom", scrape, rule_files=[rules]) as prom:
        up = prom.wait_targets_up(["fleetloop-learner", "fleetloop-robots"], timeout=60)
        assert up["fleetloop-learner"]["scrapeUrl"] == f"http://{learner_target}/metrics"
        # `up` carries target labels only: the learner's job label is its scrape pool's name.
        assert prom.value('up{job="fleetloop-learner"}') == 1.0
        assert prom.value(f'up{{fleetloop_component="robot", job="{JOB}"}}') == 1.0
        # honor_labels: the learner's own job label survives, and nothing is renamed to exported_job.
        assert prom.value(f'fleetloop_learner_staleness_bound_versions{{job="{JOB}"}}') == float(BOUND)
        assert prom.query("fleetloop_learner_staleness_bound_versions{exported_job!=''}") == []

        robot.start()
        robot.join(180)
        try:
            assert not robot.is_alive(), "robot did not finish its episodes"
            assert robot.error is None, robot.error
            assert robot.client.flush(30), "robot spool not drained"
            sent = robot.stats.steps
            assert robot.stats.episodes == EPISODES and sent > 0
        finally:
            robot.stop_flag.set()
            robot.client.close(flush_timeout=0)

        learner.core.set_paused(True)   # training and publishing stop; the counters below stop moving
        time.sleep(1.0)                 # let a training step already in progress finish
        status = learner.status()
        assert status["ingested_steps"] == sent, (status["ingested_steps"], sent)
        reg = learner.core.metrics.registry
        own_count = reg.get_sample_value("fleetloop_learner_staleness_versions_count", {"job": JOB})
        assert own_count and own_count > 0, "the learner trained on no online sample"

        # ingested_steps_total counts steps stored; stale autonomous steps dropped at ingest are
        # counted in dropped_samples_total instead, so stored + dropped-at-ingest == sent.
        ingested = f'fleetloop_learner_ingested_steps_total{{job="{JOB}"}}'
        own_stored = sum(reg.get_sample_value("fleetloop_learner_ingested_steps_total", {"job": JOB, "task": t}) or 0.0 for t in TASKS)
        assert own_stored > 0
        prom.wait_value(f"sum({ingested})", own_stored, timeout=30)
        dropped_at_ingest = f'fleetloop_learner_dropped_samples_total{{job="{JOB}", reason!="stale_at_training"}}'
        prom.wait_value(f"sum({ingested}) + (sum({dropped_at_ingest}) or vector(0))", float(sent), timeout=30)
        per_task = prom.query(ingested)
        assert [s["metric"]["task"] for s in per_task] == TASKS
        assert all(s["metric"]["job"] == JOB for s in per_task)

        actor_steps = 'fleetloop_actor_steps_total{actor="robot-p"}'
        prom.wait_value(f"sum({actor_steps})", float(sent), timeout=30)
        assert prom.value('sum(fleetloop_actor_episodes_total{actor="robot-p"})') == float(EPISODES)
        # the actor exports no job label: its series carry the target's job label (the fleetloop job)
        assert {(s["metric"]["job"], s["metric"]["fleetloop_component"]) for s in prom.query(actor_steps)} == {(JOB, "robot")}

        count = f'fleetloop_learner_staleness_versions_count{{job="{JOB}"}}'
        prom.wait_value(count, own_count, timeout=30)
        buckets = prom.query(f'fleetloop_learner_staleness_versions_bucket{{job="{JOB}"}}')
        by_le = {s["metric"]["le"]: s["value"] for s in buckets}
        assert by_le["+Inf"] == own_count
        assert len(by_le) >= 10 and all(v >= 0 for v in by_le.values())
        les = sorted((float(k), v) for k, v in by_le.items())
        assert [v for _, v in les] == sorted(v for _, v in les), "cumulative buckets must not decrease"

        assert prom.value(f'fleetloop_learner_staleness_bound_versions{{job="{JOB}"}}') == float(BOUND)
        prom.wait_value(f'fleetloop_learner_policy_version{{job="{JOB}"}}', float(status["version"]), timeout=10)
        assert prom.value('up{job="fleetloop-learner"}') == 1.0
        assert prom.value(f'up{{fleetloop_component="robot", job="{JOB}"}}') == 1.0
        assert prom.value('up{job="fleetloop-learner-gone"}') == 0.0

        # The shipped rules on real data: a recording rule yields this job's ingest rate ...
        rate = prom.wait_for("job:fleetloop_learner_ingested_steps:rate5m for the job",
                             lambda: prom.value(f'job:fleetloop_learner_ingested_steps:rate5m{{job="{JOB}"}}'), timeout=30)
        assert rate > 0
        ratio = prom.wait_for("the intervention ratio recording rule",
                              lambda: prom.query(f'job_task:fleetloop_learner_intervention_steps:ratio_rate10m{{job="{JOB}"}}'), timeout=30)
        # rate() extrapolates each counter on its own, so a young series can read slightly above 1
        assert [s["metric"]["task"] for s in ratio] == TASKS and 0.0 <= ratio[0]["value"] <= 1.0
        # ... the learner-down alert goes pending for the unreachable learner target only ...
        down = 'ALERTS{alertname="FleetloopLearnerDown"}'
        pending = prom.wait_for("FleetloopLearnerDown pending for the unreachable learner", lambda: prom.query(down), timeout=30)
        assert [(s["metric"]["instance"], s["metric"]["alertstate"]) for s in pending] == [(gone_target, "pending")]
        assert prom.query(f'ALERTS{{alertname="FleetloopLearnerDown", instance="{learner_target}"}}') == []
        # ... and every rule evaluated without error (matching, grouping, functions) on these series.
        rules_state = [(g["name"], r["name"], r["health"], r.get("lastError")) for g in prom.rule_groups() for r in g["rules"]]
        assert len(rules_state) == len([r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]])
        assert [r for r in rules_state if r[2] != "ok"] == [], rules_state
