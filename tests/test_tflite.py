"""TFLite bundles: litert-torch conversion, validation in LiteRT, NHWC, full-int8, inspect."""
from __future__ import annotations

import json

import pytest
import torch

import lepton_edge
from conftest import run_cli
from lepton_edge.bundle import Bundle
from lepton_edge.errors import BadInput
from lepton_edge.runtime.litert_loader import load_interpreter
from lepton_edge.runtime.preprocess import preprocess


def test_rpi4_default_is_full_int8_tflite_nhwc(rpi4_bundle, fashion):
    m = rpi4_bundle.manifest
    assert (m.format, m.precision, m.model_file) == ("tflite", "int8", "model.tflite")
    spec = m.inputs[0]
    assert spec.layout == "NHWC" and spec.shape == [1, 28, 28, 1]
    assert spec.dtype == "float32" and m.outputs[0].dtype == "float32"  # int8 body, float interface
    info = json.loads(run_cli("inspect", str(rpi4_bundle.bundle.model_path), "--json").stdout)
    assert info["ops"]["QUANTIZE"] >= 1 and info["ops"]["DEQUANTIZE"] >= 1 and info["precision"] == "int8"
    v = m.validation
    assert v["top1_agreement"] >= 0.99 and v["accuracy_drop_pp"] <= 0.5 and v["eval_samples"] == 3000
    assert m.compression["size_vs_fp32"] < 0.35
    # NNCF's PT2E path, PT2E and the LiteRT quantizer are all tried; the one that validates best is kept.
    q = m.compression["quantization"]
    assert [a["recipe"] for a in q["attempts"]] == ["nncf-default", "s8-minmax", "s8-minmax-litert"]
    best = max((a for a in q["attempts"] if a["passed"]), key=lambda a: a["score"])
    assert q["recipe"] == best["recipe"] and v["top1_agreement"] == best["top1_agreement"]
    # A third party runs it from the manifest alone.
    x, y = fashion
    assert abs(_manifest_only_accuracy(rpi4_bundle.bundle, x[6000:6500], y[6000:6500]) - v["accuracy_artifact"]) < 0.03


def test_int8_file_stores_repeated_quantization_vectors_once(rpi4_bundle, tmp_path):
    """Per-channel zero points (int64, all 0) are shared between tensors of the same channel count;
    written out the stock way the same model is larger by about that much and computes the same."""
    import numpy as np
    from ai_edge_litert.tools import flatbuffer_utils as fu

    path = rpi4_bundle.bundle.model_path
    data = path.read_bytes()
    model = fu.convert_bytearray_to_object(bytearray(data))
    zps = [t.quantization.zeroPoint for t in model.subgraphs[0].tensors
           if t.quantization is not None and t.quantization.zeroPoint is not None and len(t.quantization.zeroPoint) > 1]
    assert len(zps) >= 4 and all(not z.any() for z in zps)  # symmetric per-channel: all zero
    distinct = {len(z) for z in zps}
    saved = 8 * (sum(len(z) for z in zps) - sum(distinct))
    stock = tmp_path / "stock.tflite"
    stock.write_bytes(bytes(fu.convert_object_to_bytearray(model)))
    assert stock.stat().st_size - len(data) >= 0.9 * saved > 0
    x = np.random.default_rng(1).standard_normal(rpi4_bundle.manifest.inputs[0].shape).astype(np.float32)
    outs = []
    for p in (path, stock):
        it = load_interpreter(p, 1)
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        outs.append(it.get_tensor(it.get_output_details()[0]["index"]).copy())
    assert np.array_equal(outs[0], outs[1])


def _manifest_only_accuracy(bundle, x, y) -> float:
    """Preprocess from the manifest (quantizing the frame when the input is integer), invoke, argmax."""
    spec = bundle.manifest.inputs[0]
    it = load_interpreter(bundle.model_path, 2)
    ind, outd = it.get_input_details()[0], it.get_output_details()[0]
    hits = 0
    for img, label in zip(x, y):
        it.set_tensor(ind["index"], preprocess(img, spec))
        it.invoke()
        hits += int(it.get_tensor(outd["index"]).argmax() == label)
    return hits / len(y)


