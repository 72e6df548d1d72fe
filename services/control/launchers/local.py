"""LocalLauncher: a job's learner as a Ray actor (this machine's Ray or a Ray address), its
simulated fleet as local processes (:mod:`services.harness.sim_fleet`); an offline bootstrap
(scripted demos + behaviour cloning) when the JobSpec asks for one. See :mod:`.base`."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleetloop.errors import FailedPrecondition, FleetloopError, NotFound
from fleetloop.logs import event, get_logger
from services.control.jobspec import JobSpec, learner_config
from services.control.launchers.base import SupervisedLauncher, WeightStream, file_chunks
from services.control.state import ACTIVE_STATES, JobRecord, LearnerEndpoint, StateStore
from services.harness.sim_fleet import SimRobot, rotated, spawn_robot, stop_robots

log = get_logger("services.launcher")


@dataclass
class _LocalJob:
    handle: object | None = None
    robots: list[SimRobot] = field(default_factory=list)
    token: str | None = None
    next_robot: int = 0
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _bootstrap_policy(spec) -> dict:
    """What a pixel fleet's bootstrap pretrains with: the job's own (visuomotor) policy on camera demos.
    A state job keeps the MLP pretraining (RECAP lifts it into its conditioned policy)."""
    view = spec.fleet.view() if spec.fleet else None
    if view is None:
        return {}
    return {"view": view, "policy_factory": spec.policy_factory, "policy_kwargs": spec.policy_kwargs,
            "batch_size": spec.batch_size}


class LocalLauncher(SupervisedLauncher):
    """Learners as Ray actors (``ray_address`` or a local Ray), simulated robots as processes.

    Files of a job live under ``DATA/jobs/<id>/``: ``learner/`` (ingest log, weights, checkpoints),
    ``bootstrap/`` (demos, pretrained weights), ``spool/``, ``logs/``. Relaunching a job resumes
    from ``learner/`` (checkpoint + ingest log): versions continue, no acknowledged step is lost.
    """

    def __init__(self, store: StateStore, data_dir: Path, ray_address: str | None = None, ray_num_cpus: int | None = None,
                 ray_temp_dir: str | None = None, advertise_host: str = "127.0.0.1") -> None:
        self.store, self.data_dir = store, Path(data_dir)
        self.ray_address, self.ray_num_cpus, self.ray_temp_dir = ray_address, ray_num_cpus, ray_temp_dir
        self.advertise_host = advertise_host
        self.jobs: dict[str, _LocalJob] = {}
        self._lock = threading.Lock()
        super().__init__(log, "launcher-supervisor")

    def job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    # -- launch ------------------------------------------------------------------------------
    def launch(self, job: JobRecord) -> None:
        with self._lock:
            if job.id in self.jobs and self.jobs[job.id].thread and self.jobs[job.id].thread.is_alive():
                raise FailedPrecondition(f"job {job.id!r} is already being launched", field="job_id", value=job.id)
            lj = self.jobs.setdefault(job.id, _LocalJob())
        lj.thread = threading.Thread(target=self._launch, args=(job, lj), name=f"launch-{job.id}", daemon=True)
        lj.thread.start()

    def _launch(self, job: JobRecord, lj: _LocalJob) -> None:
        from learner.ray_learner import start_learner
        spec = job.spec
        root = self.job_dir(job.id)
        try:
            weights = dataset = None
            if spec.bootstrap and not spec.offline_dataset and not spec.initial_weights:
                self.store.update_job(job.id, state="preparing")
                b = spec.bootstrap
                boot = root / "bootstrap"
                weights = boot / "pretrained.safetensors"
                if weights.exists():
                    dataset = boot / "demos"
                else:
                    from services.harness.bootstrap import bootstrap_offline
                    dataset, weights = bootstrap_offline(
                        spec.tasks, boot / "demos", weights, b.demos_per_task, b.pretrain_steps, b.seed,
                        progress=lambda m: self.store.emit(job.id, "bootstrap", message=m),
                        **_bootstrap_policy(spec))
            self.store.update_job(job.id, state="starting")
            cfg = learner_config(spec, job.id, root / "learner", self.store.url, initial_weights=weights, offline_dataset=dataset)
            if job.learner is not None:  # a relaunch: same port, so robots that keep retrying find it again
                port = int(job.learner.target.rsplit(":", 1)[1])
                cfg = cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"port": port})})
            handle = start_learner(cfg, ray_address=self.ray_address, num_cpus=self.ray_num_cpus, temp_dir=self.ray_temp_dir,
                                   actor_cpus=spec.resources.cpus, actor_gpus=spec.resources.gpus or None)
            lj.handle = handle
            target = f"{self.advertise_host}:{handle.port}"
            current = self.store.get_job(job.id)
            if current.state in ("stopping", "stopped"):  # stopped while starting
                handle.stop()
                lj.handle = None
                return
            self.store.update_job(job.id, state="paused" if current.paused else "running",
                                  learner=LearnerEndpoint(target=target, metrics_port=handle.metrics_port, pid=handle.pid))
            if current.paused:
                self.store.push_command(job.id, "pause", None, by="launcher")
            event(log, "job_running", job=job.id, target=target, pid=handle.pid)
            if spec.fleet and spec.fleet.robots:
                self.scale_fleet(job.id, spec.fleet.robots)
        except FleetloopError as exc:
            self._fail(job.id, str(exc))
        except Exception as exc:  # the launcher thread must always leave the job in a clear state
            self._fail(job.id, f"{type(exc).__name__}: {exc}")

    def _fail(self, job_id: str, error: str) -> None:
        event(log, "job_failed", level=40, job=job_id, error=error[:500])
        try:
            self.store.update_job(job_id, state="failed", error=error[:2000])
        except FleetloopError:
            pass

    # -- fleet -------------------------------------------------------------------------------
    def scale_fleet(self, job_id: str, robots: int) -> int:
        job = self.store.get_job(job_id)
        lj = self.jobs.get(job_id)
        if lj is None or lj.handle is None or job.learner is None:
            raise FailedPrecondition(f"job {job_id!r} has no running learner here (state {job.state})", field="job_id",
                                     value=job_id)
        fleet = job.spec.fleet
        if fleet is None:
            raise FailedPrecondition(f"job {job_id!r} has no simulated fleet in its spec", field="fleet", value=None)
        with lj.lock:
            lj.robots = [r for r in lj.robots if r.alive()]
            if robots > len(lj.robots):
                if lj.token is None:
                    lj.token, _ = self.store.enroll(job_id, "simulated-fleet", by="launcher", actors=["sim-*"])
                root = self.job_dir(job_id)
                for _ in range(robots - len(lj.robots)):
                    i = lj.next_robot
                    lj.next_robot += 1
                    actor_id = f"sim-{i}"
                    lj.robots.append(spawn_robot(
                        target=job.learner.target, job=job_id, actor_id=actor_id, tasks=rotated(job.spec.tasks, i),
                        token=lj.token, spool=root / "spool" / actor_id, log_path=root / "logs" / f"{actor_id}.log",
                        seed=fleet.seed * 1000 + i * 7919, hz=fleet.hz, operator=fleet.operator, view=fleet.view(),
                        jpeg_quality=fleet.jpeg_quality))
            elif robots < len(lj.robots):
                extra, lj.robots = lj.robots[robots:], lj.robots[:robots]
                threading.Thread(target=stop_robots, args=(extra,), daemon=True).start()
            n = len(lj.robots)
        self.store.update_job(job_id, fleet_robots=n)
        self.store.emit(job_id, "fleet_scaled", robots=n)
        return n

    # -- stop --------------------------------------------------------------------------------
    def stop(self, job_id: str, grace_s: float = 30.0) -> None:
        lj = self.jobs.get(job_id)
        self.store.update_job(job_id, state="stopping")
        if lj is not None and lj.thread is not None and lj.thread.is_alive():
            lj.thread.join(timeout=600)  # a launch in progress sees 'stopping' and undoes itself
        final = None
        if lj is not None and lj.handle is not None:
            try:
                lj.handle.drain()
            except Exception as exc:
                event(log, "drain_failed", level=30, job=job_id, error=repr(exc)[:200])
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and (any(r.alive() for r in lj.robots) or self._fleet_sending(lj)):
                time.sleep(0.5)
            stop_robots(lj.robots, grace_s=5.0)
            try:
                final = lj.handle.stop()
            except Exception as exc:
                event(log, "learner_stop_failed", level=30, job=job_id, error=repr(exc)[:200])
            lj.handle = None
            self.store.finalize_learner(job_id, final)  # its final numbers outlive the heartbeat
        self.jobs.pop(job_id, None)
        self.store.update_job(job_id, state="stopped", fleet_robots=0)
        if final is not None:
            self.store.emit(job_id, "stopped", version=final.get("version"), step=final.get("step"))

    @staticmethod
    def _fleet_sending(lj: _LocalJob, quiet_s: float = 3.0) -> bool:
        """Whether any actor (ours or outside robots) sent a chunk in the last ``quiet_s`` seconds."""
        try:
            actors = lj.handle.status()["actors"]
        except Exception:
            return False
        return any(time.time() - a["last_seen"] < quiet_s for a in actors.values())

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, job_id: str, version: int, trials: int) -> None:
        job = self.store.get_job(job_id)
        path = self.job_dir(job_id) / "learner" / "weights" / f"v{version}.safetensors"
        if not path.exists():
            raise FailedPrecondition(f"weights of version {version} are not on disk here (pruned or not published)",
                                     field="version", value=version)
        self.store.set_evaluation(job_id, version, {"state": "running", "trials": trials, "started_at": time.time()})

        def run() -> None:
            from services.harness.evaluation import evaluate_file
            try:
                res = evaluate_file(path, job.spec.tasks, trials, workers=1, policy_factory=job.spec.policy_factory,
                                    policy_kwargs=job.spec.policy_kwargs, view=job.spec.fleet.view() if job.spec.fleet else None)
                mean = sum(r["success_rate"] for r in res.values()) / len(res)
                self.store.set_evaluation(job_id, version, {"state": "done", "trials": trials, "tasks": res,
                                                            "mean_success": mean, "finished_at": time.time()})
                self.store.emit(job_id, "evaluated", version=version, mean_success=mean, trials=trials)
            except Exception as exc:
                self.store.set_evaluation(job_id, version, {"state": "failed", "trials": trials, "error": repr(exc)[:500]})

        threading.Thread(target=run, name=f"eval-{job_id}-v{version}", daemon=True).start()

    def open_weights(self, job_id: str, version: int) -> WeightStream:
        """The version's file in the job's learner state (``learner/weights/v<N>.safetensors``), open:
        it stays readable to the end even if retention deletes it meanwhile. NotFound when it is not there."""
        self.store.get_job(job_id)
        path = self.job_dir(job_id) / "learner" / "weights" / f"v{int(version)}.safetensors"
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"weights of version {version} of job {job_id!r} are not on disk here (pruned or not published)",
                           field="version", value=version) from None
        return WeightStream(int(version), os.fstat(fh.fileno()).st_size, file_chunks(fh))

    # -- liveness and restarts ---------------------------------------------------------------
    def alive(self, job_id: str) -> bool:
        lj = self.jobs.get(job_id)
        return lj is not None and lj.handle is not None

    def reconcile(self) -> list[str]:
        from learner.ray_learner import attach_learner, ensure_ray
        resumed = []
        for job in self.store.list_jobs():
            if job.state not in ACTIVE_STATES or self.alive(job.id):
                continue
            handle = None
            if job.state in ("running", "paused"):
                ensure_ray(self.ray_address, self.ray_num_cpus, self.ray_temp_dir)
                handle = attach_learner(job.id)
            if handle is not None:
                self.jobs[job.id] = _LocalJob(handle=handle)
                self.store.emit(job.id, "reattached", pid=handle.pid)
            else:
                self.store.emit(job.id, "relaunched", previous_state=job.state)
                self.launch(job)
            resumed.append(job.id)
        return resumed

    def supervise_once(self) -> list[str]:
        """Relaunch the learner of every running job here whose Ray actor died (kill -9, OOM, node
        loss). It resumes from its checkpoint and ingest log on the same port; robots reconnect by
        themselves. Returns the relaunched job ids."""
        import ray
        relaunched = []
        for job_id, lj in list(self.jobs.items()):
            if lj.handle is None or (lj.thread is not None and lj.thread.is_alive()):
                continue
            try:
                ray.get(lj.handle.actor.address.remote(), timeout=10)
                continue
            except Exception as exc:
                reason = f"{type(exc).__name__}"
            try:
                job = self.store.get_job(job_id)
            except FleetloopError:
                continue
            if job.state not in ("running", "paused"):
                continue
            event(log, "learner_lost", level=40, job=job_id, error=reason)
            self.store.emit(job_id, "learner_lost", error=reason, pid=lj.handle.pid)
            lj.handle = None
            self.launch(job)
            relaunched.append(job_id)
        return relaunched

    def shutdown(self) -> None:
        super().shutdown()
        for job_id, lj in list(self.jobs.items()):
            stop_robots(lj.robots, grace_s=20.0)
            if lj.handle is not None:
                try:
                    lj.handle.stop()
                except Exception as exc:
                    event(log, "learner_stop_failed", level=30, job=job_id, error=repr(exc)[:200])
            self.jobs.pop(job_id, None)

    def validate(self, spec: JobSpec) -> None:
        """Checks that need this launcher (files on this machine): raise FailedPrecondition."""
        for name in ("initial_weights", "offline_dataset"):
            value = getattr(spec, name)
            if value and not Path(value).exists():
                raise FailedPrecondition(f"{name} {value!r} does not exist on the learner's machine", field=name, value=value)
