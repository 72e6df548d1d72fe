"""``fleetloop policy ...``: export a policy version as a self-contained folder, and keep versions.

- ``fleetloop policy export JOB VERSION OUT [--api URL] [--api-key KEY]``: downloads the version's
  metadata (``GET /v1/jobs/JOB/policies/VERSION/metadata``) and weights (``.../weights``, streamed
  to disk, sha256 checked against the metadata and the ``X-Fleetloop-Sha256`` header) and writes
  the bundle folder OUT (:mod:`fleetloop.policy_bundle`: ``model.safetensors`` +
  ``fleetloop-policy.json``). OUT must be absent or empty.
- ``fleetloop policy export JOB VERSION OUT --state-dir STATE``: offline, from a learner state folder
  (``STATE/weights/v<N>.safetensors`` checked against ``STATE/weights/index.json``; the policy from
  ``STATE/policy.json``, which every robot learner writes at start). An LLM learner's state (it has
  ``STATE/llm/``) gives a Hugging Face folder: the base model's config, generation config and
  tokenizer (``--model-dir``, default the one model folder under ``STATE/models``) with the version's
  weights, which transformers and vLLM load as they are.
- ``fleetloop policy keep|unkeep JOB VERSION``: weight retention never deletes the version / releases it.

The API and key default like ``fleetloop job``: ``$FLEETLOOP_API`` (else http://127.0.0.1:8000),
``$FLEETLOOP_API_KEY`` or ``runs/controlplane/admin.key``. Prints the written metadata as JSON;
errors as ``error: ...`` on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from fleetloop.errors import FleetloopError, IntegrityError, InvalidArgument, NotFound
from fleetloop.policy_bundle import CHUNK_BYTES, bundle_metadata, write_bundle

LOCAL_KEY = Path("runs/controlplane/admin.key")
SHA_HEADER = "X-Fleetloop-Sha256"  # services.control.policy_routes.SHA_HEADER


def _key(args: argparse.Namespace) -> str | None:
    if args.api_key:
        return args.api_key
    if os.environ.get("FLEETLOOP_API_KEY"):
        return os.environ["FLEETLOOP_API_KEY"]
    return LOCAL_KEY.read_text().strip() if LOCAL_KEY.exists() else None


def export_over_rest(api: Any, job_id: str, version: int, out: Path) -> dict[str, Any]:
    """Write the bundle of ``version`` of ``job_id`` from the control plane behind ``api``
    (:class:`services.control.client.ApiClient`) into ``out``; returns its metadata."""
    meta = api.call("GET", f"/v1/jobs/{job_id}/policies/{version}/metadata")

    def sink(pieces: Iterator[bytes], headers: Any) -> Path:
        if headers.get(SHA_HEADER) != meta["sha256"]:
            raise IntegrityError(f"the weights' {SHA_HEADER} {headers.get(SHA_HEADER)!r} is not the metadata's sha256 "
                                 f"{meta['sha256']!r}", field="sha256", value=headers.get(SHA_HEADER))
        return write_bundle(out, meta, pieces)
    api.download(f"/v1/jobs/{job_id}/policies/{version}/weights", sink)
    return meta


def _file_pieces(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while piece := fh.read(CHUNK_BYTES):
            yield piece


def _version_row(state: Path, version: int) -> dict[str, Any]:
    weights = state / "weights"
    index = weights / "index.json"
    rows = {int(v["version"]): v for v in json.loads(index.read_text()).get("versions", [])} if index.is_file() else {}
    if version not in rows or not (weights / f"v{version}.safetensors").is_file():
        raise NotFound(f"version {version} is not retained in {weights} (retained: {sorted(rows)[:3]}...{sorted(rows)[-3:]})",
                       field="version", value=version)
    return rows[version]


def _base_model(state: Path, model_dir: str | None) -> Path:
    if model_dir:
        return Path(model_dir)
    found = sorted(p for p in (state / "models").glob("*") if (p / "config.json").is_file())
    if len(found) != 1:
        raise InvalidArgument(f"{state / 'models'} holds {len(found)} model folders: name the job's base model with "
                              "--model-dir", field="model_dir", value=str(state / "models"))
    return found[0]


def export_from_state_dir(state: Path, job_id: str, version: int, out: Path, model_dir: str | None = None) -> dict[str, Any]:
    """Write the bundle of ``version`` from the learner state folder ``state`` into ``out`` (see the
    module docstring); returns its metadata. IntegrityError when the file does not match its index."""
    row = _version_row(state, version)
    common = dict(job_id=job_id, version=version, learner_step=row["learner_step"], sha256=row["sha256"],
                  size_bytes=row["size_bytes"], published_at=row["published_at"])
    base = None
    if (state / "llm").is_dir() or model_dir:
        base = _base_model(state, model_dir)
        recipe = base / "fleetloop_model.json"
        meta = bundle_metadata(**common, kind="llm", tasks=[], algorithm="grpo",
                               model=json.loads(recipe.read_text()) if recipe.is_file() else {"folder": str(base)})
    else:
        policy_file = state / "policy.json"
        if not policy_file.is_file():
            raise NotFound(f"{state} has no policy.json (written by robot learners at start): cannot tell how to build "
                           "its policy", field="state_dir", value=str(state))
        saved = json.loads(policy_file.read_text())
        from fleetloop.presets import metaworld_specs
        obs, act = metaworld_specs("state")  # policy.json of older learners had no specs: they were state jobs
        meta = bundle_metadata(**common, kind="robot", tasks=saved["tasks"], algorithm=saved.get("algorithm"),
                               policy_factory=saved.get("policy_factory", "fleetloop.policies:mlp_policy"),
                               policy_kwargs=saved.get("policy_kwargs", {}),
                               observation_specs=saved.get("observation_specs", obs), action_specs=saved.get("action_specs", act))
    write_bundle(out, meta, _file_pieces(state / "weights" / f"v{version}.safetensors"), base_model_dir=base)
    return meta


def _cmd_policy(args: argparse.Namespace) -> int:
    from services.control.client import ApiClient
    try:
        if args.policy_cmd == "export":
            if args.state_dir:
                meta = export_from_state_dir(Path(args.state_dir), args.job_id, args.version, Path(args.out), args.model_dir)
            else:
                meta = export_over_rest(ApiClient(args.api, _key(args)), args.job_id, args.version, Path(args.out))
            print(json.dumps({"out": str(args.out), **meta}, indent=2, sort_keys=True))
        else:
            api = ApiClient(args.api, _key(args))
            method = "POST" if args.policy_cmd == "keep" else "DELETE"
            print(json.dumps(api.call(method, f"/v1/jobs/{args.job_id}/policies/{args.version}/keep"), indent=2, sort_keys=True))
    except FleetloopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def add_policy_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``fleetloop policy export|keep|unkeep``."""
    p = sub.add_parser("policy", help="export a policy version as a self-contained folder; keep versions from retention")
    ps = p.add_subparsers(dest="policy_cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("job_id", metavar="JOB")
        sp.add_argument("version", metavar="VERSION", type=int)
        sp.add_argument("--api", default=os.environ.get("FLEETLOOP_API", "http://127.0.0.1:8000"), help="control plane URL")
        sp.add_argument("--api-key", "--key", dest="api_key", default=None,
                        help="API key (default $FLEETLOOP_API_KEY or runs/controlplane/admin.key)")
        sp.set_defaults(func=_cmd_policy)

    ex = ps.add_parser("export", help="write OUT: model.safetensors + fleetloop-policy.json (LLM jobs: a Hugging Face "
                                      "folder too), downloaded over REST or read from --state-dir")
    common(ex)
    ex.add_argument("out", metavar="OUT", help="folder to write (absent or empty)")
    ex.add_argument("--state-dir", default=None, help="offline: a learner state folder instead of the control plane")
    ex.add_argument("--model-dir", default=None, help="--state-dir of an LLM job: its base Hugging Face model folder "
                                                     "(default: the one folder under STATE/models)")
    for name, text in (("keep", "retention never deletes this version"), ("unkeep", "release a kept version")):
        common(ps.add_parser(name, help=text))
