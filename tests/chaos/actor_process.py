"""``python -m tests.chaos.actor_process --journal FILE -- <fleetloop actor flags>``

Runs the real ``fleetloop actor`` command (``services.cli.main(["actor", ...])``) with a journal:
one JSON line per chunk that reached the spool (``put``: written by ``Spool.put``, after the
rename), per acknowledgement the runtime received (``ack``: after the spool deleted the chunk, with
the ack's learner version and duplicate flag), per chunk the learner refused (``reject``) and one
``connected`` line per process (with the episodes it closed as aborted). The journal is
instrumentation only: it observes the calls and changes nothing they do. Lines are flushed to the
OS one by one, so a SIGKILL loses at most a line being written.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def install(journal_path: str) -> None:
    """Wrap Spool.put / Spool.reject / FleetClient._on_ack / FleetClient.connect to journal them."""
    from fleetloop.client.runtime import FleetClient
    from fleetloop.client.spool import Spool
    from tests.chaos.procs import chunk_rec

    fh = open(journal_path, "a", buffering=1)
    lock = threading.Lock()
    pid = os.getpid()

    def write(rec: dict) -> None:
        with lock:
            fh.write(json.dumps({**rec, "pid": pid, "t": time.time()}) + "\n")
            fh.flush()

    put, reject, on_ack, connect = Spool.put, Spool.reject, FleetClient._on_ack, FleetClient.connect

    def put_j(self, episode_id, seq, raw, timeout=None):
        entry = put(self, episode_id, seq, raw, timeout)
        r = chunk_rec(raw)
        write({"ev": "put", "episode": r.episode_id, "seq": r.seq, "first_step": r.first_step, "steps": r.steps,
               "version": r.behavior_version, "outcome": r.outcome, "task": r.task_id, "counter": entry.counter})
        return entry

    def reject_j(self, entry, reason):
        reject(self, entry, reason)
        write({"ev": "reject", "episode": entry.episode_id, "seq": entry.seq, "reason": reason[:300]})

    def on_ack_j(self, ack):
        on_ack(self, ack)
        write({"ev": "ack", "episode": ack.episode_id, "seq": int(ack.seq), "lv": int(ack.learner_version),
               "dup": bool(ack.duplicate)})

    def connect_j(self):
        run = connect(self)
        write({"ev": "connected", "interrupted": list(self.interrupted_episodes), "version": self.version,
               "spooled": len(self.spool), "torn": self.spool.torn})
        return run

    Spool.put, Spool.reject, FleetClient._on_ack, FleetClient.connect = put_j, reject_j, on_ack_j, connect_j


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "--journal" or argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    install(argv[1])
    from services.cli import main as cli_main
    return cli_main(["actor", *argv[3:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
