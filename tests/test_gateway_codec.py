"""Decode, preprocess and postprocess of the gateway (`serving.server.codec`) and the manifest metadata."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from gateway_support import image_bytes
from PIL import Image

from parsimony.manifest import load_manifest
from parsimony.spec import ModelIOSpec, TensorSpec
from parsimony.tasks.segmentation import argmax_classes
from serving.server import codec
from serving.server.errors import Code, ImageTooLarge, InvalidInput, UnknownTask
from serving.server.metadata import ModelMetadata, TaskInfo

H, W = 8, 12


def metadata(tasks: tuple[TaskInfo, ...] | None = None) -> ModelMetadata:
    tasks = tasks or (
        TaskInfo("seg", "segmentation", 3, labels=("a", "b", "c")),
        TaskInfo("depth", "depth", 1, unit="metres"),
        TaskInfo("normal", "normal", 3),
        TaskInfo("attrs", "attributes", 2, labels=("Male", "Smiling")),
    )
    outputs = tuple(TensorSpec(t.output_name, "float32", (-1, t.channels) if t.kind == "attributes"
                               else (-1, t.channels, H, W)) for t in tasks)
    spec = ModelIOSpec(inputs=(TensorSpec("image", "float32", (-1, 3, H, W)),), outputs=outputs)
    return ModelMetadata("m", 1, H, W, 3, tasks, spec)


META = metadata()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_returns_hwc_uint8_rgb(fmt):
    data = image_bytes((H, W), fmt)
    got = codec.decode_image(data, META, max_pixels=10_000)
    assert got.shape == (H, W, 3) and got.dtype == np.uint8
    assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(data))))


@pytest.mark.parametrize("data, match", [
    (b"GIF89a not supported", "neither PNG nor JPEG"),
    (b"", "neither PNG nor JPEG"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot be decoded"),
    (image_bytes((H, W), "PNG")[:60], "cannot be decoded"),
    (image_bytes((H, W), "JPEG")[:200], "cannot be decoded"),
])
def test_undecodable_bytes_are_invalid_input(data, match):
    with pytest.raises(InvalidInput, match=match):
        codec.decode_image(data, META, max_pixels=10_000)


@pytest.mark.parametrize("size", [(H + 1, W), (H, W - 1), (W, H)])
def test_wrong_size_says_the_expected_size(size):
    with pytest.raises(InvalidInput, match=f"takes exactly {W}x{H}"):
        codec.decode_image(image_bytes(size), META, max_pixels=10_000)


def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _palette() -> Image.Image:
    return Image.open(io.BytesIO(image_bytes((H, W)))).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)


@pytest.mark.parametrize("make", [
    lambda: Image.open(io.BytesIO(image_bytes((H, W), mode="L"))),
    lambda: Image.open(io.BytesIO(image_bytes((H, W), mode="LA"))),
    lambda: Image.open(io.BytesIO(image_bytes((H, W), mode="RGBA"))),
    lambda: Image.open(io.BytesIO(image_bytes((H, W)))).convert("1"),
    _palette,
], ids=["L", "LA", "RGBA", "1", "P"])
def test_palette_grayscale_and_alpha_images_are_converted_as_pillow_does(make):
    data = _encoded(make())
    got = codec.decode_image(data, META, max_pixels=10_000)
    assert got.dtype == np.uint8 and got.shape == (H, W, 3)
    np.testing.assert_array_equal(got, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_16_bit_grayscale_keeps_its_high_byte_as_pillow_reads_16_bit_rgb():
    gray = np.random.default_rng(3).integers(0, 65536, (H, W), dtype=np.uint16)
    data = _encoded(Image.fromarray(gray))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    got = codec.decode_image(data, META, max_pixels=10_000)
    np.testing.assert_array_equal(got, np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, axis=2))


def test_cmyk_jpeg_is_refused_because_conversion_changes_its_colours():
    with pytest.raises(InvalidInput, match="mode CMYK.*colour profile"):
        codec.decode_image(image_bytes((H, W), "JPEG", mode="CMYK"), META, max_pixels=10_000)


@pytest.mark.parametrize("value, shown", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf"), (1e30, "1e+30"),
                                          (-0.5, "-0.5"), (1.0001, "1.0001")])
def test_float_tensors_must_be_finite_and_in_the_unit_range(value, shown):
    x = np.full((3, H, W), 0.5, np.float32)
    x[1, 2, 3] = value
    x[2, 5, 5] = np.nan  # a later bad element: the first one is named
    with pytest.raises(InvalidInput, match=r"element \[1, 2, 3\] \(channel, row, column\) is " + re.escape(shown) + ";"):
        codec.tensor_input(codec.RawTensor("float32", (3, H, W), x.tobytes()), META, 10_000)
    x[:] = 0.0
    x[0, 0, 0], x[2, H - 1, W - 1] = 1.0, 0.0  # the bounds themselves are fine
    codec.tensor_input(codec.RawTensor("float32", (3, H, W), x.tobytes()), META, 10_000)


def test_pixel_limit_is_checked_from_the_header():
    with pytest.raises(ImageTooLarge, match="over the server's limit of 50"):
        codec.decode_image(image_bytes((H, W)), META, max_pixels=50)


def test_uint8_hwc_tensor_matches_decoded_image_preprocessing():
    pixels = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    x = codec.tensor_input(codec.RawTensor("uint8", (H, W, 3), pixels.tobytes()), META, 10_000)
    assert x.shape == (3, H, W) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_array_equal(x, pixels.transpose(2, 0, 1).astype(np.float32) / 255)


def test_float32_chw_tensor_is_used_as_is():
    want = np.random.default_rng(1).random((3, H, W), dtype=np.float32)  # [0, 1)
    got = codec.tensor_input(codec.RawTensor("float32", (3, H, W), want.tobytes()), META, 10_000)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype, shape, nbytes, match", [
    ("float16", (3, H, W), 2 * 3 * H * W, "must be uint8"),
    ("uint8", (1, H, W, 3), H * W * 3, "must be uint8"),
    ("uint8", (H, W, 4), H * W * 4, "has 4 channel"),
    ("float32", (1, H, W), 4 * H * W, "has 1 channel"),
    ("uint8", (H + 2, W, 3), (H + 2) * W * 3, "takes exactly"),
    ("uint8", (H, W, 3), H * W * 3 - 1, "needs 288"),
])
def test_bad_tensors_are_invalid_input(dtype, shape, nbytes, match):
    with pytest.raises(InvalidInput, match=match):
        codec.tensor_input(codec.RawTensor(dtype, shape, b"\0" * nbytes), META, 10_000)


def test_tensor_pixel_limit():
    with pytest.raises(ImageTooLarge):
        codec.tensor_input(codec.RawTensor("uint8", (H, W, 3), b"\0" * (H * W * 3)), META, 10)


def test_select_tasks_keeps_model_order_and_refuses_unknown_names():
    assert [t.name for t in codec.select_tasks(META, [])] == ["seg", "depth", "normal", "attrs"]
    assert [t.name for t in codec.select_tasks(META, ["normal", "seg"])] == ["seg", "normal"]
    with pytest.raises(UnknownTask, match=r"no task 'sky'; its tasks are \['seg', 'depth', 'normal', 'attrs'\]") as e:
        codec.select_tasks(META, ["seg", "sky"])
    assert e.value.code is Code.INVALID_ARGUMENT


def test_output_dtype():
    assert codec.output_dtype("float16") == np.float16
    with pytest.raises(InvalidInput, match="choose one of"):
        codec.output_dtype("int8")


@pytest.mark.parametrize("classes", [1, 2, 7, 300])
def test_argmax_classes_matches_numpy_including_ties(classes):
    logits = np.random.default_rng(classes).random((classes, 5, 6), dtype=np.float32)
    logits[:, 0, :] = 0.5  # ties: the lowest class wins, as with argmax
    dtype = np.uint8 if classes <= 256 else np.int32
    got = argmax_classes(logits, dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, logits.argmax(axis=0))


def test_postprocess_each_kind():
    rng = np.random.default_rng(2)
    result = codec.postprocess(META.task("seg"), rng.standard_normal((3, H, W), dtype=np.float32), np.dtype("<f2"), True)
    seg = result.fields
    assert result.kind == "segmentation"
    assert seg["class_map"].dtype == np.uint8 and seg["class_map"].shape == (H, W)
    assert seg["probabilities"].dtype == np.float16 and seg["probabilities"].shape == (3, H, W)
    np.testing.assert_allclose(seg["probabilities"].astype(np.float32).sum(0), 1, atol=2e-3)
    np.testing.assert_array_equal(seg["probabilities"].argmax(0), seg["class_map"])
    assert "probabilities" not in codec.postprocess(META.task("seg"), np.zeros((3, H, W), np.float32), np.dtype("<f4"),
                                                    False).fields

    raw_depth = np.array([[[-1.0, 2.0]]], np.float32)
    assert codec.postprocess(META.task("depth"), raw_depth, np.dtype("<f4"), False).fields["depth"].tolist() == [[0.0, 2.0]]
    normal = codec.postprocess(META.task("normal"), np.ones((3, H, W), np.float32), np.dtype("<f2"), False).fields
    assert normal["normal"].shape == (3, H, W) and normal["normal"].dtype == np.float16

    attrs = codec.postprocess(META.task("attrs"), np.array([0.0, 100.0], np.float32), np.dtype("<f4"), False).fields
    assert attrs["probabilities"] == pytest.approx({"Male": 0.5, "Smiling": 1.0})


def test_metadata_from_an_exported_manifest(exported_faces_run):
    manifest = load_manifest(exported_faces_run)
    meta = ModelMetadata.from_manifest("faces", 3, manifest)
    assert (meta.name, meta.version, meta.height, meta.width, meta.channels) == ("faces", 3, 32, 48, 3)
    kinds = {t.kind for t in meta.tasks}
    assert kinds == {"segmentation", "attributes"}
    attrs = next(t for t in meta.tasks if t.kind == "attributes")
    assert attrs.attribute_names and len(attrs.attribute_names) == attrs.channels


def test_metadata_refuses_unknown_task_kinds(exported_run):
    manifest = load_manifest(exported_run).to_dict()
    manifest["tasks"][0] = {**manifest["tasks"][0], "kind": "optical_flow"}
    with pytest.raises(ValueError, match="kind 'optical_flow', which this version of parsimony does not know"):
        ModelMetadata.from_manifest("scenes", 1, manifest)
