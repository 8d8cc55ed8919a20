"""The before/after benchmarks of final graphs in their quick modes: what they measure and report
(the result's structure, and the byte counts, which are exact), never how fast anything was.

`benchmarks.final_graph` runs on the demo model at its quick size; `benchmarks.triton_gateway`
against the real Triton server (``.venv-triton``; skips only with ``PARSIMONY_SKIP_TRITON=1``).
"""

from __future__ import annotations

import json

import pytest
from triton_server import require_triton

from benchmarks import final_graph, triton_gateway
from benchmarks._final_models import GRAPHS

VARIANTS = [["float32", False], ["float32", True], ["float16", False], ["float16", True]]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("final-graph")
    page = out / "BENCHMARKS.md"
    page.write_text("# Benchmarks\n\nEarlier sections stay.\n")
    argv = ["--quick", "--models", "demo", "--json", str(out / "final.json"), "--markdown", str(page)]
    assert final_graph.main(argv) == 0
    return json.loads((out / "final.json").read_text()), page.read_text()


def test_bytes_on_each_hop(quick_run):
    (model,) = quick_run[0]["models"]
    rows = model["bytes"]
    assert [[r["output_dtype"], r["probabilities"]] for r in rows] == VARIANTS
    for row in rows:
        raw, final = row["raw"], row["final"]
        # before: every task's float32 logits whatever the call asks for; after: the answers themselves
        assert all(dtype == "float32" for dtype, _ in raw["outputs"].values())
        assert final["outputs"]["segmentation"] == ["uint8", [1, *model["image_size"]]]
        float_maps = [name for name in final["outputs"] if name.startswith(("depth", "normal"))]
        want = "float16" if row["output_dtype"] == "float16" else "float32"
        assert float_maps and all(final["outputs"][name][0] == want for name in float_maps)
        assert any("probabilities" in name for name in final["outputs"]) == row["probabilities"]
        assert final["to_triton"] < raw["to_triton"] / 3  # uint8 pixels instead of float32
        if not row["probabilities"]:
            assert final["from_triton"]["tensors"] < raw["from_triton"]["tensors"]
        for graph in GRAPHS:
            hop = row[graph]["from_triton"]
            assert hop["message"] > hop["tensors"] > 0
        # the client gets the same answer from either graph, so the same bytes
        assert final["to_client"] == raw["to_client"]


def test_timed_parts_report_each_graph(quick_run):
    result, page = quick_run
    (model,) = result["models"]
    assert [r["batch"] for r in model["ort"]] == [1, 8]
    for row in model["ort"]:
        assert row["raw_ms"] > 0 and row["final_ms"] > 0 and row["python_ms"] > 0
        assert row["met"] == (row["final_ms"] <= row["raw_ms"])
    cpu = model["cpu"]
    args = result["args"]
    for graph in GRAPHS:
        x = cpu[graph]
        assert x["requests"] == args["rounds"] * args["cpu_requests"]
        assert x["cpu_ms"] > 0 and x["forward_ms"] > 0
        assert x["own_cpu_ms"] == pytest.approx(x["cpu_ms"] - x["forward_ms"])
        assert x["beyond_noop_ms"] == pytest.approx(x["own_cpu_ms"] - cpu["noop_cpu_ms"])
        assert x["forward_cpu_ms"] > 0
        assert x["own_cpu_by_forward_cpu_ms"] == pytest.approx(x["cpu_ms"] - x["forward_cpu_ms"])
    assert cpu["noop_cpu_ms"] > 0
    assert cpu["met"] == (cpu["ratio"] <= final_graph.CPU_TARGET)
    gateway = model["gateway"]
    for graph in GRAPHS:
        x = gateway[graph]
        assert x["ort_p50_ms"] > 0 and x["gateway_p50_ms"] > 0 and x["response_bytes"] > 0
        assert x["ratio"] == pytest.approx(x["gateway_p50_ms"] / x["ort_p50_ms"])
    assert model["graphs"]["final"]["inputs"][0]["dtype"] == "uint8"
    assert model["graphs"]["raw"]["inputs"][0]["dtype"] == "float32"
    # the markdown section replaces nothing else on the page, and has a table per part
    assert page.startswith("# Benchmarks\n\nEarlier sections stay.\n")
    assert "<!-- benchmarks.final_graph:begin -->" in page and page.rstrip().endswith("<!-- benchmarks.final_graph:end -->")
    for header in ("| model | size | outputs |", "| raw graph + Python (ms) |", "**own CPU (ms)**", "| ORT p50 (ms) |"):
        assert header in page
    assert "QUICK" in page


def test_triton_gateway_quick(tmp_path):
    require_triton()
    out = tmp_path / "triton_gateway.json"
    assert triton_gateway.main(["--quick", "--no-load", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    latency = result["latency"]
    for path in triton_gateway.PATHS:
        assert latency[path]["requests"] == 2 * 50 and latency[path]["p50_ms"] > 0
    for graph in GRAPHS:
        added = latency["added"][graph]
        assert added["p50_ms"] == pytest.approx(latency[f"gateway-{graph}"]["p50_ms"] - latency[f"direct-{graph}"]["p50_ms"])
        assert latency[f"gateway-{graph}"]["server_ms"]["inference_ms"] > 0
    sizes = latency["triton_response_bytes"]
    assert sizes["final"] < sizes["raw"]  # a class map instead of logits: fewer bytes from Triton
    assert result["load"] is None
