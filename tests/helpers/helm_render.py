"""Render, lint and validate the Helm chart ``helm/fleetloop`` offline, with the Helm SDK library.

There is no ``helm`` binary on these machines; PyPI ``helm-python-sdk`` (import ``helm_python``)
binds Helm 4's Go SDK. Its ``Chart.render`` exposes no capabilities, but the C ABI's render
options (``RenderOptions`` in libhelm_c) accept ``api_versions`` and ``kube_version``, the same
knobs as ``helm template --api-versions --kube-version``: :func:`render` passes them, so templates
that branch on ``.Capabilities.APIVersions.Has`` can be rendered both ways.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "fleetloop"
KUBE_VERSION = "v1.30.0"
RELEASE, NAMESPACE = "rel", "fleet"


@lru_cache(maxsize=1)
def chart():
    """The loaded chart (one handle per test session; charts are immutable and thread-safe)."""
    import helm_python
    return helm_python.Chart.load(CHART_DIR)


def ci_values() -> dict[str, dict[str, Any]]:
    """``ci/*.yaml`` by file name (an empty file is an empty override)."""
    return {p.name: yaml.safe_load(p.read_text()) or {} for p in sorted((CHART_DIR / "ci").glob("*.yaml"))}


@dataclass
class Rendered:
    """One render: template outputs by path, and every non-empty YAML document parsed."""

    files: dict[str, str]
    docs: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for path, text in sorted(self.files.items()):
            if path.endswith("NOTES.txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc is not None:
                    self.docs.append(doc)

    @property
    def notes(self) -> str:
        return next((t for p, t in self.files.items() if p.endswith("NOTES.txt")), "")

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d.get("kind") == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}; have {self.names()}"
        return found[0]

    def names(self) -> list[str]:
        return [f"{d['kind']}/{d['metadata']['name']}" for d in self.docs]


def render(values: dict[str, Any] | None = None, *, api_versions: Iterable[str] = (), kube_version: str = KUBE_VERSION,
           name: str = RELEASE, namespace: str = NAMESPACE) -> Rendered:
    """Render offline (``lookup`` returns nothing) as an install would, with the given capabilities."""
    from helm_python import _native
    opts = {"name": name, "namespace": namespace, "is_install": True, "api_versions": list(api_versions),
            "kube_version": kube_version}
    out = _native.call_string("helm_render", chart()._raw(), json.dumps(values) if values else None, json.dumps(opts))
    return Rendered(json.loads(out))


def lint(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """``helm lint`` findings (severity 1 info, 2 warning, 3 error) for Kubernetes 1.30."""
    import helm_python
    return helm_python.lint(CHART_DIR, values, namespace=NAMESPACE, kube_version=KUBE_VERSION)


def pod_specs(docs: Iterable[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``(Kind/name, pod spec)`` of every workload (Deployment, StatefulSet, DaemonSet, Job)."""
    out = []
    for d in docs:
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
    return out


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's env entries by name (asserting names are unique)."""
    names = [e["name"] for e in container.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env names in {container['name']}: {names}"
    return {e["name"]: e for e in container.get("env", [])}


def kmock_kubeconfig(url: str, namespace: str = NAMESPACE) -> str:
    """A kubeconfig pointing at a kmock emulator (plain HTTP, dummy token)."""
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": namespace}}],
        "users": [{"name": "kmock", "user": {"token": "kmock"}}],
    })
