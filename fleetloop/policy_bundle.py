"""Policy bundles: one exported policy version as a self-contained folder that a robot (or vLLM)
loads without the job's learner state, the control plane or a network.

Layout (format ``fleetloop-policy/v1``):

- ``model.safetensors``: the version's weights, byte for byte the blob the learner published (its
  sha256 is the version's identity);
- ``fleetloop-policy.json`` (:func:`bundle_metadata`): ``format``, ``kind`` (``robot`` / ``llm``),
  ``job_id``, ``version``, ``learner_step``, ``sha256`` and ``size_bytes`` of ``model.safetensors``,
  ``published_at``, ``tasks``, ``algorithm``, ``evaluation`` (the control plane's results for this
  version, or null), ``exported_at``; robot bundles add ``policy_factory``, ``policy_kwargs``,
  ``observation_specs`` and ``action_specs`` (each ``{name, dtype, shape, low, high}``), everything
  :func:`fleetloop.policies.build_policy` needs; LLM bundles add ``model`` (the base model's recipe).
- An LLM bundle is also a Hugging Face folder (``save_pretrained`` layout: ``config.json``,
  ``generation_config.json``, tokenizer files) that transformers and vLLM load as it is; its weights
  are the published ones (a tied ``lm_head.weight`` is left out, as published: both re-tie it).

Contracts:

- :func:`write_bundle` streams the weights into a temporary sibling folder while hashing them, refuses
  bytes whose sha256 or size differ from the metadata (IntegrityError naming ``model.safetensors``),
  writes the metadata last and renames the folder into place, so a folder with
  ``fleetloop-policy.json`` is complete. It never overwrites a non-empty folder (FailedPrecondition).
- Readers verify before loading: :func:`verify_bundle` / :func:`load_policy_bundle` hash
  ``model.safetensors`` and raise IntegrityError naming the file when it does not match; metadata of
  another format, or missing a field, is InvalidArgument naming the field.
- This module imports only ``fleetloop`` and third-party packages (robot clients reuse it); torch is
  imported only to build a policy or return torch tensors (numpy arrays without torch).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from fleetloop.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound

FORMAT = "fleetloop-policy/v1"
METADATA_FILE = "fleetloop-policy.json"
WEIGHTS_FILE = "model.safetensors"
KINDS = ("robot", "llm")
REQUIRED = ("format", "kind", "job_id", "version", "learner_step", "sha256", "size_bytes", "published_at", "tasks",
            "exported_at")
ROBOT_REQUIRED = ("policy_factory", "policy_kwargs", "observation_specs", "action_specs")
#: files of a Hugging Face base model folder an LLM bundle does not copy (weights, and the recipe marker
#: of :mod:`fleetloop.llm_models`, which would claim the folder holds the unchanged base model)
HF_SKIPPED = (".safetensors", ".bin", ".pt", ".gguf", "model.safetensors.index.json", "fleetloop_model.json")
CHUNK_BYTES = 1 << 20


def spec_dicts(specs: Iterable[Any]) -> list[dict[str, Any]]:
    """Tensor specs (``SpecModel``, plain dicts, anything with those attributes) as plain
    ``{"name", "dtype", "shape", "low", "high"}`` dicts, in the given order."""
    out = []
    for s in specs:
        get = s.get if isinstance(s, Mapping) else (lambda k, d=None, s=s: getattr(s, k, d))
        out.append({"name": str(get("name")), "dtype": str(get("dtype", "float32")),
                    "shape": [int(d) for d in get("shape", ()) or ()], "low": [float(x) for x in get("low", ()) or ()],
                    "high": [float(x) for x in get("high", ()) or ()]})
    return out


def bundle_metadata(*, job_id: str, version: int, learner_step: int, sha256: str, size_bytes: int, published_at: float,
                    tasks: Iterable[str], kind: str = "robot", policy_factory: str | None = None,
                    policy_kwargs: Mapping[str, Any] | None = None, observation_specs: Iterable[Any] = (),
                    action_specs: Iterable[Any] = (), algorithm: str | None = None,
                    evaluation: Mapping[str, Any] | None = None, model: Mapping[str, Any] | None = None,
                    exported_at: float | None = None) -> dict[str, Any]:
    """The ``fleetloop-policy.json`` document of one version (see the module docstring); checked
    with :func:`check_metadata`. ``exported_at`` defaults to now."""
    meta: dict[str, Any] = {
        "format": FORMAT, "kind": kind, "job_id": str(job_id), "version": int(version), "learner_step": int(learner_step),
        "sha256": str(sha256), "size_bytes": int(size_bytes), "published_at": float(published_at),
        "tasks": [str(t) for t in tasks], "algorithm": algorithm,
        "evaluation": dict(evaluation) if evaluation is not None else None,
        "exported_at": float(time.time() if exported_at is None else exported_at)}
    if kind == "robot":
        meta.update(policy_factory=policy_factory, policy_kwargs=dict(policy_kwargs or {}),
                    observation_specs=spec_dicts(observation_specs), action_specs=spec_dicts(action_specs))
    else:
        meta["model"] = dict(model) if model is not None else None
    return check_metadata(meta)


def check_metadata(meta: Any, where: str = METADATA_FILE) -> dict[str, Any]:
    """``meta`` if it is a ``fleetloop-policy/v1`` document with every field its kind needs; else
    InvalidArgument naming the field (and ``where`` it was read from)."""
    if not isinstance(meta, dict):
        raise InvalidArgument(f"{where} must hold a JSON object, got {type(meta).__name__}", field="metadata", value=where)
    if meta.get("format") != FORMAT:
        raise InvalidArgument(f"{where}: format {meta.get('format')!r} is not {FORMAT!r}", field="format",
                              value=meta.get("format"))
    if meta.get("kind") not in KINDS:
        raise InvalidArgument(f"{where}: kind {meta.get('kind')!r} is not one of {list(KINDS)}", field="kind",
                              value=meta.get("kind"))
    for name in REQUIRED + (ROBOT_REQUIRED if meta["kind"] == "robot" else ()):
        if name not in meta or (name in ROBOT_REQUIRED[:1] and not meta[name]):
            raise InvalidArgument(f"{where} has no {name!r}", field=name, value=None)
    digest = meta["sha256"]
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise InvalidArgument(f"{where}: sha256 {str(digest)[:80]!r} is not 64 lower-case hex digits", field="sha256",
                              value=str(digest)[:80])
    return meta


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """The checked metadata of the bundle in ``folder`` (NotFound when it has no ``fleetloop-policy.json``)."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise NotFound(f"{folder} is not a policy bundle (no {METADATA_FILE})", field="bundle", value=str(folder))
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument(f"{path} is not JSON ({str(exc)[:100]})", field="metadata", value=str(path)) from None
    return check_metadata(meta, str(path))


