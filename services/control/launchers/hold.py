"""HoldLauncher: accepts jobs and starts nothing (an API-only deployment, API fuzzing)."""

from __future__ import annotations

from fleetloop.errors import FailedPrecondition
from services.control.state import JobRecord, StateStore


class HoldLauncher:
    """Accepts jobs and leaves them ``pending``: for an API-only deployment where another
    controller starts learners, and for fuzzing the API without starting learners."""

    def launch(self, job: JobRecord) -> None:
        return None

    def stop(self, job_id: str, grace_s: float = 30.0) -> None:
        self.store.update_job(job_id, state="stopped")

    def scale_fleet(self, job_id: str, robots: int) -> int:
        raise FailedPrecondition(f"job {job_id!r} is not run by this control plane (hold launcher)", field="job_id",
                                 value=job_id)

    def alive(self, job_id: str) -> bool:
        return False

    def evaluate(self, job_id: str, version: int, trials: int) -> None:
        raise FailedPrecondition(f"job {job_id!r} is not run by this control plane (hold launcher)", field="job_id",
                                 value=job_id)

    def open_weights(self, job_id: str, version: int):
        raise FailedPrecondition(f"job {job_id!r} is not run by this control plane (hold launcher): its weights are not "
                                 "reachable from here", field="job_id", value=job_id)

    def reconcile(self) -> list[str]:
        return []

    def shutdown(self) -> None:
        return None

    def __init__(self, store: StateStore) -> None:
        self.store = store
