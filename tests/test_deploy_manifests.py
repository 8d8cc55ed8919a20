"""deploy/: every kustomization renders (kustomize v5) and validates against the Kubernetes schemas of
the oldest and newest supported releases; custom resources get structural checks; pods are locked
down; selectors, ports, probes and flags agree with each other and with the gateway's own parser.

No cluster is needed. Metric names and PromQL are checked in test_deploy_monitoring.py.
"""

from __future__ import annotations

import copy
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    BASE,
    CUSTOM_KINDS,
    ENGINE_BUILDER,
    KUSTOMIZATIONS,
    OVERLAYS,
    TRAINING,
    by_kind,
    container,
    containers,
    flag_values,
    one,
    pod_templates,
    port_number,
    render,
    selects,
)

from serving.convert import build_parser as convert_parser
from serving.server.__main__ import build_parser as gateway_parser
from serving.server.__main__ import config_from_args
from serving.triton_config import ServingOptions

# grpc probes are GA from 1.27; autoscaling/v2 and policy/v1 are older
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")
EXPECTED_KINDS = {
    "cpu": {"Namespace", "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor", "PrometheusRule", "ConfigMap"},
    "training": {"Namespace", "PersistentVolumeClaim", "PyTorchJob"},
    "engine-builder": {"Job", "ConfigMap"},
}
EXPECTED_KINDS["gpu"] = EXPECTED_KINDS["cpu"]
SERVING_NAMESPACE = "parsimony"
REGISTRY = "registry.example.com/parsimony/"  # the placeholder every kustomization marks with EDIT
RUNS_SHELL = TRAINING / "runs-shell.yaml"


def all_rendered() -> list[tuple[str, dict]]:
    out = [(name, o) for name, path in KUSTOMIZATIONS.items() for o in render(path)]
    return out + [("runs-shell", yaml.safe_load(RUNS_SHELL.read_text()))]


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_kustomization_renders_the_expected_kinds(name):
    objects = render(KUSTOMIZATIONS[name])
    assert {o["kind"] for o in objects} == EXPECTED_KINDS[name]
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    expected_ns = "parsimony-training" if name == "training" else SERVING_NAMESPACE
    assert {o["metadata"].get("namespace") for o in namespaced} == {expected_ns}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_objects_validate_against_kubernetes_schemas(version):
    checked = 0
    for source, obj in all_rendered():
        if obj["kind"] in CUSTOM_KINDS:
            # the pods a custom resource creates are still Kubernetes pods: validate their templates
            for where, template in pod_templates(obj):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
                _validate(wrapped, version, f"{source}: {where}")
            continue
        _validate(obj, version, f"{source}: {obj['kind']}/{obj['metadata']['name']}")
        checked += 1
    assert checked > 20