def test_int8_io_for_integer_only_accelerators(tmp_path, fashion):
    r = run_cli("export", "zoo:fashion-cnn", "--target", "rpi4", "--int8-io", "--eval-limit", "1000",
                "-o", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr[-1500:]
    b = Bundle.load(json.loads(r.stdout)["bundle"])
    spec = b.manifest.inputs[0]
    assert spec.dtype == "int8" and spec.quantization["scale"] > 0 and b.manifest.outputs[0].dtype == "int8"
    x, y = fashion
    acc = _manifest_only_accuracy(b, x[6000:6300], y[6000:6300])
    assert abs(acc - b.manifest.validation["accuracy_artifact"]) < 0.04
    r = run_cli("export", "zoo:fashion-cnn", "--target", "x86-cpu", "--int8-io", "-o", str(tmp_path))
    assert r.returncode == 2 and "--int8-io" in r.stderr


def test_fp32_fp16_and_nchw(tmp_path, tflite_nchw_bundle):
    fp32 = tflite_nchw_bundle
    fp16 = lepton_edge.export("zoo:fashion-cnn", target="x86-cpu", format="tflite", out=tmp_path, eval_limit=1000,
                              precision="fp16", layout="NHWC")
    assert fp32.manifest.inputs[0].layout == "NCHW" and fp16.manifest.inputs[0].layout == "NHWC"
    assert fp32.manifest.validation["top1_agreement"] == 1.0
    assert fp16.manifest.validation["top1_agreement"] >= 0.995
    assert fp16.report["bytes"] < 0.6 * fp32.report["bytes"]
    info = json.loads(run_cli("inspect", str(fp16.bundle.model_path), "--json").stdout)
    assert info["precision"] == "fp16" and info["ops"]["DEQUANTIZE"] > 0


def test_inspect_tflite(rpi4_bundle):
    r = run_cli("inspect", str(rpi4_bundle.bundle.path), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "tflite" and info["precision"] == "int8"
    inp = info["inputs"][0]
    assert inp["dtype"] == "float32" and inp["layout"] == "NHWC" and inp["shape"] == [1, 28, 28, 1]
    assert info["ops"]["CONV_2D"] >= 2 and info["custom_ops"] == []
    assert info["xnnpack"]["applied"] is True


def _with_custom_op(src, dst, name="LeptonTestOp"):
    """A .tflite whose first operator is replaced by a custom op the interpreter does not have."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fu

    model = fu.read_model(str(src))
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode = name
    code.version = 1
    model.operatorCodes.append(code)
    op = model.subgraphs[0].operators[0]
    op.opcodeIndex = len(model.operatorCodes) - 1
    op.builtinOptionsType, op.builtinOptions = 0, None
    fu.write_model(model, str(dst))


def test_custom_op_and_truncated_files(rpi4_bundle, tmp_path):
    custom = tmp_path / "custom.tflite"
    _with_custom_op(rpi4_bundle.bundle.model_path, custom)
    info = json.loads(run_cli("inspect", str(custom), "--json").stdout)
    assert info["custom_ops"] == ["LeptonTestOp"] and "LeptonTestOp" in info["xnnpack"]["error"]
    with pytest.raises(BadInput, match="custom op 'LeptonTestOp'"):
        load_interpreter(custom)
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(rpi4_bundle.bundle.model_path.read_bytes()[:5000])
    r = run_cli("inspect", str(cut))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cut.tflite" in r.stderr
    with pytest.raises(BadInput):
        load_interpreter(cut)
    (tmp_path / "head.tflite").write_bytes(b"abc")
    r = run_cli("inspect", str(tmp_path / "head.tflite"))
    assert r.returncode == 2 and "not a TFLite model" in r.stderr


def test_unlowerable_op_names_op_and_layer(tmp_path):
    class Head(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[1]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = torch.nn.Conv2d(1, 1, 1), Head()

        def forward(self, x):
            return self.head(self.conv(x)).flatten(1)

    with pytest.raises(BadInput, match=r"aten\._linalg_svd.* in layer 'head'"):
        lepton_edge.export(Net(), target="rpi4", precision="fp32", example_input=torch.zeros(1, 1, 8, 8),
                           out=tmp_path, name="svd")
    assert not any(tmp_path.iterdir())


def test_onnx_input_for_a_tflite_target_stays_onnx(tmp_path, int8_bundle):
    """(A float ONNX file for fp32: an int8 one is refused for fp32, `_quantized_already`.)"""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 26 * 26, 10)).eval()
    src = tmp_path / "float.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(src), dynamo=False)
    r = lepton_edge.export(str(src), target="rpi4", precision="fp32", out=tmp_path / "out")
    assert r.manifest.format == "onnx" and r.manifest.precision == "fp32"
    with pytest.raises(BadInput, match="--format onnx"):
        lepton_edge.export(str(int8_bundle.bundle.model_path), target="rpi4", format="tflite", out=tmp_path)


def test_int8_without_calibration_data_says_how(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    with pytest.raises(BadInput, match="--calib"):
        lepton_edge.export(model, target="rpi4", example_input=torch.zeros(1, 3, 8, 8), out=tmp_path)


def test_device_packages_have_aarch64_wheels(tmp_path):
    """The cross-compilation promise: what the rpi4 bundle needs installs on a Pi (aarch64, Python 3.11)."""
    import subprocess
    import sys

    from lepton_edge import targets

    pkgs = targets.load("rpi4").device_packages
    for need in ("ai-edge-litert", "numpy", "opencv-python-headless"):
        assert need in pkgs
    # 64-bit Raspberry Pi OS (bookworm) has glibc 2.36: every manylinux tag up to 2_36 installs there.
    # pip does not widen --platform by itself, so name them (ai-edge-litert ships manylinux_2_27).
    plats = [a for v in range(36, 16, -1) for a in ("--platform", f"manylinux_2_{v}_aarch64")]
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
                        *plats, "--python-version", "3.11", "-d", str(tmp_path),
                        *[f"{k}=={v}" for k, v in pkgs.items()]], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:]
    wheels = [p.name for p in tmp_path.glob("*.whl")]
    assert len(wheels) == len(pkgs) and all("aarch64" in w for w in wheels), wheels


def test_export_compare_table(tmp_path):
    r = run_cli("export", "zoo:fashion-cnn", "--target", "rpi4", "--compare", "--eval-limit", "500",
                "-o", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {(x["format"], x["precision"]): x for x in json.loads(r.stdout)}
    assert set(rows) == {("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("tflite", "fp16"),
                         ("tflite", "int8")}
    assert all(x["status"] == "ok" and x["latency_ms"] > 0 and x["accuracy"] > 0.8 for x in rows.values())
    assert rows["onnx", "int8"]["bytes"] < 0.4 * rows["onnx", "fp32"]["bytes"]
    assert rows["tflite", "int8"]["bytes"] < 0.4 * rows["tflite", "fp32"]["bytes"]
    assert rows["tflite", "fp16"]["bytes"] < 0.6 * rows["tflite", "fp32"]["bytes"]
    r = run_cli("export", "zoo:fashion-cnn", "--compare", "--precision", "int8", "-o", str(tmp_path))
    assert r.returncode == 2 and "--compare" in r.stderr
