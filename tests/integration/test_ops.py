"""Checks of ops/: Prometheus rules and their promtool tests, scrape examples, runbooks, dashboard.

promtool comes from Debian's ``prometheus`` package (``make install`` installs it); without it these
tests fail rather than skip, because CI must run them. Metric names used by rules and panels are
checked against what ``learner.metrics`` and ``actor.metrics`` really register.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from actor.metrics import ActorMetrics
from learner.metrics import LearnerMetrics

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
PROM = OPS / "prometheus"
RULES = PROM / "rules.yml"
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
DASHBOARD = OPS / "grafana" / "fleetloop-fleet.json"
RUNBOOKS = OPS / "runbooks"

# Series Prometheus itself makes for every target, allowed in expressions.
PROMETHEUS_BUILTINS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Labels a fleetloop target adds under the conventions of ops/README.md.
TARGET_LABELS = {"job", "instance", "fleetloop_component", "namespace", "pod"}
SEVERITIES = {"critical", "warning", "info"}
GRAFANA_BUILTIN_VARS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                   "and", "or", "unless", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


# -- helpers ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found on PATH: install Debian's `prometheus` package "
                    "(`make install` does, or `apt-get install prometheus`)")
    return path


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


def load_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for r in load_rules() if "alert" in r}


def recorded() -> set[str]:
    return {r["record"] for r in load_rules() if "record" in r}


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (functions, keywords, labels, numbers left out).

    A small scanner, enough for the expressions here: drop strings, label matchers, ranges and
    subqueries, grouping clauses, offsets, Grafana variables and numbers; every identifier left that
    is not followed by ``(`` (a function or an aggregation) and is not a keyword is a series name.
    """
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    s = re.sub(r"(?<![A-Za-z0-9_:])[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.group(0).lower() in PROMQL_KEYWORDS or re.match(r"\s*\(", s[m.end():]):
            continue
        names.add(m.group(0))
    return names


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(series name, label names matched on) for every ``name{...}`` selector in ``expr``."""
    s = _STRING.sub('""', expr)
    return [(m.group(1), set(_MATCHER.findall(m.group(2)))) for m in _SELECTOR.finditer(s)]


def exported() -> dict[str, set[str]]:
    """Every series name the learner and actor export -> its label names (target labels excluded)."""
    out: dict[str, set[str]] = {}
    for owner in (LearnerMetrics("job-under-test"), ActorMetrics("actor-under-test")):
        families = {f.name: f.type for f in owner.registry.collect()}
        for metric in vars(owner).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            name, labels = metric._name, set(metric._labelnames)
            kind = families[name]
            if kind == "counter":
                out[f"{name}_total"] = labels
            elif kind == "gauge":
                out[name] = labels
            elif kind == "histogram":
                out[f"{name}_bucket"] = labels | {"le"}
                out[f"{name}_sum"] = out[f"{name}_count"] = labels
            else:  # not used by our code today; fail loudly if someone adds one
                raise AssertionError(f"metric type {kind} of {name} not handled by this test")
        assert len(families) == sum(isinstance(m, MetricWrapperBase) for m in vars(owner).values())
    return out


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def data_panels(d: dict) -> list[dict]:
    flat = []
    for p in d["panels"]:
        flat.append(p)
        flat.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return [p for p in flat if p["type"] != "row"]


def dashboard_exprs(d: dict) -> list[str]:
    exprs = [t["expr"] for p in data_panels(d) for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            inner = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q)
            assert inner, f"variable {v['name']}: expected label_values(selector, label), got {q!r}"
            exprs.append(inner.group(1))
    return exprs


def rule_exprs() -> list[str]:
    return [r["expr"] for r in load_rules()]


# -- the scanner itself -----------------------------------------------------------------------------
def test_metric_name_scanner_finds_series_and_ignores_the_rest():
    expr = ('sum by (job, le) (rate(fleetloop_learner_staleness_versions_bucket{job=~"$fleetloop_job"}[$__rate_interval]))'
            ' / on (job) group_left () max by (job) (a:b:c) > 2 * avg_over_time(x_total[1h] offset 10m) or absent(up{k="v"})'
            ' and (m != m) or abs(m) == +Inf unless 1e3 - 0.5')
    assert metric_names(expr) == {"fleetloop_learner_staleness_versions_bucket", "a:b:c", "x_total", "up", "m"}
    assert selector_labels('foo{job=~"a|b", task!="x"} + bar{reason="le=1"}') == [("foo", {"job", "task"}), ("bar", {"reason"})]


# -- promtool ---------------------------------------------------------------------------------------
def test_rules_pass_promtool_check(promtool):
    res = run([promtool, "check", "rules", str(RULES)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in res.stdout


def test_promtool_unit_tests_pass(promtool):
    assert RULE_TESTS, "no promtool tests in ops/prometheus/tests"
    res = run([promtool, "test", "rules", *map(str, RULE_TESTS)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("SUCCESS") == len(RULE_TESTS), res.stdout


def _rule_tests() -> list[dict]:
    out = []
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert [str((path.parent / f).resolve()) for f in doc["rule_files"]] == [str(RULES)], path
        out.extend(doc["tests"])
    return out


def test_every_alert_has_a_firing_and_a_quiet_promtool_case():
    fired, quiet = set(), set()
    for case in _rule_tests():
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alerts())
    assert names - fired == set(), f"alerts never seen firing in a promtool test: {sorted(names - fired)}"
    assert names - quiet == set(), f"alerts never checked to stay quiet: {sorted(names - quiet)}"
    assert (fired | quiet) - names == set(), f"tests name alerts that do not exist: {sorted((fired | quiet) - names)}"


def test_every_recording_rule_has_a_promtool_expectation():
    checked = set()
    for case in _rule_tests():
        for check in case.get("promql_expr_test", []):
            if check.get("exp_samples"):
                checked |= metric_names(check["expr"])
    missing = recorded() - checked
    assert missing == set(), f"recording rules without an expected value in ops/prometheus/tests: {sorted(missing)}"


# -- metric names and labels ------------------------------------------------------------------------
def test_rules_and_panels_use_only_exported_metrics():
    known = set(exported()) | recorded() | PROMETHEUS_BUILTINS
    used_by_rules = set().union(*map(metric_names, rule_exprs()))
    used_by_panels = set().union(*map(metric_names, dashboard_exprs(dashboard())))
    assert used_by_rules - known == set(), f"rules use series no code exports: {sorted(used_by_rules - known)}"
    assert used_by_panels - known == set(), f"panels use series no code exports: {sorted(used_by_panels - known)}"
    # the scanner must see real work, or this test proves nothing
    assert {"fleetloop_learner_staleness_versions_bucket", "fleetloop_learner_actor_policy_version", "up"} <= used_by_rules
    assert {"fleetloop_learner_loss", "fleetloop_actor_spool_chunks", "fleetloop_learner_policy_version"} <= used_by_panels


def test_label_matchers_name_labels_the_series_have():
    labels = exported()
    for expr in rule_exprs() + dashboard_exprs(dashboard()):
        for name, matched in selector_labels(expr):
            if name in labels:
                unknown = matched - labels[name] - TARGET_LABELS
                assert not unknown, f"{name} has no label(s) {sorted(unknown)} (in: {expr.strip()[:120]})"


def test_learner_step_sets_the_loss_gauges(tmp_path):
    """The loss panels read fleetloop_learner_loss and _task_loss: a real learner step sets them."""
    import numpy as np

    from fleetloop.codec import encode
    from fleetloop.v1 import fleetloop_pb2 as pb
    from learner.config import LearnerConfig
    from learner.core import LearnerCore

    assert exported()["fleetloop_learner_loss"] == {"job"}
    assert exported()["fleetloop_learner_task_loss"] == {"job", "task", "source"}
    core = LearnerCore(LearnerConfig(job_id="ops-loss", state_dir=tmp_path / "learner", tasks=["reach-v3"], batch_size=16))
    try:
        rng = np.random.default_rng(0)
        for seq in range(3):
            chunk = pb.EpisodeChunk(job_id="ops-loss", actor_id="arm-1", episode_id="ep-1", seq=seq, task_id="reach-v3",
                                    behavior_version=0, first_step=seq * 10)
            chunk.observations["state"].CopyFrom(encode(rng.normal(size=(10, 39)).astype(np.float32)))
            chunk.actions["action"].CopyFrom(encode(rng.uniform(-1, 1, size=(10, 4)).astype(np.float32)))
            chunk.rewards.CopyFrom(encode(np.zeros(10, np.float32)))
            chunk.interventions.CopyFrom(encode(np.ones(10, bool)))  # operator steps: trainable for HG-DAgger
            core.ingestor.ingest(chunk, 100, 0)
        out = core.train_step()
        assert out is not None and not out.get("skipped")
        reg = core.metrics.registry
        assert reg.get_sample_value("fleetloop_learner_loss", {"job": "ops-loss"}) == pytest.approx(out["loss"])
        task_loss = reg.get_sample_value("fleetloop_learner_task_loss", {"job": "ops-loss", "task": "reach-v3", "source": "online"})
        assert task_loss is not None and task_loss > 0
    finally:
        core.stop(checkpoint=False)


# -- alert metadata and runbooks ----------------------------------------------------------------
def test_alerts_have_severity_annotations_and_runbooks():
    assert len(alerts()) >= 8
    for name, rule in alerts().items():
        assert name.startswith("Fleetloop"), name
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity must be one of {SEVERITIES}"
        ann = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert ann.get(key, "").strip(), f"{name}: annotation {key} missing"
        assert ann["runbook_url"].endswith(f"ops/runbooks/{name}.md"), f"{name}: runbook_url {ann['runbook_url']}"
        book = RUNBOOKS / f"{name}.md"
        assert book.is_file(), f"{name}: {book.relative_to(ROOT)} missing"
        text = book.read_text()
        assert text.startswith(f"# {name}\n"), f"{book.name} must start with its alert name"
        for section in ("## What it means", "## Likely causes", "## What to check", "## What to do"):
            assert section in text, f"{book.name}: section {section!r} missing"


def test_no_runbook_without_an_alert():
    orphans = {p.stem for p in RUNBOOKS.glob("*.md")} - set(alerts())
    assert orphans == set(), f"runbooks for alerts that do not exist: {sorted(orphans)}"


# -- scrape configs ---------------------------------------------------------------------------------
def test_scrape_example_passes_promtool_and_keeps_the_conventions(promtool):
    path = PROM / "scrape-example.yml"
    res = run([promtool, "check", "config", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr
    jobs = yaml.safe_load(path.read_text())["scrape_configs"]
    for job in jobs:
        assert job.get("honor_labels") is True, job["job_name"]
        for sc in job["static_configs"]:
            assert sc["labels"]["fleetloop_component"] in {"learner", "robot"}
            assert sc["labels"].get("job"), f"{job['job_name']}: targets need job = the fleetloop job id"


def test_kubernetes_scrape_config_relabels_and_is_valid(promtool, tmp_path):
    """Debian's Prometheus is built without Kubernetes discovery, so promtool checks the relabeling
    of a copy whose kubernetes_sd_configs are swapped for a static target."""
    doc = yaml.safe_load((PROM / "scrape-kubernetes.yml").read_text())
    (job,) = doc["scrape_configs"]
    assert job["honor_labels"] is True
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    targets = {r.get("target_label"): r.get("source_labels") for r in job["relabel_configs"]}
    assert targets["job"] == ["__meta_kubernetes_pod_label_fleetloop_dev_job"]
    assert targets["fleetloop_component"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": ["127.0.0.1:9400"]}]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(doc))
    res = run([promtool, "check", "config", str(copy)])
    assert res.returncode == 0, res.stdout + res.stderr


# -- dashboard --------------------------------------------------------------------------------------
def test_dashboard_structure():
    d = dashboard()
    assert d["schemaVersion"] >= 38
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["fleetloop_job"]["type"] == "query"
    ids = [p["id"] for p in d["panels"]] + [c["id"] for p in d["panels"] for c in p.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    panels = data_panels(d)
    assert len(panels) >= 15
    for p in panels:
        assert p.get("datasource", {}).get("uid") == "${datasource}", f"panel {p['title']!r}: datasource"
        targets = p.get("targets", [])
        assert targets and all(t.get("expr", "").strip() for t in targets), f"panel {p['title']!r}: targets need expr"
        assert all(t.get("datasource", {}).get("uid") == "${datasource}" for t in targets), p["title"]
        assert len({t["refId"] for t in targets}) == len(targets), p["title"]
    # panels do not overlap on the 24-column grid
    cells = {}
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_dashboard_variables_are_defined():
    d = dashboard()
    defined = {v["name"] for v in d["templating"]["list"]} | GRAFANA_BUILTIN_VARS
    texts = [json.dumps(p["targets"]) for p in data_panels(d)] + [json.dumps(p["datasource"]) for p in data_panels(d)]
    texts += [json.dumps(v.get("query")) for v in d["templating"]["list"]]
    used = set().union(*(set(re.findall(r"\$\{?(\w+)", t)) for t in texts))
    assert "fleetloop_job" in used
    assert used - defined == set(), f"undefined dashboard variables: {sorted(used - defined)}"
    for p in data_panels(d):
        for t in p["targets"]:
            assert '$fleetloop_job' in t["expr"], f"panel {p['title']!r} ignores the job selector"


def test_dashboard_expressions_are_valid_promql(promtool, tmp_path):
    """promtool parses every panel expression (Grafana variables replaced by plausible values)."""
    subst = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
    rules = []
    for i, expr in enumerate(dashboard_exprs(dashboard())):
        for var, value in subst.items():
            expr = expr.replace(var, value)
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
        rules.append({"record": f"dashboard:panel_{i}:check", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = run([promtool, "check", "rules", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr
