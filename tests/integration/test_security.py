"""No credential, no data: every learner RPC (handshake, experience in, weights out) refuses a
missing, wrong, revoked or other-job robot token with UNAUTHENTICATED and never echoes the token;
every REST route but health and the static dashboard refuses a missing or wrong API key (401) and a
role that is too low (403). Real gRPC learner on a free port, real redis-server, the real app."""

from __future__ import annotations

import grpc
import pytest

from fleetloop.codec import PROTOCOL_VERSION
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc
from learner.config import LearnerConfig
from learner.process import build_learner
from services.control.jobspec import JobSpec
from services.control.state import StateStore
from tests.helpers.chunks import robot_chunk

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def jobs(redis_server, tmp_path):
    """Two jobs in Redis, a learner for job A that checks enrollments, and one token per job."""
    store = StateStore(redis_server.url)
    job_a = store.create_job(JobSpec(name="a", tasks=["reach-v3"]), created_by="test")
    job_b = store.create_job(JobSpec(name="b", tasks=["reach-v3"]), created_by="test")
    token_a, enrollment_a = store.enroll(job_a.id, "arm-a", by="test")
    token_b, _ = store.enroll(job_b.id, "arm-b", by="test")
    cfg = LearnerConfig(job_id=job_a.id, state_dir=tmp_path / "learner", tasks=["reach-v3"], control_redis_url=redis_server.url)
    impl = build_learner(cfg.model_dump_json()).serve()
    yield store, impl, job_a.id, token_a, enrollment_a, token_b
    impl.stop()


def _calls(stub, job_id: str):
    """Each learner RPC as a thunk that forces the first response."""
    return {
        "Handshake": lambda md: stub.Handshake(pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, job_id=job_id,
                                                                   actor_id="x"), metadata=md, timeout=10),
        "StreamExperience": lambda md: list(stub.StreamExperience(iter([robot_chunk(job_id, "x", "ep", 0, 0)]),
                                                                 metadata=md, timeout=10)),
        "SubscribeWeights": lambda md: next(stub.SubscribeWeights(pb.SubscribeRequest(job_id=job_id, actor_id="x"),
                                                                  metadata=md, timeout=10)),
        "FetchWeights": lambda md: next(stub.FetchWeights(pb.FetchRequest(job_id=job_id, version=0), metadata=md, timeout=10)),
    }


def test_every_rpc_needs_a_valid_token_of_its_job(jobs):
    store, impl, job_id, token_a, enrollment_a, token_b = jobs
    ch = grpc.insecure_channel(f"127.0.0.1:{impl.port}")
    stub = pb_grpc.LearnerStub(ch)
    bad = {"missing": (), "wrong": (("authorization", "Bearer flr_not-a-real-token"),),
           "other job's": (("authorization", f"Bearer {token_b}"),)}
    for rpc, call in _calls(stub, job_id).items():
        for what, md in bad.items():
            with pytest.raises(grpc.RpcError) as info:
                call(md)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (rpc, what, info.value.details())
            assert token_b not in info.value.details() and "not-a-real-token" not in info.value.details()
    # the right token opens the weights (the refusals above were about the credential, not the request)
    good = (("authorization", f"Bearer {token_a}"),)
    first = next(stub.FetchWeights(pb.FetchRequest(job_id=job_id, version=0), metadata=good, timeout=10))
    assert len(first.data) > 0
    # revoked: refused at the next RPC
    store.revoke_enrollment(job_id, enrollment_a.id, by="test")
    with pytest.raises(grpc.RpcError) as info:
        _calls(stub, job_id)["FetchWeights"](good)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert impl.core.ingestor.steps_total == 0  # nothing from an unauthenticated stream was stored
    ch.close()


def test_every_rest_route_needs_a_key_and_the_right_role(redis_server):
    from fastapi.routing import APIRoute
    from fastapi.testclient import TestClient

    from services.control.api import create_app
    from services.control.launchers.hold import HoldLauncher
    store = StateStore(redis_server.url)
    app = create_app(store, HoldLauncher(store), reconcile=False, supervise=False)
    viewer, _ = store.create_api_key("viewer", "v")
    operator, _ = store.create_api_key("operator", "o")
    open_routes = {"/healthz", "/readyz"}
    checked = 0
    with TestClient(app) as client:
        for route in app.routes:
            if not isinstance(route, APIRoute) or route.path in open_routes or not route.path.startswith("/v1/"):
                continue
            path = route.path.replace("{job_id}", "nojob").replace("{version}", "1").replace(
                "{enrollment_id}", "e").replace("{key_id}", "k")
            for method in route.methods:
                for headers in ({}, {"Authorization": "Bearer flk_wrong"}):
                    r = client.request(method, path, headers=headers)
                    assert r.status_code == 401, (method, path, r.status_code, r.text)
                    assert "flk_wrong" not in r.text
                writes = method != "GET"
                r = client.request(method, path, headers={"Authorization": f"Bearer {viewer}"})
                if writes and route.path != "/v1/whoami":
                    assert r.status_code == 403, (method, path, r.status_code, r.text)
                if route.path.startswith("/v1/apikeys"):
                    r = client.request(method, path, headers={"Authorization": f"Bearer {operator}"})
                    assert r.status_code == 403, (method, path, r.status_code, r.text)
                checked += 1
    assert checked >= 20
