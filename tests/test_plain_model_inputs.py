"""Plain third-party model files (no manifest) run as such files expect: integer inputs fed pixel codes
by TFLite's convention, 3-D inputs, classifiers with a dynamic batch, and a model that fails on every
frame stopped with one line that says why (not a traceback, not frames silently counted as corrupt).

The models are built here, each small enough to read what it was fed from its output: an input ->
(dequantize or cast) -> per-channel mean graph gives back the real values the model saw.
"""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import run_cli
from lepton_edge.pipeline import ModelFailed, Pipeline
from lepton_edge.runtime import Runtime

PIXEL_BGR = (10, 128, 250)  # RGB (250, 128, 10)
RGB = np.array([250.0, 128.0, 10.0])


def _mean_tflite(path, dtype: str, quant: tuple[float, int], shape=(1, 8, 8, 3)) -> None:
    """[1,8,8,3] `dtype` with input quantization `quant` -> DEQUANTIZE -> MEAN over H, W -> [1,3] float."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils as fu

    types = {"float32": s.TensorType.FLOAT32, "uint8": s.TensorType.UINT8, "int8": s.TensorType.INT8,
             "int32": s.TensorType.INT32}
    m = s.ModelT()
    m.version, m.buffers = 3, [s.BufferT()]

    def tensor(name, shp, t, q=None, data=None):
        tt = s.TensorT()
        tt.name, tt.shape, tt.type, tt.buffer = name, list(shp), types[t], 0
        if q:
            tt.quantization = s.QuantizationParametersT()
            tt.quantization.scale, tt.quantization.zeroPoint = [float(q[0])], [int(q[1])]
        if data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(data.tobytes(), np.uint8)
            m.buffers.append(b)
            tt.buffer = len(m.buffers) - 1
        return tt

    m.operatorCodes = []
    for op in (s.BuiltinOperator.DEQUANTIZE, s.BuiltinOperator.MEAN):
        oc = s.OperatorCodeT()
        oc.builtinCode = oc.deprecatedBuiltinCode = op
        oc.version = 1
        m.operatorCodes.append(oc)
    deq, mean = s.OperatorT(), s.OperatorT()
    deq.opcodeIndex, deq.inputs, deq.outputs = 0, [0], [1]
    mean.opcodeIndex, mean.inputs, mean.outputs = 1, [1, 2], [3]
    mean.builtinOptionsType, mean.builtinOptions = s.BuiltinOptions.ReducerOptions, s.ReducerOptionsT()
    mean.builtinOptions.keepDims = False
    g = s.SubGraphT()
    g.name, g.inputs, g.outputs, g.operators = "main", [0], [3], [deq, mean]
    g.tensors = [tensor("x", shape, dtype, quant), tensor("real", shape, "float32"),
                 tensor("axes", [2], "int32", data=np.array([1, 2], np.int32)), tensor("y", [1, shape[-1]], "float32")]
    m.subgraphs = [g]
    path.write_bytes(bytes(fu.convert_object_to_bytearray(m)))


def _mean_onnx(path, elem: int, shape: list, axes: list[int], out_shape: list, extra: list | None = None) -> None:
    """input (`elem` type) -> Cast to float -> ReduceMean over `axes` [-> extra nodes]."""
    nodes = [helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f"], ["y" if not extra else "m"], axes=axes, keepdims=0), *(extra or [])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))


def _solid(tmp_path, n: int = 3):
    folder = tmp_path / "solid"
    folder.mkdir()
    for i in range(n):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((20, 30, 3), PIXEL_BGR, np.uint8))
    return np.full((20, 30, 3), PIXEL_BGR, np.uint8), folder


def test_integer_inputs_take_pixel_codes_as_tflite_files_expect(tmp_path):
    """A quantized uint8 input takes the raw pixel bytes, an int8 one pixel - 128, whatever the input's
    scale and zero point (they say what the codes mean to the model): fed pixels / 255 quantized with
    those parameters, a (1/128, 128) input saw 0.98 for every bright pixel, and a (1, -128) one saw
    0 or 1. Unquantized integer inputs get the same codes (int8 was wrapped around, int64 truncated
    to 0). Given mean/std, a quantized input is normalised as a float one and its quantization encodes that."""
    frame, _ = _solid(tmp_path)
    cases = {  # file -> (what the model must see, channel by channel)
        "u8q.tflite": ((RGB - 128) / 128, lambda p: _mean_tflite(p, "uint8", (1 / 128, 128))),
        "i8q.tflite": (RGB, lambda p: _mean_tflite(p, "int8", (1.0, -128))),
        "i8q01.tflite": (RGB / 255, lambda p: _mean_tflite(p, "int8", (1 / 255, -128))),
        "i8.onnx": (RGB - 128, lambda p: _mean_onnx(p, TensorProto.INT8, [1, 8, 8, 3], [1, 2], [1, 3])),
        "i64.onnx": (RGB, lambda p: _mean_onnx(p, TensorProto.INT64, [1, 3, 8, 8], [2, 3], [1, 3])),
        "u8.onnx": (RGB, lambda p: _mean_onnx(p, TensorProto.UINT8, [1, 8, 8, 3], [1, 2], [1, 3])),
        "u16.onnx": (RGB, lambda p: _mean_onnx(p, TensorProto.UINT16, [1, 3, 8, 8], [2, 3], [1, 3])),
    }
    for name, (want, make) in cases.items():
        make(tmp_path / name)
        out = Runtime.load(tmp_path / name, task="raw").predict(frame)
        np.testing.assert_allclose(np.ravel(out[0]), want, atol=1 / 128 + 1e-6, err_msg=name)
    rt = Runtime.load(tmp_path / "u8q.tflite", task="raw", input_spec="mean=0.5;std=0.5")
    np.testing.assert_allclose(np.ravel(rt.predict(frame)[0]), (RGB / 255 - 0.5) / 0.5, atol=1 / 64)


def test_a_run_time_limit_on_litert_is_applied(tmp_path):
    """`run --max-run-s` (and agent.toml's max_run_s) on a .tflite model: LiteRT cannot stop an invoke once
    started, and the limit used to vanish without a word (later: a warning that the model ran unlimited,
    and a WHILE loop that never ends held `run` for good). The limit applies now (past it the process ends
    with one line: runtime/hard_stop.py, tests/test_hostile_onnx_files.py), so nothing is said."""
    frame, folder = _solid(tmp_path)
    _mean_tflite(tmp_path / "m.tflite", "uint8", (1 / 128, 128))
    rt = Runtime.load(tmp_path / "m.tflite", task="raw", max_run_s=5)
    assert not [w for w in rt.warnings if "max_run_s" in w] and rt.backend.max_run_s == 5
    assert Runtime.load(tmp_path / "m.tflite", task="raw").backend.max_run_s == 120
    r = run_cli("run", str(tmp_path / "m.tflite"), "--source", str(folder), "--no-show", "--max-run-s", "5",
                "--task", "raw", timeout=120)
    assert r.returncode == 0 and "time limit" not in r.stderr, r.stderr[-1500:]


def test_three_d_inputs_run_and_a_dynamic_batch_classifier_is_a_classifier(tmp_path):
    """[1,8,8] (a Keras-MNIST-style gray input) and [3,8,8] (CHW without batch) are fed the frame's tensor
    without its batch dim: they were refused, blaming a manifest a plain file does not have. One [N,10]
    output is a classifier's, as [1,10] is ('N' counted as a dimension made it raw)."""
    frame, _ = _solid(tmp_path)
    gray = 0.299 * 250 + 0.587 * 128 + 0.114 * 10  # OpenCV's BGR -> gray
    _mean_onnx(tmp_path / "gray.onnx", TensorProto.FLOAT, [1, 8, 8], [1, 2], [1])
    _mean_onnx(tmp_path / "chw.onnx", TensorProto.FLOAT, [3, 8, 8], [1, 2], [3])
    np.testing.assert_allclose(Runtime.load(tmp_path / "gray.onnx", task="raw").predict(frame)[0], [gray / 255],
                               atol=1 / 255)
    np.testing.assert_allclose(Runtime.load(tmp_path / "chw.onnx", task="raw").predict(frame)[0], RGB / 255, atol=1e-5)
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 10], np.linspace(-1, 1, 30, dtype=np.float32))
    _mean_onnx(tmp_path / "cls.onnx", TensorProto.FLOAT, ["N", 3, 8, 8], [2, 3], ["N", 10],
               [helper.make_node("MatMul", ["m", "w"], ["y"])])
    m = onnx.load(str(tmp_path / "cls.onnx"))
    m.graph.initializer.append(w)
    onnx.save(m, str(tmp_path / "cls.onnx"))
    rt = Runtime.load(tmp_path / "cls.onnx")
    assert rt.task == "classify" and len(rt.predict(frame)) == 5
    # with a fixed input batch, a dynamic leading output dim counts something (['num_dets', 6]): not a batch
    g = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
                           helper.make_node("NonZero", ["m"], ["nz"]), helper.make_node("Transpose", ["nz"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, ["num", 2])])
    dets = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    dets.ir_version = 8
    onnx.save(dets, str(tmp_path / "dets.onnx"))
    assert Runtime.load(tmp_path / "dets.onnx").task == "raw"


