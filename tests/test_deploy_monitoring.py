"""deploy/ monitoring: the alert rules pass `promtool check rules` and their unit tests
(deploy/k8s/base/alerts.test.yaml); every PromQL expression of the alerts, the Grafana dashboard and
the Prometheus adapter rules parses in promtool; and every metric, label and label value they use
exists in a running gateway's /metrics, whose probes the manifests also point at.

Names outside the gateway cannot be scraped here (no Triton with GPUs, no cluster): they must be on
the documented lists below, taken from Triton's metrics documentation (port 8002), kube-state-metrics
and Prometheus itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import grpc
import pytest
import yaml
from deploy_support import (
    BASE,
    DASHBOARD,
    OVERLAYS,
    adapter_rules,
    alert_rules,
    by_kind,
    container,
    every_promql,
    grafana_to_promql,
    one,
    promql_selectors,
    render,
)
from gateway_support import RunningGateway, image_bytes, publish_version
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from parsimony.wire import SERVER_FAULT_CODES
from serving.proto.parsimony.v1 import gateway_pb2 as pb

PROMTOOL = shutil.which("promtool")
TRITON_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us", "nv_gpu_utilization",
    "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes", "nv_gpu_power_usage", "nv_cpu_utilization",
}
KUBE_STATE_METRICS = {"kube_deployment_status_replicas_available", "kube_deployment_status_replicas_unavailable",
                      "kube_horizontalpodautoscaler_status_desired_replicas"}
PROMETHEUS_METRICS = {"up"}
# labels Prometheus (ServiceMonitor targets) adds to every scraped series
TARGET_LABELS = {"namespace", "pod", "service", "job", "instance", "endpoint", "container"}


@pytest.fixture
def promtool():
    if PROMTOOL is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed; .ci/run installs Debian's prometheus package")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return lambda *args, cwd: subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_alert_rules_pass_promtool_check_and_their_unit_tests(promtool, tmp_path):
    rules, = by_kind(render(OVERLAYS["gpu"]), "PrometheusRule").values()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules["spec"], sort_keys=False))
    shutil.copy(BASE / "alerts.test.yaml", tmp_path / "alerts.test.yaml")
    checked = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules([rules]))} rules found" in checked.stdout
    tested = promtool("test", "rules", "alerts.test.yaml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    tested_alerts = {t["alertname"] for case in yaml.safe_load((BASE / "alerts.test.yaml").read_text())["tests"]
                     for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert tested_alerts == {r["alert"] for r in alert_rules([rules])}, "every alert has a firing unit test"


def test_server_side_error_ratios_count_server_side_codes_only():
    """Every query that filters the error metric by ``code`` (the alert, the dashboard's ratio) selects
    exactly `parsimony.wire.SERVER_FAULT_CODES` among the gRPC status names the metric carries; the
    alert's unit test shows a burst of client errors not firing it."""
    filters = [(where, op, value) for where, expr in every_promql(render(OVERLAYS["gpu"]))
               for metric, matchers in promql_selectors(expr)[0] if metric == "parsimony_gateway_errors_total"
               for label, op, value in matchers if label == "code"]
    assert "alert ParsimonyGatewayErrorRatioHigh" in {f[0] for f in filters} and len(filters) >= 2, filters
    for where, op, value in filters:
        assert op == "=~", where
        pattern = re.compile(value)  # PromQL anchors its regular expressions at both ends
        assert {name for name in grpc.StatusCode.__members__ if pattern.fullmatch(name)} == set(SERVER_FAULT_CODES), where


def test_every_promql_expression_parses(promtool, tmp_path):
    """Dashboard, adapter and alert queries, as recording rules, through promtool's parser."""
    queries = every_promql(render(OVERLAYS["gpu"]))
    assert len(queries) > 25
    rules = [{"record": f"deploy_check:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    checked = promtool("check", "rules", "queries.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # and a broken one is refused, so the check can fail
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(
        {"groups": [{"name": "check", "rules": [{"record": "x:y", "expr": "sum by (le (rate(x[5m]))"}]}]}))
    assert promtool("check", "rules", "broken.yaml", cwd=tmp_path).returncode != 0


def test_dashboard_covers_latency_per_stage_throughput_batches_errors_and_gpu():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = [(p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy) for p in panels
             for dx in range(p["gridPos"]["w"]) for dy in range(p["gridPos"]["h"])]
    assert len(cells) == len(set(cells)), "panels overlap"
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]

    def panel_using(metric: str, grouped_by: str | None = None) -> list[str]:
        titles = []
        for p in panels:
            for t in p["targets"]:
                selectors, grouping = promql_selectors(grafana_to_promql(t["expr"]))
                if metric in {s[0] for s in selectors} and (grouped_by is None or grouped_by in grouping):
                    titles.append(p["title"])
        return titles

    assert panel_using("parsimony_gateway_stage_seconds_bucket", grouped_by="stage")
    assert panel_using("parsimony_gateway_requests_total")
    assert panel_using("parsimony_gateway_batch_size_bucket")
    assert panel_using("parsimony_gateway_errors_total", grouped_by="code")
    assert panel_using("nv_gpu_utilization")
    configmap = one(render(OVERLAYS["gpu"]), "ConfigMap", "grafana-dashboard-parsimony")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["parsimony.json"]) == dashboard