def _mismatch(path: Path | str, meta: Mapping[str, Any], digest: str, size: int) -> IntegrityError:
    return IntegrityError(f"{path}: sha256 {digest[:16]}... ({size} bytes) does not match {METADATA_FILE}'s "
                          f"{meta['sha256'][:16]}... ({meta['size_bytes']} bytes)", field=WEIGHTS_FILE, value=str(path))


def _weights_path(folder: Path) -> Path:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise NotFound(f"policy bundle {folder} has no {WEIGHTS_FILE}", field=WEIGHTS_FILE, value=str(path))
    return path


def verify_bundle(folder: str | Path) -> dict[str, Any]:
    """The metadata of the bundle in ``folder`` once ``model.safetensors`` matches its sha256 and size
    (hashed in pieces, never whole in memory); IntegrityError naming the file otherwise."""
    folder = Path(folder)
    meta = read_metadata(folder)
    path = _weights_path(folder)
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while piece := fh.read(CHUNK_BYTES):
            h.update(piece)
            size += len(piece)
    if h.hexdigest() != meta["sha256"] or size != meta["size_bytes"]:
        raise _mismatch(path, meta, h.hexdigest(), size)
    return meta


def write_bundle(out_dir: str | Path, metadata: Mapping[str, Any], chunks: Iterable[bytes],
                 base_model_dir: str | Path | None = None) -> Path:
    """Write a bundle of ``metadata`` whose weights are the bytes of ``chunks`` into ``out_dir``
    (absent or empty; FailedPrecondition otherwise). ``base_model_dir`` (LLM bundles): the Hugging
    Face folder whose config, generation config and tokenizer files are copied beside the weights.
    The weights are streamed to disk and hashed on the way; bytes that do not match the metadata's
    sha256 and size raise IntegrityError (field ``model.safetensors``) and leave nothing behind.
    Returns ``out_dir``."""
    meta = check_metadata(dict(metadata), "metadata")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FailedPrecondition(f"{out} exists and is not empty: refusing to overwrite it", field="out", value=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if base_model_dir is not None:
            _copy_hf_files(Path(base_model_dir), tmp)
        h, size = hashlib.sha256(), 0
        with open(tmp / WEIGHTS_FILE, "wb") as fh:
            for piece in chunks:
                fh.write(piece)
                h.update(piece)
                size += len(piece)
            fh.flush()
            os.fsync(fh.fileno())
        if h.hexdigest() != meta["sha256"] or size != meta["size_bytes"]:
            raise _mismatch(f"received {WEIGHTS_FILE}", meta, h.hexdigest(), size)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_hf_files(base: Path, dest: Path) -> None:
    if not (base / "config.json").is_file():
        raise NotFound(f"{base} is not a Hugging Face model folder (no config.json)", field="base_model_dir", value=str(base))
    for item in sorted(base.iterdir()):
        if item.is_file() and not item.name.endswith(HF_SKIPPED):
            shutil.copy2(item, dest / item.name)


def load_policy_bundle(folder: str | Path, *, build: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metadata, state_dict)`` of the bundle in ``folder``, verified first (IntegrityError naming
    ``model.safetensors`` on a sha256 or size mismatch; nothing is loaded then). Tensors are torch
    tensors when torch is installed, else numpy arrays. With torch and ``build`` (robot bundles), the
    policy is also built (:func:`build_bundle_policy`) and the state dict loaded into it strictly, so
    weights that do not fit the factory, kwargs and specs are refused here (InvalidArgument)."""
    folder = Path(folder)
    meta = read_metadata(folder)
    path = _weights_path(folder)
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta["sha256"] or len(blob) != meta["size_bytes"]:
        raise _mismatch(path, meta, digest, len(blob))
    if importlib.util.find_spec("torch") is None:
        from safetensors.numpy import load as np_load
        return meta, np_load(blob)
    from safetensors.torch import load as torch_load
    state = torch_load(blob)
    if build and meta["kind"] == "robot":
        _load_into(build_bundle_policy(meta), state, path)
    return meta, state


def _load_into(policy: Any, state: dict[str, Any], path: Path) -> Any:
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InvalidArgument(f"{path} does not fit the bundle's policy: {str(exc)[:300]}", field=WEIGHTS_FILE,
                              value=str(path)) from None
    return policy.eval()


def policy_from_bundle(folder: str | Path) -> tuple[dict[str, Any], Any]:
    """``(metadata, policy)``: a robot bundle's verified weights in the policy its metadata describes
    (eval mode). Needs torch."""
    meta, state = load_policy_bundle(folder, build=False)
    if meta["kind"] != "robot":
        raise InvalidArgument(f"{folder} is an {meta['kind']} bundle: load it with transformers or vLLM", field="kind",
                              value=meta["kind"])
    return meta, _load_into(build_bundle_policy(meta), state, Path(folder) / WEIGHTS_FILE)


def bundle_policy_spec(meta: Mapping[str, Any]):
    """The :class:`fleetloop.specs.PolicySpec` of a robot bundle (its specs and tasks)."""
    from fleetloop.specs import PolicySpec
    return PolicySpec.from_specs(meta["observation_specs"], meta["action_specs"], meta["tasks"])


def build_bundle_policy(meta: Mapping[str, Any]):
    """A fresh policy module from a robot bundle's factory, kwargs and specs (needs torch)."""
    from fleetloop.policies import build_policy
    return build_policy(meta["policy_factory"], meta["policy_kwargs"], bundle_policy_spec(meta))


def simulator_view(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The simulated Meta-World robot's observation options for a robot bundle's specs: None for the
    ``state`` layout, ``{"observations": "pixels", "cameras", "image_size"}`` for a camera layout (the
    cameras in spec order). InvalidArgument naming ``observation_specs`` when the specs are no layout
    of the simulated robot (a policy for a real robot only)."""
    from fleetloop.presets import METAWORLD_CAMERAS, metaworld_specs

    def key(specs: list[dict[str, Any]]) -> list[tuple]:
        return sorted((s["name"], s["dtype"], tuple(s["shape"]), tuple(s["low"]), tuple(s["high"])) for s in specs)

    obs, act = spec_dicts(meta.get("observation_specs") or ()), spec_dicts(meta.get("action_specs") or ())
    state_obs, state_act = metaworld_specs("state")
    if key(obs) == key(state_obs) and key(act) == key(state_act):
        return None
    cams = [s for s in obs if s["dtype"] == "uint8" and len(s["shape"]) == 3 and s["name"] in METAWORLD_CAMERAS]
    if cams and cams[0]["shape"][0] == cams[0]["shape"][1]:
        try:
            want = metaworld_specs("pixels", [c["name"] for c in cams], int(cams[0]["shape"][0]))
        except InvalidArgument:
            want = None
        if want is not None and key(obs) == key(want[0]) and key(act) == key(want[1]):
            return {"observations": "pixels", "cameras": [c["name"] for c in cams], "image_size": int(cams[0]["shape"][0])}
    names = ", ".join(f"{s['name']}:{s['dtype']}{s['shape']}" for s in obs)
    raise InvalidArgument(f"observation_specs [{names}] are not a layout of the simulated Meta-World robot ('state' or "
                          "'pixels' with Meta-World cameras): this policy runs on its own robot only", field="observation_specs",
                          value=names[:200])
