"""Inputs loaded from images are held as uint8 pixels (compress/calibration.PixelInputs) and read as
the float arrays the model takes: the same values as before, a quarter of the memory."""
from __future__ import annotations

import cv2
import numpy as np

from exporters import datasets
from lepton_edge.bundle import InputSpec
from lepton_edge.compress import calibration as cal, quantize
from lepton_edge.runtime.preprocess import preprocess_batch


def _spec(layout="NCHW"):
    shape = [1, 3, 20, 16] if layout == "NCHW" else [1, 20, 16, 3]
    return InputSpec(name="x", shape=shape, layout=layout, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def _images(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (31 + i, 27, 3), dtype=np.uint8) for i in range(n)]


def test_reads_are_the_preprocessed_floats():
    for layout in ("NCHW", "NHWC"):
        spec, imgs = _spec(layout), _images()
        want = preprocess_batch(imgs, spec)
        x = cal.pixel_inputs(imgs, spec)
        assert x.pixels.dtype == np.uint8 and x.pixels.nbytes * 4 == x.nbytes == want.nbytes
        assert (x.shape, x.dtype, x.ndim, len(x)) == (want.shape, want.dtype, 4, len(want))
        np.testing.assert_array_equal(x[2:5], want[2:5])  # a slice: the batch as floats
        np.testing.assert_array_equal(x[-1], want[-1])
        np.testing.assert_array_equal(np.asarray(x), want)  # anything else: the whole array
        np.testing.assert_array_equal(np.concatenate([x, x[:1]]), np.concatenate([want, want[:1]]))
        np.testing.assert_array_equal(np.stack(list(x)), want)
        sub = cal.subset(x, 3, 7)
        assert isinstance(sub, cal.PixelInputs) and len(sub) == 4
        np.testing.assert_array_equal(sub[:], want[3:7])
        both = cal.PixelInputs.concat([sub, cal.subset(x, None, 2)])
        np.testing.assert_array_equal(np.asarray(both), np.concatenate([want[3:7], want[:2]]))


def test_views_of_pixels_match_the_float_views():
    spec, imgs = _spec(), _images(4)
    floats = datasets.views(preprocess_batch(imgs, spec), spec)
    pixels = datasets.views(cal.pixel_inputs(imgs, spec), spec)
    assert isinstance(pixels, cal.PixelInputs) and len(pixels) == len(floats) == 12
    got = np.asarray(pixels)
    np.testing.assert_array_equal(got[:8], floats[:8])  # mirrored and zoomed: exactly
    step = 0.5 / 255 / min(spec.std)  # brighter: rounded to whole pixel values
    assert np.abs(got[8:] - floats[8:]).max() <= step + 1e-6


def test_an_image_folder_is_held_as_pixels_through_the_export_data(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(20):
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    from lepton_edge.model_source import ModelSource

    src = ModelSource(name="m", kind="onnx", input_spec=_spec())
    d = datasets.gather(src, precision="int8", calib=str(tmp_path), samples=100, eval_set=None, eval_limit=None,
                        holdout=64, allow_synthetic=False)
    assert isinstance(d.calib_x, cal.PixelInputs) and isinstance(d.check_x, cal.PixelInputs)
    assert (len(d.calib_x), len(d.check_x)) == (16, 16)
    # the quantizers' feeds keep the pixels too; their readers take one batch of floats at a time
    import onnx
    from onnx import TensorProto, helper

    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 20, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, 20, 16])]))
    onnx.checker.check_model(model)
    feeds = quantize._feeds(model, d.calib_x)
    assert feeds["x"] is d.calib_x
    reader = quantize._Reader(feeds, {"x": np.float32}, batch=4)
    first = reader.get_next()["x"]
    assert isinstance(first, np.ndarray) and first.dtype == np.float32
    np.testing.assert_array_equal(first, np.asarray(d.calib_x)[:4])


def test_a_folder_with_unreadable_files_keeps_room_for_the_decoded_ones_only(tmp_path):
    """Files that do not decode are skipped, and the array written for every file is shrunk to the ones
    read: a slice of it would keep the skipped files' room for the whole export."""
    spec, imgs = _spec(), _images(4)
    for i, im in enumerate(imgs):
        cv2.imwrite(str(tmp_path / f"{i}.png"), im)
    for i in range(6):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    x = cal.load_inputs(str(tmp_path), spec).x
    assert isinstance(x, cal.PixelInputs) and len(x) == 4
    assert x.pixels.base is None and x.pixels.nbytes == 4 * 20 * 16 * 3
    np.testing.assert_array_equal(np.asarray(x), preprocess_batch(imgs, spec))


def test_labelled_folders_keep_each_label_with_its_image_when_one_does_not_decode(tmp_path):
    """An unreadable image in a class folder drops its label with it: every label after it shifted by
    one (or the counts differed), and accuracy was measured against the wrong classes."""
    spec, imgs = _spec(), _images(6)
    for i, im in enumerate(imgs):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / f"c{i % 2}" / f"{i}.png"), im)
    (tmp_path / "c0" / "1_bad.png").write_bytes(b"not a png")  # sorts between 0.png and 2.png
    s = cal.load_labelled(str(tmp_path), spec, None)
    assert len(s.x) == 6 and s.y.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(np.asarray(s.x)[:3], preprocess_batch([imgs[0], imgs[2], imgs[4]], spec))


def _header_claims(path, width: int, height: int) -> None:
    """A real 8x8 PNG whose header says width x height (CRC fixed): OpenCV raises rather than returning None."""
    import struct
    import zlib

    data = bytearray(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))


def test_an_image_whose_header_claims_too_many_pixels_is_skipped_not_a_traceback(tmp_path):
    """OpenCV raises for a header past its pixel limit (40000x40000 in 69 bytes): the calibration and
    evaluation reads ended the export with a traceback; `run` already skipped such a file."""
    spec, imgs = _spec(), _images(3)
    for i, im in enumerate(imgs):
        (tmp_path / "c0").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / "c0" / f"{i}.png"), im)
    _header_claims(tmp_path / "c0" / "1_bomb.png", 40000, 40000)
    x = cal.load_inputs(str(tmp_path / "c0"), spec).x
    np.testing.assert_array_equal(np.asarray(x), preprocess_batch(imgs, spec))
    s = cal.load_labelled(str(tmp_path), spec, None)
    assert len(s.x) == 3 and s.y.tolist() == [0, 0, 0]


def test_integer_inputs_are_fed_their_own_values():
    """Token ids (int64) were scaled by 1/255 like pixels: refused as fractions, with advice to give
    --std 1/255, which then changed every id (idx 1000 out of bounds for ids below 1000)."""
    import onnx

    from lepton_edge.model_source import _typed, default_spec

    spec = default_spec([1, 128], name="input_ids")
    for elem, dtype in ((onnx.TensorProto.INT64, "int64"), (onnx.TensorProto.INT32, "int32"),
                        (onnx.TensorProto.UINT8, "uint8")):
        typed = _typed(spec, elem)
        assert typed.dtype == dtype and typed.scale == 1.0
    assert _typed(spec, onnx.TensorProto.FLOAT16).scale == spec.scale