def test_autoscalers_read_metrics_the_adapter_serves():
    served = {rule["name"]["as"]: rule for rule in adapter_rules()}
    for overlay in OVERLAYS.values():
        for name, hpa in by_kind(render(overlay), "HorizontalPodAutoscaler").items():
            kinds = [m["type"] for m in hpa["spec"]["metrics"]]
            assert "Pods" in kinds, f"{name}: scales on a load metric from the adapter"
            for metric in hpa["spec"]["metrics"]:
                if metric["type"] == "Pods":
                    rule = served.get(metric["pods"]["metric"]["name"])
                    assert rule is not None, f"{name}: no adapter rule serves {metric['pods']['metric']['name']}"
                    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert {"Resource"} <= {m["type"] for m in one(render(OVERLAYS["gpu"]), "HorizontalPodAutoscaler",
                                                   "gateway")["spec"]["metrics"]}


# --- against a running gateway --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scraped(tmp_path_factory, exported_run):
    """Scrape /metrics after a successful gRPC and HTTP prediction and a refused one; also probe health."""
    repo = tmp_path_factory.mktemp("deploy-repo")
    publish_version(repo, "scenes", exported_run, 1)
    objects = render(OVERLAYS["gpu"])
    gateway = container(one(objects, "Deployment", "gateway"), "gateway")
    png = image_bytes((32, 48))
    with RunningGateway(repository=repo) as gw:
        gw.stub.Predict(pb.PredictRequest(model="scenes", encoded_image=png), timeout=30)
        with pytest.raises(grpc.RpcError):
            gw.stub.Predict(pb.PredictRequest(model="scenes", encoded_image=b"not an image"), timeout=30)
        with gw.http() as http:
            assert http.post("/v1/models/scenes:predict", content=png,
                             headers={"Content-Type": "image/png"}).status_code == 200
            probes = {p: http.get(gateway[p]["httpGet"]["path"]).status_code for p in ("startupProbe", "livenessProbe")}
            probes["/readyz"] = http.get("/readyz").status_code
            text = http.get("/metrics").text
        health = health_pb2_grpc.HealthStub(gw.channel).Check(
            health_pb2.HealthCheckRequest(service=gateway["readinessProbe"]["grpc"].get("service", "")), timeout=5)
    samples: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = samples.setdefault(sample.name, {})
            for key, value in sample.labels.items():
                labels.setdefault(key, set()).add(value)
    return samples, probes, health.status


def test_manifest_probes_answer_on_a_running_gateway(scraped):
    _, probes, health = scraped
    assert probes == {"startupProbe": 200, "livenessProbe": 200, "/readyz": 200}
    assert health == health_pb2.HealthCheckResponse.SERVING


def test_every_metric_label_and_value_queried_is_exported(scraped):
    samples, _, _ = scraped
    gateway_names = set()
    for where, expr in every_promql(render(OVERLAYS["gpu"])):
        selectors, grouping = promql_selectors(expr)
        known_labels = set(TARGET_LABELS) | {"le"}
        for metric, matchers in selectors:
            if not metric.startswith("parsimony_gateway_"):
                assert metric in TRITON_METRICS | KUBE_STATE_METRICS | PROMETHEUS_METRICS, \
                    f"{where}: {metric} is neither the gateway's nor on the documented Triton/kube-state lists"
                continue
            gateway_names.add(metric)
            assert metric in samples, f"{where}: the gateway does not export {metric}"
            exported = samples[metric]
            known_labels |= set(exported)
            for label, op, value in matchers:
                assert label in exported or label in TARGET_LABELS, f"{where}: {metric} has no label {label!r}"
                if label in exported and "$" not in value and ".*" not in value:
                    alternatives = value.split("|") if op in ("=~", "!~") else [value]
                    if label == "code":  # every gRPC status name is a valid value, seen or not
                        alternatives = [a for a in alternatives if a not in grpc.StatusCode.__members__]
                    missing = [a for a in alternatives if a not in exported[label]]
                    assert not missing, f"{where}: {metric}{{{label}}} never takes the value(s) {missing}"
        if any(m.startswith("parsimony_gateway_") for m, _ in selectors):
            assert grouping <= known_labels, f"{where}: groups by unknown labels {grouping - known_labels}"
    # the checks above did run over the gateway's metrics that matter for operations
    assert {"parsimony_gateway_stage_seconds_bucket", "parsimony_gateway_requests_total",
            "parsimony_gateway_errors_total", "parsimony_gateway_batch_size_bucket",
            "parsimony_gateway_in_flight_requests", "parsimony_gateway_backend_ready"} <= gateway_names


def test_the_name_check_would_catch_a_misspelt_metric(scraped):
    samples, _, _ = scraped
    (metric, _), = promql_selectors('sum(rate(parsimony_gateway_request_total{code="OK"}[5m]))')[0]
    assert metric not in samples
    assert "parsimony_gateway_requests_total" in samples and "OK" in samples["parsimony_gateway_requests_total"]["code"]
