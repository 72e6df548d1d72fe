"""TLS on the wire: `fleetloop certs init` material, the learner serving TLS (and mTLS), robots that
trust the CA connect and stream, robots without TLS / with another CA / without a client cert are
refused; the API over HTTPS. Real gRPC server and uvicorn on free loopback ports."""

from __future__ import annotations

import os
import stat

import httpx
import pytest

from actor.main import robot_specs
from fleetloop.client.runtime import FleetClient
from fleetloop.errors import FleetloopError
from fleetloop.tls import init_certs
from learner.config import LearnerConfig
from learner.process import build_learner

pytestmark = pytest.mark.timeout(180)


@pytest.fixture()
def certs(tmp_path):
    return init_certs(tmp_path / "certs", ["localhost", "127.0.0.1"])


def _learner(tmp_path, certs, mtls=False):
    cfg = LearnerConfig(state_dir=tmp_path / "learner", tasks=["reach-v3"], robot_tokens=["tok"], max_updates_per_s=5,
                        tls_cert_file=certs["server.pem"], tls_key_file=certs["server.key"],
                        tls_client_ca_file=certs["ca.pem"] if mtls else None)
    return build_learner(cfg.model_dump_json()).serve()


def _client(impl, tmp_path, name, **tls):
    obs, act = robot_specs()
    return FleetClient(f"127.0.0.1:{impl.port}", "demo", name, obs, act, ["reach-v3"], credential="tok",
                       spool_dir=str(tmp_path / name), connect_timeout_s=4, **tls)


def test_private_keys_are_owner_only(certs):
    for name in ("ca.key", "server.key", "client.key"):
        assert stat.S_IMODE(os.stat(certs[name]).st_mode) == 0o600


def test_tls_learner_accepts_only_clients_that_trust_it(tmp_path, certs):
    impl = _learner(tmp_path, certs)
    try:
        ok = _client(impl, tmp_path, "tls-ok", tls_ca_file=str(certs["ca.pem"]))
        ok.connect()
        assert ok.version == 0
        rec = ok.begin_episode("reach-v3")
        import numpy as np
        for _ in range(5):
            rec.record(np.zeros(39, np.float32), np.zeros(4, np.float32), 0.0, False)
        rec.end("success")
        assert ok.flush(30)
        ok.close()
        assert impl.core.ingestor.steps_total == 5

        plain = _client(impl, tmp_path, "plain")
        with pytest.raises(FleetloopError):
            plain.connect()
        other = init_certs(tmp_path / "other", ["localhost", "127.0.0.1"])
        wrong_ca = _client(impl, tmp_path, "wrong-ca", tls_ca_file=str(other["ca.pem"]))
        with pytest.raises(FleetloopError):
            wrong_ca.connect()
    finally:
        impl.stop()


def test_mtls_requires_a_client_certificate(tmp_path, certs):
    impl = _learner(tmp_path, certs, mtls=True)
    try:
        no_cert = _client(impl, tmp_path, "no-cert", tls_ca_file=str(certs["ca.pem"]))
        with pytest.raises(FleetloopError):
            no_cert.connect()
        with_cert = _client(impl, tmp_path, "with-cert", tls_ca_file=str(certs["ca.pem"]),
                            tls_cert_file=str(certs["client.pem"]), tls_key_file=str(certs["client.key"]))
        with_cert.connect()
        with_cert.close()
    finally:
        impl.stop()


def test_tls_config_is_checked(tmp_path, certs):
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="tls_cert_file and tls_key_file"):
        LearnerConfig(tls_cert_file=certs["server.pem"])
    with pytest.raises(ValidationError, match="not a readable file"):
        LearnerConfig(tls_cert_file=tmp_path / "missing.pem", tls_key_file=certs["server.key"])


def test_api_over_https(tmp_path, certs):
    import uvicorn

    from services.control.api import create_app
    from services.control.launchers.hold import HoldLauncher
    from services.control.redis_server import free_port
    from services.control.state import StateStore
    from tests.helpers.control_plane import start_redis
    redis_server = start_redis(tmp_path)
    store = StateStore(redis_server.url)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store, HoldLauncher(store), reconcile=False), host="127.0.0.1", port=port,
                                           log_level="warning", ssl_certfile=str(certs["server.pem"]),
                                           ssl_keyfile=str(certs["server.key"])))
    import threading
    import time
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        for _ in range(100):
            try:
                r = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=__import__("ssl").create_default_context(cafile=str(certs["ca.pem"])), timeout=2)
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert r.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)  # no plain HTTP on the TLS port
    finally:
        server.should_exit = True
        t.join(10)
        redis_server.stop()
