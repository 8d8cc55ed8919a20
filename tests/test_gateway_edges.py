"""A kind the gateway has no code for, end to end: a four-task model (segmentation, depth, normal,
edges) through the embedded ONNX Runtime backend and through the real Triton server.

The gateway dispatches every task through its kind (`parsimony.tasks`): the edge map and the
boundary probabilities come back over gRPC (``TaskOutput.edges``) and HTTP (``{"kind": "edges"}``)
without a line of serving code naming the kind. Two models: one built by hand (`hand_built_export`,
independent of the training side) and one trained, sparsified, compacted and exported by the real
``training.run`` (its weights then redrawn, so that every output depends on its image), both raw
graphs, so that the answers are checked against the logits (`test_gateway_final` and
`test_triton_direct` serve the edges kind from final graphs). The ``probabilities`` flag (and its older spelling ``segmentation_probabilities``) asks for the
probability maps of every kind that has them.

The Triton half needs ``.venv-triton`` (``make triton-venv``); it skips only with ``PARSIMONY_SKIP_TRITON=1``.
"""

from __future__ import annotations

import numpy as np
import pytest
from gateway_support import RunningGateway, answers, decoded, hand_built_export, image_bytes
from triton_server import randomised_copy, require_triton, start_tritonserver

from parsimony import onnxrt
from parsimony.manifest import Manifest
from parsimony.tasks import TaskSpec, kind
from parsimony.tasks.edges import EDGE
from serving.convert import convert
from serving.proto.parsimony.v1 import gateway_pb2 as pb
from serving.server.codec import preprocess
from serving.triton_config import ServingOptions
from training.run import main as run_main

SIZE = (32, 48)
TASKS = (TaskSpec("segmentation", "segmentation", 4, ("floor", "wall", "bed", "sky")), TaskSpec("depth", "depth", 1),
         TaskSpec("normal", "normal", 3), TaskSpec("edges", "edges", 1))
IMAGE = image_bytes(SIZE, seed=11)


@pytest.fixture(scope="module", params=["hand-built", "trained"])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"edges-{request.param}")
    if request.param == "hand-built":
        return hand_built_export(root / "scenes4", TASKS, SIZE, seed=5)
    tasks = ",".join(t.name for t in TASKS)
    assert run_main(["--dataset", "synthetic-scenes", "--tasks", tasks, "--encoder", "tiny", "--image-size", *map(str, SIZE),
                     "--train-samples", "16", "--val-samples", "8", "--batch-size", "8", "--epochs", "1",
                     "--out", str(root / "trained")]) == 0
    return randomised_copy(root / "trained", root / "scenes4", seed=6, raw_outputs=True)


@pytest.fixture(scope="module")
def tasks(run) -> tuple:
    return Manifest.load(run).task_infos


@pytest.fixture(scope="module")
def logits(run) -> dict[str, np.ndarray]:
    """The graph's raw outputs for `IMAGE`, from ONNX Runtime directly."""
    session = onnxrt.session(run / "model.onnx", threads=1)
    raw = session.run(None, {"image": preprocess(decoded(IMAGE))[None]})
    return {o.name: r[0] for o, r in zip(session.get_outputs(), raw, strict=True)}


@pytest.fixture(scope="module")
def embedded(run):
    with RunningGateway(run=run, models=("scenes4",)) as gw:
        yield gw


def predict(gw, **options) -> pb.PredictResponse:
    return gw.stub.Predict(pb.PredictRequest(model="scenes4", encoded_image=IMAGE, **options), timeout=30)


def test_the_edge_map_and_its_probabilities_over_grpc(embedded, logits, tasks):
    plain = predict(embedded)
    assert plain.outputs["edges"].WhichOneof("output") == "edges"
    edges = answers(plain)["edges"]
    assert set(edges) == {"edge_map"}  # probabilities only on request
    edge_map = edges["edge_map"]
    assert edge_map.dtype == np.uint8 and edge_map.shape == SIZE
    np.testing.assert_array_equal(edge_map, np.where(logits["edges"][0] >= 0, EDGE, 0))
    assert set(np.unique(edge_map)) <= {0, EDGE}

    full = answers(predict(embedded, probabilities=True, output_dtype=pb.FLOAT16))
    probabilities = full["edges"]["probabilities"]
    assert probabilities.dtype == np.float16 and probabilities.shape == SIZE
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits["edges"][0])), atol=1e-3)
    np.testing.assert_array_equal(full["edges"]["edge_map"], edge_map)
    segmentation = next(t for t in tasks if t.kind == "segmentation")
    assert full["segmentation"]["probabilities"].shape == (segmentation.channels, *SIZE)  # every kind that has them


def test_the_older_flag_spelling_asks_every_kind_too(embedded):
    old = answers(predict(embedded, segmentation_probabilities=True))
    assert "probabilities" in old["edges"] and "probabilities" in old["segmentation"]
    subset = answers(predict(embedded, tasks=["edges"], probabilities=True))
    assert set(subset) == {"edges"}


def test_the_edge_map_over_http_and_in_the_model_description(embedded, tasks):
    with embedded.http() as http:
        plain = http.post("/v1/models/scenes4:predict", content=IMAGE, headers={"Content-Type": "image/png"}).json()
        asked = http.post("/v1/models/scenes4:predict?probabilities=true", content=IMAGE,
                          headers={"Content-Type": "image/png"}).json()
        described = http.get("/v1/models/scenes4").json()
        schema = http.get("/openapi.json").json()
    edges = plain["outputs"]["edges"]
    assert edges["kind"] == "edges" and edges["probabilities"] is None
    assert edges["edge_map"]["dtype"] == "uint8" and edges["edge_map"]["shape"] == list(SIZE)
    probabilities = asked["outputs"]["edges"]["probabilities"]
    assert probabilities["dtype"] == "float32" and probabilities["shape"] == list(SIZE)
    assert [(t["name"], t["kind"]) for t in described["tasks"]] == [(t.name, t.kind) for t in tasks]
    edges_schema = schema["components"]["schemas"]["EdgesJSON"]
    assert set(edges_schema["properties"]) == {"kind", *kind("edges").field_names}
    assert edges_schema["required"] == ["kind", "edge_map"]


def test_the_same_answers_through_triton(run, embedded, tasks, tmp_path_factory):
    require_triton()
    repo = tmp_path_factory.mktemp("edges-triton") / "model_repository"
    convert(run, repo, "scenes4", ServingOptions(format="python", max_batch=4))
    server = start_tritonserver(repo, extra_args=("--disable-auto-complete-config",))
    try:
        with RunningGateway(repository=repo, backend="triton", triton_url=server.grpc_url, max_batch=4) as fronted:
            through_triton = answers(predict(fronted, probabilities=True))
    finally:
        server.stop()
    in_process = answers(predict(embedded, probabilities=True))
    assert set(through_triton) == set(in_process) == {t.name for t in tasks} == {t.name for t in TASKS}
    for task, fields in in_process.items():
        assert set(through_triton[task]) == set(fields), task
        for name, want in fields.items():
            got = through_triton[task][name]
            if want.dtype == np.uint8:  # class and edge maps: thresholds of the same logits
                assert np.mean(got != want) <= 1e-3, f"{task}.{name}"
            else:
                np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"{task}.{name}")