def _validate(obj: dict, version: str, where: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where} is invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_schema_validation_catches_mistakes():
    """The validator is strict: a misspelt field, a wrong type and an unknown version are each refused."""
    gateway = one(render(OVERLAYS["gpu"]), "Deployment", "gateway")
    kubernetes_validate.validate(gateway, KUBERNETES_VERSIONS[0], strict=True)
    for mutate in (lambda d: d["spec"]["template"]["spec"].update(contianers=[]),
                   lambda d: d["spec"].update(replicas="two"),
                   lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"].update(port="grpc")):
        broken = copy.deepcopy(gateway)
        mutate(broken)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate({**gateway, "apiVersion": "apps/v1beta1"}, KUBERNETES_VERSIONS[1], strict=True)


# --- custom resources: minimal schemas of the fields these manifests use ------------------------------

_SELECTOR = {"type": "object", "required": ["matchLabels"], "additionalProperties": False,
             "properties": {"matchLabels": {"type": "object", "minProperties": 1,
                                            "additionalProperties": {"type": "string"}}}}
_DURATION = {"type": "string", "pattern": r"^(\d+(ms|s|m|h|d|w|y))+$"}
CUSTOM_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
        "properties": {
            "selector": _SELECTOR,
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["port"], "additionalProperties": False,
                "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                               "interval": _DURATION, "scrapeTimeout": _DURATION}}}}},
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object", "required": ["groups"], "additionalProperties": False,
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "rules"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "interval": _DURATION, "rules": {
                "type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["alert", "expr", "labels", "annotations"],
                    "additionalProperties": False,
                    "properties": {
                        "alert": {"type": "string", "pattern": "^[A-Z][A-Za-z0-9]+$"}, "expr": {"type": "string"},
                        "for": _DURATION,
                        "labels": {"type": "object", "required": ["severity"],
                                   "properties": {"severity": {"enum": ["critical", "warning", "info"]}}},
                        "annotations": {"type": "object", "required": ["summary", "description"],
                                        "additionalProperties": {"type": "string"}}}}}}}}}},
    ("kubeflow.org/v1", "PyTorchJob"): {
        "type": "object", "required": ["pytorchReplicaSpecs"], "additionalProperties": False,
        "properties": {
            "runPolicy": {"type": "object", "additionalProperties": False, "properties": {
                "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1}}},
            "nprocPerNode": {"type": "string"},
            "pytorchReplicaSpecs": {
                "type": "object", "required": ["Master"], "additionalProperties": False,
                "properties": {role: {"type": "object", "required": ["replicas", "template"],
                                      "additionalProperties": False,
                                      "properties": {"replicas": {"type": "integer", "minimum": 1},
                                                     "restartPolicy": {"enum": ["Always", "OnFailure", "Never",
                                                                                "ExitCode"]},
                                                     "template": {"type": "object"}}}
                               for role in ("Master", "Worker")}}}},
}


def test_custom_resources_have_the_fields_their_operators_read():
    seen = set()
    for source, obj in all_rendered():
        if obj["kind"] not in CUSTOM_KINDS:
            continue
        key = (obj["apiVersion"], obj["kind"])
        assert key in CUSTOM_SCHEMAS, f"{source}: no schema for {key}; add one above"
        try:
            jsonschema.validate(obj["spec"], CUSTOM_SCHEMAS[key])
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{source}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
        seen.add(obj["kind"])
    assert seen == {"ServiceMonitor", "PrometheusRule", "PyTorchJob"}


def test_service_monitors_select_services_and_name_their_ports():
    for name, path in OVERLAYS.items():
        objects = render(path)
        services = by_kind(objects, "Service")
        for monitor in by_kind(objects, "ServiceMonitor").values():
            chosen = [s for s in services.values() if selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
            assert [s["metadata"]["name"] for s in chosen] == [monitor["metadata"]["name"]], name
            ports = {p["name"] for p in chosen[0]["spec"]["ports"]}
            for endpoint in monitor["spec"]["endpoints"]:
                assert endpoint["port"] in ports, f"{name}: {monitor['metadata']['name']} scrapes port {endpoint['port']}"


# --- pods: security, resources, images ----------------------------------------------------------------


def test_every_pod_runs_as_non_root_on_a_read_only_root_without_capabilities():
    pods = 0
    for source, obj in all_rendered():
        for where, template in pod_templates(obj):
            pods += 1
            spec = template["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True, f"{source}: {where}"
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, f"{source}: {where}"
            assert spec.get("automountServiceAccountToken") is not True
            for c in containers(spec):
                ctx = c["securityContext"]
                label = f"{source}: {where}/{c['name']}"
                assert ctx["allowPrivilegeEscalation"] is False, label
                assert ctx["readOnlyRootFilesystem"] is True, label
                assert ctx["capabilities"] == {"drop": ["ALL"]}, label
                assert ctx.get("privileged") is not True and ctx.get("runAsUser", 1) != 0, label
    assert pods >= 7  # triton, gateway (x2 overlays), training master and worker, engine builder, runs-shell


def test_every_container_has_requests_and_limits_and_pinned_images():
    parsimony_images = set()
    for source, obj in all_rendered():
        for where, template in pod_templates(obj):
            for c in containers(template["spec"]):
                label = f"{source}: {where}/{c['name']}"
                res = c["resources"]
                assert {"cpu", "memory"} <= set(res["requests"]), label
                assert "memory" in res["limits"], label
                if "nvidia.com/gpu" in res["limits"] or "nvidia.com/gpu" in res["requests"]:
                    assert res["requests"].get("nvidia.com/gpu") in (None, res["limits"]["nvidia.com/gpu"]), label
                image = c["image"]
                name, _, tag = image.rpartition(":")
                assert name and tag and tag != "latest" and re.search(r"\d", tag), f"{label}: unpinned {image}"
                if "/parsimony-" in name:
                    parsimony_images.add(image)
                else:
                    assert image.startswith(("nvcr.io/nvidia/", "busybox:")), f"{label}: unexpected image {image}"
    # one registry for every image the project builds, in every kustomization (tags may differ: models move faster)
    assert {i.rpartition("/")[0] + "/" for i in parsimony_images} == {REGISTRY}
    built = {p.name.removesuffix(".Dockerfile") for p in (BASE.parent.parent / "docker").glob("*.Dockerfile")}
    used = {i.rpartition("/")[2].rpartition(":")[0].removeprefix("parsimony-") for i in parsimony_images}
    assert used == built, "every image the manifests use has a Dockerfile in deploy/docker, and the reverse"


def test_triton_and_the_engine_builder_use_the_same_nvidia_release():
    triton = container(one(render(OVERLAYS["gpu"]), "Deployment", "triton"), "triton")["image"]
    builder = container(one(render(ENGINE_BUILDER), "Job", "engine-builder"), "build-plan")["image"]
    release = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", triton).group(1)
    assert builder == f"nvcr.io/nvidia/tensorrt:{release}-py3"
    dockerfile = (BASE.parent.parent / "docker" / "engine-builder.Dockerfile").read_text()
    assert f"TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:{release}-py3" in dockerfile


def test_gpu_goes_to_triton_in_the_gpu_overlay_only():
    gpu = one(render(OVERLAYS["gpu"]), "Deployment", "triton")
    spec = gpu["spec"]["template"]["spec"]
    assert container(gpu, "triton")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] and spec["tolerations"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(list(render(OVERLAYS["cpu"])))
    assert "nvidia.com/gpu" not in yaml.safe_dump(container(gpu, "sync-models"))


# --- selectors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_selectors_match_the_pods_they_are_meant_for(overlay):
    objects = render(OVERLAYS[overlay])
    deployments = by_kind(objects, "Deployment")
    pod_labels = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
    assert set(deployments) == {"gateway", "triton"}
    for name, d in deployments.items():
        assert selects(d["spec"]["selector"], pod_labels[name])

    def selected(selector: dict) -> list[str]:
        return sorted(n for n, labels in pod_labels.items() if selects(selector, labels))

    serves = {"triton-grpc": "triton"}  # the headless Service the gateway balances its Triton calls over
    for kind in ("Service", "PodDisruptionBudget"):
        for name, obj in by_kind(objects, kind).items():
            selector = obj["spec"]["selector"]
            want = [serves.get(name, name)] if kind == "Service" else [name]
            assert selected(selector if kind == "PodDisruptionBudget" else {"matchLabels": selector}) == want, kind
    for name, hpa in by_kind(objects, "HorizontalPodAutoscaler").items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        assert "replicas" not in deployments[name]["spec"], f"{name}: the HPA owns the replica count"
        assert by_kind(objects, "PodDisruptionBudget")[name]["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    policy = one(objects, "NetworkPolicy", "triton")["spec"]
    assert selected(policy["podSelector"]) == ["triton"]
    triton = container(deployments["triton"], "triton")
    inference = {port_number(triton, "grpc"), port_number(triton, "http")}
    pod_rule, = [r for r in policy["ingress"] if "podSelector" in r["from"][0]]
    assert [selected(f["podSelector"]) for f in pod_rule["from"]] == [["gateway"]]
    assert {p["port"] for p in pod_rule["ports"]} == inference
    scrape_rule, = [r for r in policy["ingress"] if "namespaceSelector" in r["from"][0]]
    assert {p["port"] for p in scrape_rule["ports"]} == {port_number(triton, "metrics")}


# --- the gateway and Triton: flags, ports, probes -----------------------------------------------------


def gateway_config(objects):
    """The gateway container's args through the server's own parser (and the flags it did not know)."""
    args = container(one(objects, "Deployment", "gateway"), "gateway")["args"]
    parsed, unknown = gateway_parser().parse_known_args(args)
    return config_from_args(parsed), unknown, flag_values(args)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_gateway_ports_probes_and_service_agree_with_its_flags(overlay):
    objects = render(OVERLAYS[overlay])
    config, _, _ = gateway_config(objects)
    deployment = one(objects, "Deployment", "gateway")
    gateway = container(deployment, "gateway")
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {"grpc": config.grpc_port, "http": config.http_port}
    for probe in ("startupProbe", "livenessProbe"):
        get = gateway[probe]["httpGet"]
        assert (get["path"], port_number(gateway, get["port"])) == ("/healthz", config.http_port), probe
    assert port_number(gateway, gateway["readinessProbe"]["grpc"]["port"]) == config.grpc_port
    service = one(objects, "Service", "gateway")
    assert {p["name"]: port_number(gateway, p["targetPort"]) for p in service["spec"]["ports"]} == ports
    mounts = {m["mountPath"]: m for m in gateway["volumeMounts"]}
    assert str(config.repository) in mounts and mounts[str(config.repository)].get("readOnly") is True
    spec = deployment["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > config.drain_delay_s + config.grace_period_s
    # one dynamic batch fits the Triton model's max_batch_size that serving.convert writes by default
    assert config.max_batch == convert_parser().get_default("max_batch")


def test_gateway_args_parse_with_the_servers_parser():
    """Every flag the manifests give the gateway is one `python -m serving.server` accepts."""
    for overlay in OVERLAYS.values():
        config, unknown, flags = gateway_config(render(overlay))
        assert unknown == [], f"serving.server does not know {unknown}"
        assert config.backend == "triton" and config.triton_url == flags["triton-url"]
    with pytest.raises(SystemExit):  # the parser refuses what it does not know, so the check can fail
        gateway_parser().parse_args(["--repository=/models", "--triton-adress=triton:8001"])


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_gateway_reaches_triton_where_triton_listens(overlay):
    objects = render(OVERLAYS[overlay])
    _, _, flags = gateway_config(objects)
    triton_deploy = one(objects, "Deployment", "triton")
    triton = container(triton_deploy, "triton")
    assert triton["args"][0] == "tritonserver"
    triton_flags = flag_values(triton["args"][1:])
    listening = {name: int(triton_flags[f"{name}-port"]) for name in ("http", "grpc", "metrics")}
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == listening
    assert triton_flags["model-repository"] in {m["mountPath"] for m in triton["volumeMounts"]}
    ready, live = triton["readinessProbe"]["httpGet"], triton["livenessProbe"]["httpGet"]
    assert (ready["path"], port_number(triton, ready["port"])) == ("/v2/health/ready", listening["http"])
    assert (live["path"], port_number(triton, live["port"])) == ("/v2/health/live", listening["http"])
    assert flags["triton-url"].startswith("dns:///")  # resolved to every pod: calls balanced across replicas
    host, _, port = flags["triton-url"].removeprefix("dns:///").rpartition(":")
    service = one(objects, "Service", host)
    assert service["spec"].get("clusterIP") == "None"  # headless: DNS answers with the pods themselves
    target, = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert port_number(triton, target["targetPort"]) == listening["grpc"]
    assert flags["backend"] == "triton"


def test_both_serving_pods_fill_the_repository_volume_before_starting():
    objects = render(OVERLAYS["gpu"])
    claim = one(objects, "PersistentVolumeClaim", "model-repository")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"]
    dockerfile = (BASE.parent.parent / "docker" / "models.Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "/usr/local/bin/sync-models.py", "/bundle"]' in dockerfile
    for name in ("gateway", "triton"):
        deployment = one(objects, "Deployment", name)
        spec = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        init = container(deployment, "sync-models")
        assert init["image"].rpartition(":")[0].endswith("/parsimony-models")
        mount, = init["volumeMounts"]
        assert init["args"] == [mount["mountPath"]] and not mount.get("readOnly")
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "model-repository"
        assert spec["securityContext"]["fsGroup"] == 10001  # the sync step's group, so the server can read


def test_engine_builder_builds_into_the_serving_stacks_volume():
    job = one(render(ENGINE_BUILDER), "Job", "engine-builder")
    spec = job["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert job["metadata"]["namespace"] == SERVING_NAMESPACE and claims == {"model-repository"}
    build = container(job, "build-plan")
    assert "MAX_BATCH" not in {e["name"] for e in build["env"]}  # the source model's max_batch_size
    command = " ".join(container(job, "install-plan")["command"])
    assert '--max-batch "$(cat /work/max_batch)"' in command  # what the build step built the plan for
    config, _, _ = gateway_config(render(OVERLAYS["gpu"]))
    assert ServingOptions().max_batch >= config.max_batch, \
        "models converted with the default batch (and the plans built from them) must take the gateway's batches"


# --- the optional TLS component -------------------------------------------------------------------

GATEWAY_TLS = BASE.parent / "components" / "gateway-tls"


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def with_tls(request, tmp_path_factory):
    """An overlay plus the gateway-tls component, as a user adds it (kustomize takes relative paths only)."""
    import os

    folder = tmp_path_factory.mktemp(f"tls-{request.param}")
    overlay, component = (os.path.relpath(p, folder) for p in (OVERLAYS[request.param], GATEWAY_TLS))
    (folder / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {overlay}\ncomponents:\n  - {component}\n")
    return render(folder)


def test_the_tls_component_renders_valid_objects(with_tls):
    for obj in with_tls:
        if obj["kind"] not in CUSTOM_KINDS:
            for version in KUBERNETES_VERSIONS:
                _validate(obj, version, f"with gateway-tls: {obj['kind']}/{obj['metadata']['name']}")


def test_the_tls_component_mounts_the_secret_the_flags_name_and_probes_over_https(with_tls):
    deployment = one(with_tls, "Deployment", "gateway")
    gateway = container(deployment, "gateway")
    args = gateway_parser().parse_args(gateway["args"])  # every flag known to the server
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == "tls")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == "gateway-tls" and mount["readOnly"]
    assert str(args.tls_cert) == f"{mount['mountPath']}/tls.crt" and str(args.tls_key) == f"{mount['mountPath']}/tls.key"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert gateway[probe]["httpGet"]["scheme"] == "HTTPS", probe
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"  # the kubelet's gRPC probe has no TLS
    endpoint = one(with_tls, "ServiceMonitor", "gateway")["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["ca"]["secret"]["name"] == "gateway-tls"
    plain = container(one(render(OVERLAYS["cpu"]), "Deployment", "gateway"), "gateway")
    assert not any(a.startswith("--tls") for a in plain["args"])  # TLS stays optional
