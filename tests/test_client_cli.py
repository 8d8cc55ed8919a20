"""The two commands against a real gateway: every file `clients.predict` writes (decoded and checked
against the prediction: map pixels, legend colours, depth range, attribute names), its errors and
``--resize``, and `clients.load`'s report on short bounded closed- and open-loop runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from gateway_support import decoded, free_port, image_bytes
from PIL import Image
from test_client import serve_scenes_and_faces

from clients import Client, ClientError
from clients import visualize as vis
from clients.load import main as load_main
from clients.loadgen import run_load
from clients.predict import main as predict_main

SIZE = (32, 48)
SCALE = vis.scale_for(SIZE[0])
REPORT_KEYS = {"server", "protocol", "model", "mode", "concurrency", "rate_rps", "arrivals", "duration_s",
               "requests_limit", "model_version", "elapsed_s", "sent", "ok", "error_count", "errors", "dropped",
               "late", "throughput_rps", "latency_ms", "server_ms"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, exported_run, exported_faces_run):
    yield from serve_scenes_and_faces(tmp_path_factory, exported_run, exported_faces_run)


def server_args(gw, protocol: str) -> list[str]:
    return ["--server", gw.grpc_target] if protocol == "grpc" else ["--server", gw.http_url.removeprefix("http://"),
                                                                     "--http"]


def map_block(image: Image.Image, height: int, width: int) -> np.ndarray:
    """The map part of a picture, shrunk back to model pixels."""
    return np.asarray(image.convert("RGB"))[:height * SCALE:SCALE, :width * SCALE:SCALE]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_predict_writes_a_picture_per_dense_task_and_prints_stage_latencies(gw, protocol, tmp_path, capsys):
    png, jpeg = tmp_path / "room.png", tmp_path / "hall.jpg"
    png.write_bytes(image_bytes(SIZE, "PNG", seed=1))
    jpeg.write_bytes(image_bytes(SIZE, "JPEG", seed=2))
    out = tmp_path / "out"
    assert predict_main([str(png), str(jpeg), *server_args(gw, protocol), "--model", "scenes", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in ("decode", "preprocess", "queue", "inference", "postprocess", "batch 1", f"over {protocol}"):
        assert stage in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{stem}.{task}.png" for stem in ("room", "hall")
                                                           for task in ("segmentation", "depth", "normal"))
    with Client(gw.grpc_target) as client:
        info = client.get_model("scenes")
        p = client.predict("scenes", png)
    names = info.task("segmentation").class_names

    seg = Image.open(out / "room.segmentation.png")
    colours = vis.palette(len(names))
    assert seg.width > SIZE[1] * SCALE and seg.height >= SIZE[0] * SCALE  # the legend sits to the right
    np.testing.assert_array_equal(map_block(seg, *SIZE), colours[p.outputs["segmentation"]])
    legend = np.asarray(seg.convert("RGB"))[:, SIZE[1] * SCALE:].reshape(-1, 3)
    for colour in colours:  # every class has its swatch, whether or not it occurs in the image
        assert (legend == colour).all(1).any()
    assert json.loads(seg.text["classes"]) == list(names) and seg.text["scale"] == str(SCALE)

    depth = Image.open(out / "room.depth.png")
    lo, hi = float(p.outputs["depth"].min()), float(p.outputs["depth"].max())
    assert (float(depth.text["depth_min_m"]), float(depth.text["depth_max_m"])) == pytest.approx((lo, hi))
    assert f"{lo:.3g} to {hi:.3g} m" in printed and depth.width > SIZE[1] * SCALE

    normal = Image.open(out / "room.normal.png")
    assert normal.size == (SIZE[1] * SCALE, SIZE[0] * SCALE)
    want = np.round((p.outputs["normal"].transpose(1, 2, 0) + 1) * 127.5)
    np.testing.assert_allclose(map_block(normal, *SIZE), want, atol=1)


def test_predict_writes_attribute_json_named_after_the_model_attributes(gw, tmp_path, capsys):
    image = tmp_path / "face.png"
    image.write_bytes(image_bytes(SIZE, seed=3))
    assert predict_main([str(image), "--server", gw.grpc_target, "--model", "faces", "--tasks", "attributes",
                        "--out", str(tmp_path)]) == 0
    with Client(gw.http_url) as client:
        names = client.get_model("faces").task("attributes").attribute_names
        want = client.predict("faces", image, tasks=["attributes"]).outputs["attributes"]
    written = json.loads((tmp_path / "face.attributes.json").read_text())
    assert list(written) == list(names)  # in the model's order
    assert written == pytest.approx(want, abs=1e-6)
    assert not (tmp_path / "face.segmentation.png").exists()  # --tasks asked for attributes only


def test_predict_refuses_other_sizes_unless_resize(gw, tmp_path, capsys):
    big = tmp_path / "big.bmp"
    Image.fromarray(decoded(image_bytes((64, 100), seed=4))).save(big)
    args = [str(big), "--server", gw.grpc_target, "--model", "scenes", "--out", str(tmp_path / "out")]
    assert predict_main(args) == 1
    assert "pass --resize" in capsys.readouterr().err
    assert predict_main([*args, "--resize", "--tasks", "depth"]) == 0
    assert Image.open(tmp_path / "out" / "big.depth.png").height == SIZE[0] * SCALE


def test_predict_reports_server_problems_with_exit_status(gw, tmp_path, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(image_bytes(SIZE))
    assert predict_main([str(image), "--server", gw.grpc_target, "--out", str(tmp_path)]) == 1  # two models served
    assert "choose one with --model" in capsys.readouterr().err
    assert predict_main([str(image), "--server", f"127.0.0.1:{free_port()}", "--retries", "0"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert predict_main([str(image), "--server", "http://h:1", "--tls"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["predict", "missing.png"], "no such image file: missing.png"),
    (["load", "--concurrency", "0"], "concurrency must be at least 1"),
    (["load", "--rate", "-5"], "rate must be > 0"),
    (["load", "--image", "missing.png"], "no such image file: missing.png"),
])
def test_bad_arguments_are_refused_before_connecting(argv, message, capsys):
    """Exit status 2 and the reason, with no server at the address: the settings are checked first."""
    command, *rest = argv
    main = predict_main if command == "predict" else load_main
    with pytest.raises(SystemExit) as exit_:
        main([*rest, "--server", f"127.0.0.1:{free_port()}"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def check_report(r: dict) -> None:
    assert set(r) == REPORT_KEYS
    assert r["sent"] == r["ok"] + r["error_count"] == r["ok"] + sum(r["errors"].values())
    lat = r["latency_ms"]
    if r["ok"]:
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["throughput_rps"] == pytest.approx(r["ok"] / r["elapsed_s"])
        assert set(r["server_ms"]) == {"decode_ms", "preprocess_ms", "queue_ms", "inference_ms", "postprocess_ms",
                                       "total_ms", "batch_size_mean"}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_closed_loop_sends_exactly_the_requests_asked_for(gw, protocol):
    server = gw.grpc_target if protocol == "grpc" else gw.http_url
    r = run_load(server, "scenes", concurrency=4, requests=40, duration=None)
    check_report(r)
    assert (r["mode"], r["protocol"], r["model"], r["model_version"]) == ("closed", protocol, "scenes", 1)
    assert (r["sent"], r["ok"], r["errors"], r["dropped"]) == (40, 40, {}, 0)
    assert 1 <= r["server_ms"]["batch_size_mean"] <= 4


@pytest.mark.parametrize("arrivals", ["uniform", "poisson"])
def test_open_loop_keeps_to_its_rate(gw, arrivals):
    rate, duration = 40.0, 1.0
    r = run_load(gw.grpc_target, model="scenes", rate=rate, duration=duration, arrivals=arrivals, concurrency=8)
    check_report(r)
    assert (r["mode"], r["arrivals"], r["rate_rps"]) == ("open", arrivals, rate)
    arrived = r["sent"] + r["dropped"]
    if arrivals == "uniform":
        assert abs(arrived - rate * duration) <= 1
    else:  # Poisson: mean 40, standard deviation ~6.3
        assert 10 <= arrived <= rate * duration + 30
    assert r["error_count"] == 0 and r["ok"] == r["sent"] > 0


def test_failed_requests_are_counted_by_code(gw, tmp_path):
    small = tmp_path / "small.png"
    small.write_bytes(image_bytes((8, 8)))
    r = run_load(gw.http_url, "scenes", small, concurrency=2, requests=10, duration=None)
    check_report(r)
    assert (r["ok"], r["errors"], r["latency_ms"]["p50"]) == (0, {"INVALID_ARGUMENT": 10}, None)
    with pytest.raises(ClientError, match="does not serve model"):
        run_load(gw.grpc_target, model="nope", requests=1)
    with pytest.raises(ValueError, match="bound the run"):
        run_load(gw.grpc_target, model="scenes", duration=None)


def test_load_command_prints_a_table_or_json(gw, tmp_path, capsys):
    path = tmp_path / "report.json"
    assert load_main(["--server", gw.grpc_target, "--model", "faces", "-c", "2", "-d", "0.5", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    for words in ("closed loop, concurrency 2", "throughput", "p99", "server ms (median)"):
        assert words in table
    report = json.loads(path.read_text())
    check_report(report)
    assert report["duration_s"] == 0.5 and report["ok"] > 0 and report["elapsed_s"] >= 0.5
    assert load_main(["--server", gw.http_url, "--model", "scenes", "-n", "5", "--rate", "100", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    check_report(printed)
    assert printed["sent"] + printed["dropped"] == 5 and printed["mode"] == "open"


def test_commands_run_as_modules(gw, tmp_path):
    image = tmp_path / "m.png"
    image.write_bytes(image_bytes(SIZE))
    predict = subprocess.run([sys.executable, "-m", "clients.predict", str(image), "--server", gw.grpc_target,
                              "--model", "scenes", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert predict.returncode == 0, predict.stderr
    assert (tmp_path / "m.segmentation.png").is_file() and "inference" in predict.stdout
    load = subprocess.run([sys.executable, "-m", "clients.load", "--server", gw.http_url, "--model", "scenes",
                           "-n", "10", "--json"], capture_output=True, text=True, timeout=120)
    assert load.returncode == 0, load.stderr
    assert json.loads(load.stdout)["ok"] == 10