def _needs_64_pixels(path) -> None:
    """[1,3,H,W] -> Reshape to [1,3,64]: runs only where H*W == 64 (as PP-OCR's recogniser runs only
    48 pixels high), so at the default 224x224 every frame fails in the engine."""
    shape = helper.make_tensor("s", TensorProto.INT64, [3], [1, 3, 64])
    g = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 64])], [shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))


def test_a_model_failing_on_every_frame_stops_with_one_line(tmp_path):
    """Inference failing on every frame (an input size the model cannot take) was a traceback in `run`
    and `bench`; postprocessing failing (outputs no detector head reads) was every frame counted as
    corrupt, then 'no frame could be read'. Now both stop after a few frames with one line: the stage,
    the error, what to try. The right size runs."""
    _, folder = _solid(tmp_path, n=6)
    _needs_64_pixels(tmp_path / "m.onnx")
    r = run_cli("run", str(tmp_path / "m.onnx"), "--source", str(folder), "--no-show")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert "inference failed on 3 frames in a row" in line and "--input-spec size=HxW" in line, line
    r = run_cli("bench", str(tmp_path / "m.onnx"), "--runs", "3", "--warmup", "0", "--json")
    (row,) = json.loads(r.stdout)
    assert "inference failed" in row["error"] and "Traceback" not in r.stderr, (row, r.stderr[-2000:])
    _mean_onnx(tmp_path / "mean.onnx", TensorProto.FLOAT, [1, 3, 8, 8], [2, 3], [1, 3])
    r = run_cli("run", str(tmp_path / "mean.onnx"), "--source", str(folder), "--no-show", "--task", "detect")
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and "postprocessing failed" in line and "--task raw" in line, line
    r = run_cli("run", str(tmp_path / "m.onnx"), "--source", str(folder), "--no-show", "--input-spec", "size=8x8",
                "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["frames"] == 6, r.stderr[-2000:]


def test_a_model_failing_after_frames_went_through_stops_only_after_a_long_run(tmp_path):
    """Once frames have gone through, a failing frame is counted (a device keeps running through odd
    frames); FAILS_IN_A_ROW in a row stop the pipeline: the agent reports and restarts it."""
    from lepton_edge import pipeline as pl

    frame, folder = _solid(tmp_path, n=pl.FAILS_IN_A_ROW + 10)
    _mean_onnx(tmp_path / "m.onnx", TensorProto.FLOAT, [1, 3, 8, 8], [2, 3], [1, 3])
    rt = Runtime.load(tmp_path / "m.onnx", task="raw")
    real, calls = rt.infer, []

    def flaky(x):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("device lost")
        return real(x)

    rt.infer = flaky
    pipe = Pipeline(str(folder), rt)
    got = []
    with pytest.raises(ModelFailed, match=f"inference failed on {pl.FAILS_IN_A_ROW} frames in a row: device lost"):
        for res in pipe:
            got.append(res)
    assert len(got) == 5 and pipe.bad_frames == pl.FAILS_IN_A_ROW
    assert pipe.failed_since_swap == pl.FAILS_IN_A_ROW and "device lost" in pipe.last_failure
    pipe.swap(Runtime.load(tmp_path / "m.onnx", task="raw"))  # a deploy: the new model starts afresh
    assert (pipe.failed_since_swap, pipe.last_failure, pipe._through, pipe._in_a_row) == (0, None, 0, 0)


def test_a_frame_the_old_model_finishes_after_a_swap_is_not_the_new_models(tmp_path):
    """A swap (a deploy) while the old model runs a frame: that frame counted as the new model's first
    success, so a new model failing on every frame ran FAILS_IN_A_ROW (100) frames, not FAILS_BEFORE_FIRST
    (3), before its failure ended the pipeline (a CI run's deploy health check saw 97 failed frames, not the
    pipeline's failure), and the old model's time went into the new one's health-check probe."""
    from lepton_edge import pipeline as pl

    frame, folder = _solid(tmp_path, n=40)
    _mean_onnx(tmp_path / "m.onnx", TensorProto.FLOAT, [1, 3, 8, 8], [2, 3], [1, 3])
    old, new = Runtime.load(tmp_path / "m.onnx", task="raw"), Runtime.load(tmp_path / "m.onnx", task="raw")
    real = old.infer

    def broken(x):
        raise RuntimeError("broken model")

    new.infer = broken
    pipe = Pipeline(str(folder), old)

    def swapped_mid_run(x):  # the deploy swaps the new model in while this frame is in the old one
        y = real(x)
        if pipe.runtime is old:
            pipe.swap(new)
        return y

    old.infer = swapped_mid_run
    got = []
    with pytest.raises(ModelFailed, match=f"on {pl.FAILS_BEFORE_FIRST} frames in a row, every frame so far"):
        for res in pipe:
            got.append(res)
    assert len(got) == 1 and pipe.probe == [] and pipe.failed_since_swap == pl.FAILS_BEFORE_FIRST


def test_odd_files_are_one_line_errors(tmp_path):
    """A FIFO named like a model made `inspect` wait forever; names with Rich markup ('a[/]b') raised
    MarkupError; a bundle whose manifest.json is a directory, or lists no inputs, gave tracebacks."""
    fifo = tmp_path / "pipe.tflite"
    os.mkfifo(fifo)
    r = run_cli("inspect", str(fifo), timeout=30)
    assert r.returncode == 2 and "not a regular file" in r.stderr
    (tmp_path / "a[red]b[").mkdir()
    odd = tmp_path / "a[red]b[" / "]c.onnx"  # the path reads a[red]b[/]c.onnx
    _mean_onnx(odd, TensorProto.FLOAT, [1, 3, 8, 8], [2, 3], [1, 3])
    r = run_cli("inspect", str(odd))
    assert r.returncode == 0 and "a[red]b[/]c.onnx" in r.stdout, r.stderr[-2000:]
    r = run_cli("run", str(odd), "--source", str(tmp_path / "no[/]such"), "--no-show")
    assert r.returncode == 2 and "no[/]such" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    for name, manifest in [("dir", None), ("noinputs", {"inputs": []})]:
        b = tmp_path / name
        b.mkdir()
        if manifest is None:
            (b / "manifest.json").mkdir()
        else:
            (b / "manifest.json").write_text(json.dumps({"name": "x", "created": "now", "target": {"id": "x"},
                                                         "format": "onnx", "precision": "fp32",
                                                         "model_file": "m.onnx", "outputs": [], **manifest}))
        for verb in (("inspect", str(b)), ("run", str(b), "--source", str(tmp_path), "--no-show")):
            r = run_cli(*verb)
            assert r.returncode == 2 and "Traceback" not in r.stderr, (name, verb, r.stderr[-2000:])


def test_a_tflite_file_named_otherwise_is_inspected_as_run_finds_it(tmp_path):
    """`run` knew a TFLite file without its suffix (a cache entry, `model.bin`) by its FlatBuffer
    identifier; `inspect` refused it as "'' files". A file that is neither stays one line."""
    _mean_tflite(tmp_path / "m.tflite", "uint8", (1 / 128, 128))
    (tmp_path / "m.tflite").rename(tmp_path / "model.bin")
    r = run_cli("inspect", str(tmp_path / "model.bin"), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    assert info["format"] == "tflite" and info["inputs"][0]["dtype"] == "uint8"
    (tmp_path / "junk.bin").write_bytes(b"abcdefghij")
    r = run_cli("inspect", str(tmp_path / "junk.bin"))
    assert r.returncode == 2 and "cannot inspect" in r.stderr and "Traceback" not in r.stderr


def test_input_spec_overrides_a_plain_tflite_cannot_take_say_what_to_change(tmp_path):
    """Found on MediaPipe's face detector ([1,128,128,3] NHWC float): `run --input-spec layout=NCHW` was told
    its 128 rows were channels a camera cannot give and to pass --calib (an `export` flag), and
    `--input-spec size=256x256` on its fixed input blamed "the manifest's input shape" of a file that has no
    manifest. Each is one line that names the override to change."""
    _mean_tflite(tmp_path / "m.tflite", "uint8", (1 / 128, 128), shape=(1, 16, 16, 3))
    _, folder = _solid(tmp_path)
    r = run_cli("run", str(tmp_path / "m.tflite"), "--source", str(folder), "--no-show", "--input-spec", "layout=NCHW")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "set the layout to NHWC" in line and "--calib" not in line, line
    r = run_cli("run", str(tmp_path / "m.tflite"), "--source", str(folder), "--no-show", "--input-spec", "size=32x32")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "manifest" not in line and "--input-spec" in line and "[1, 16, 16, 3]" in line, line


def test_a_16x8_int16_input_takes_pixels_over_255_not_pixel_codes(tmp_path):
    """TFLite's 16x8 full-integer models have an int16 input quantized symmetrically (scale ~1/32768, zero
    point 0): it encodes the float model's input. Fed the 8-bit pixel codes, as uint8 and int8 inputs are,
    the model saw 0.0076 for a pixel of 250, every frame nearly black. It takes pixels / 255, as a float input."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils as fu

    frame, _ = _solid(tmp_path)
    path = tmp_path / "i16.tflite"
    _mean_tflite(path, "uint8", (1 / 32768, 0))
    m = fu.read_model(str(path))
    m.subgraphs[0].tensors[0].type = s.TensorType.INT16
    fu.write_model(m, str(path))
    out = Runtime.load(path, task="raw").predict(frame)
    np.testing.assert_allclose(np.ravel(out[0]), RGB / 255, atol=1e-3)


def _quantize_tflite(path, scales: list[float], zero_points: list[int]) -> None:
    """float32 [1,8,8,3] -> QUANTIZE -> int8 [1,8,8,3] quantized per channel (axis 3) with these parameters."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils as fu

    m = s.ModelT()
    m.version, m.buffers = 3, [s.BufferT()]
    oc = s.OperatorCodeT()
    oc.builtinCode = oc.deprecatedBuiltinCode = s.BuiltinOperator.QUANTIZE
    oc.version = 1
    m.operatorCodes = [oc]
    x, y = s.TensorT(), s.TensorT()
    x.name, x.shape, x.type, x.buffer = "x", [1, 8, 8, 3], s.TensorType.FLOAT32, 0
    y.name, y.shape, y.type, y.buffer = "y", [1, 8, 8, 3], s.TensorType.INT8, 0
    y.quantization = s.QuantizationParametersT()
    y.quantization.scale, y.quantization.zeroPoint, y.quantization.quantizedDimension = scales, zero_points, 3
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    g = s.SubGraphT()
    g.name, g.inputs, g.outputs, g.operators, g.tensors = "main", [0], [1], [op], [x, y]
    m.subgraphs = [g]
    path.write_bytes(bytes(fu.convert_object_to_bytearray(m)))


def test_an_output_quantized_per_channel_is_dequantized_per_channel(tmp_path):
    """LiteRT reports a per-channel tensor's `quantization` as (0.0, 0): such an int8 output came back as its raw
    codes ([32, 16, 8] for 0.5 at scales 1/64, 1/32, 1/16), not the real values every consumer expects."""
    _quantize_tflite(tmp_path / "pc.tflite", [1 / 64, 1 / 32, 1 / 16], [0, 0, 0])
    rt = Runtime.load(tmp_path / "pc.tflite", task="raw")
    out = rt.infer(np.full((1, 8, 8, 3), 0.5, np.float32))[0]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 0.5)
    # inspect says so too (it showed the first channel's scale as the tensor's: scale=0.015625 zero_point=0)
    r = run_cli("inspect", str(tmp_path / "pc.tflite"), "--json")
    q = json.loads(r.stdout)["outputs"][0]["quantization"]
    assert q["per_channel"] == {"axis": 3, "channels": 3, "min_scale": 1 / 64, "max_scale": 1 / 16}
    r = run_cli("inspect", str(tmp_path / "pc.tflite"))
    assert "per-channel along axis 3: 3 scales 0.015625..0.0625" in r.stdout, r.stdout


def test_one_vector_named_as_positions_is_raw_not_a_classifier(tmp_path):
    """mediapipe's hand_recrop.tflite: one `output_crop` [1, 1, 1, 4] (two points of a crop) was guessed as a
    4-class classifier by the one-vector rule; its name says positions. The same vector named `logits` is
    a classifier's, and export's task inference reads the name the same way."""
    from lepton_edge.bundle import InputSpec
    from lepton_edge.exporters import task_metrics as tm

    shape = helper.make_tensor("s", TensorProto.INT64, [4], [1, 1, 1, 4])
    for name, task in (("output_crop", "raw"), ("logits", "classify")):
        g = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
                               helper.make_node("Concat", ["m", "m"], ["c"], axis=1, ),
                               helper.make_node("Slice", ["c", "st", "en", "ax"], ["v"]),
                               helper.make_node("Reshape", ["v", "s"], [name])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 16, 3])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 1, 1, 4])],
                              [shape, helper.make_tensor("st", TensorProto.INT64, [1], [0]),
                               helper.make_tensor("en", TensorProto.INT64, [1], [4]),
                               helper.make_tensor("ax", TensorProto.INT64, [1], [1])])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / f"{name}.onnx"))
        assert Runtime.load(tmp_path / f"{name}.onnx").task == task, name
        out = [np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)]
        assert tm.infer_task(out, [{"name": name}], InputSpec(name="x", shape=[1, 3, 48, 48])) == task, name
