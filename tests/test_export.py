"""The export path end to end on real Fashion-MNIST data and real onnxruntime sessions."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lepton_edge
from conftest import run_cli
from lepton_edge.bundle import Bundle
from lepton_edge.errors import BadInput, CheckFailed
from lepton_edge.runtime.preprocess import preprocess_batch


def _accuracy(bundle: Bundle, x_raw, y) -> float:
    spec = bundle.manifest.inputs[0]
    sess = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    x = preprocess_batch(list(x_raw), spec)
    assert spec.shape[0] == 1  # exported for the device: batch 1
    logits = np.concatenate([sess.run(None, {spec.name: x[i:i + 1]})[0] for i in range(len(x))])
    return float((logits.argmax(1) == y).mean())


def test_int8_bundle_is_validated_and_described(int8_bundle, fashion):
    b, m = int8_bundle.bundle, int8_bundle.bundle.manifest
    assert m.format == "onnx" and m.precision == "int8" and m.target["id"] == "x86-cpu"
    v = m.validation
    # (labelled eval set: the accuracy drop is the main gate; the best candidate by it may agree on < 0.99)
    assert v["passed"] and v["top1_agreement"] >= 0.98 and v["accuracy_drop_pp"] <= 0.5
    assert v["eval_samples"] == 3000 and v["accuracy_reference"] > 0.8
    q = m.compression["quantization"]
    assert q["recipe"] == next(a["recipe"] for a in q["attempts"] if a.get("chosen"))  # the best, not the last
    assert m.compression["calibration"]["samples"] == 100
    assert m.compression["size_vs_fp32"] < 0.4
    assert set(m.files) == {"model.onnx", "labels.txt"} and b.labels[0] == "T-shirt/top"
    spec = m.inputs[0]
    assert (spec.color, spec.layout, spec.shape[1:]) == ("GRAY", "NCHW", [1, 28, 28])
    assert {"torch", "onnxruntime", "onnx"} <= set(m.toolchain)
    # The recorded accuracy is what a third party gets from the manifest alone on images not used above.
    x, y = fashion
    acc = _accuracy(b, x[5000:6000], y[5000:6000])
    assert abs(acc - v["accuracy_artifact"]) < 0.03


def test_tampered_bundle_is_refused(int8_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(int8_bundle.bundle.path, copy)
    Bundle.load(copy)
    with open(copy / "model.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BadInput, match="checksum mismatch for model.onnx"):
        Bundle.load(copy)
    (copy / "labels.txt").unlink()
    with pytest.raises(BadInput, match="missing"):
        Bundle.load(copy)


def test_fp16_and_fp32(tmp_path):
    r16 = lepton_edge.export("zoo:fashion-cnn", target="cuda-gpu", out=tmp_path, eval_limit=1000)
    r32 = lepton_edge.export("zoo:fashion-cnn", target="x86-cpu", precision="fp32", out=tmp_path, eval_limit=1000)
    assert r16.manifest.precision == "fp16" and r32.manifest.precision == "fp32"
    assert r16.manifest.validation["top1_agreement"] >= 0.999
    assert r32.manifest.validation["max_abs_diff"] < 1e-3
    assert r16.report["bytes"] < 0.6 * r32.report["bytes"]
    assert r32.bundle.path.name == "fashion-cnn-x86-cpu-fp32"


def test_python_module_api(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4))
    b = lepton_edge.export(model, target="x86-cpu", precision="fp32", example_input=torch.randn(1, 3, 32, 32),
                           out=tmp_path, name="tiny")
    assert b.manifest.inputs[0].shape[1:] == [3, 32, 32] and b.manifest.inputs[0].color == "RGB"
    # No example input: the target profile's input size.
    b = lepton_edge.export(model, target="x86-cpu", precision="fp32", out=tmp_path, name="tiny-default")
    assert b.manifest.inputs[0].shape == [1, 3, 224, 224]
    b = lepton_edge.export(model, target="rpi4", precision="fp32", out=tmp_path, name="tiny-default")
    assert b.manifest.inputs[0].shape == [1, 224, 224, 3] and b.manifest.format == "tflite"  # ARM: NHWC TFLite
    with pytest.raises(BadInput, match="does not accept input of shape"):
        lepton_edge.export(model, target="x86-cpu", precision="fp32", example_input=torch.randn(1, 1, 32, 32),
                           out=tmp_path, name="tiny2")
    gray = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    with pytest.raises(BadInput, match="the target's default input"):
        lepton_edge.export(gray, target="x86-cpu", precision="fp32", out=tmp_path, name="gray")


def test_torchscript_and_torch_export_files(tmp_path, fashion_folders):
    from lepton_edge import zoo

    m = zoo.get("fashion-cnn").load()
    x = torch.zeros(1, 1, 28, 28)
    torch.jit.save(torch.jit.trace(m, x), tmp_path / "cnn.pt")
    torch.export.save(torch.export.export(m, (x,)), tmp_path / "cnn.pt2")
    calib, ev = fashion_folders
    for f, shape in (("cnn.pt", ["--input-shape", "1,1,28,28"]), ("cnn.pt2", [])):  # .pt2 records its shape
        r = run_cli("export", str(tmp_path / f), "--target", "x86-cpu", *shape,
                    "--mean", "0.286", "--std", "0.353", "--calib", str(calib), "--eval", str(ev),
                    "--labels", str(_labels(tmp_path)), "-o", str(tmp_path / "out"), "--json")
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["validation"]["eval_samples"] == 600 and rep["validation"]["accuracy_reference"] > 0.8
        assert rep["validation"]["reference"].startswith("pytorch")
        assert rep["validation"]["conversion"]["max_abs_diff"] < 1e-3


def test_a_torchscript_file_named_jit_exports(tmp_path):
    """TorchScript comes named .jit too (silero-vad's wheel ships one): it was refused as an unsupported type."""
    from lepton_edge import zoo

    m = zoo.get("fashion-cnn").load()
    torch.jit.save(torch.jit.trace(m, torch.zeros(1, 1, 28, 28)), tmp_path / "cnn.jit")
    b = lepton_edge.export(tmp_path / "cnn.jit", target="x86-cpu", precision="fp32", input_shape=[1, 1, 28, 28],
                           out=tmp_path / "out")
    assert (b.path / "manifest.json").is_file() and b.manifest.inputs[0].shape == [1, 1, 28, 28]


def _labels(tmp_path):
    from lepton_edge.datasets import FASHION_LABELS

    f = tmp_path / "labels.txt"
    f.write_text("\n".join(FASHION_LABELS) + "\n")
    return f


def test_onnx_file_with_image_folders(tmp_path, fashion_folders, int8_bundle):
    """A plain ONNX file (someone else's): calibration from an image folder, accuracy from class folders."""
    from lepton_edge import zoo

    m = zoo.get("fashion-cnn").load()
    path = tmp_path / "model.onnx"
    torch.onnx.export(m, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, input_names=["image"],
                      output_names=["scores"], dynamic_axes={"image": {0: "n"}})
    calib, ev = fashion_folders
    r = run_cli("export", str(path), "--target", "rpi4", "--format", "onnx", "--calib", str(calib), "--eval", str(ev),
                "--mean", "0.286", "--std", "0.353", "--labels", str(_labels(tmp_path)),
                "-o", str(tmp_path / "out"), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["validation"]["reference"] == "onnx fp32"
    assert rep["compression"]["calibration"]["kind"] == "images"
    assert rep["validation"]["accuracy_artifact"] > 0.8
    b = Bundle.load(rep["bundle"])
    assert b.manifest.inputs[0].name == "image" and b.manifest.task == "classify"


def test_npz_and_video_calibration(tmp_path, fashion):
    import cv2

    x, y = fashion
    np.savez(tmp_path / "calib.npz", x=x[:150])
    video = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (28, 28))
    for im in x[:120]:
        w.write(cv2.cvtColor(im, cv2.COLOR_GRAY2BGR))
    w.release()
    for src, kind in ((tmp_path / "calib.npz", "array"), (video, "video")):
        r = lepton_edge.export("zoo:fashion-cnn", target="x86-cpu", calib=src, out=tmp_path / kind, eval_limit=1000)
        assert r.manifest.compression["calibration"]["kind"] == kind
        assert r.manifest.validation["accuracy_drop_pp"] <= 0.5


def test_pruning_removes_channels(tmp_path):
    r = lepton_edge.export("zoo:fashion-cnn", target="x86-cpu", precision="fp32", prune=0.5, out=tmp_path,
                           eval_limit=1000, min_agreement=0.0, max_accuracy_drop=100, max_prune_drop=100)
    p = r.manifest.compression["pruning"]
    assert p["params_after"] < 0.5 * p["params_before"] and p["macs_after"] < p["macs_before"]
    base = lepton_edge.export("zoo:fashion-cnn", target="x86-cpu", precision="fp32", out=tmp_path / "b",
                              eval_limit=1000)
    assert r.report["bytes"] < 0.5 * base.report["bytes"]
    # The ONNX graph itself has fewer channels, not masked zeros.
    import onnx

    g = onnx.load(str(r.bundle.model_path)).graph
    conv_w = [i for i in g.initializer if len(i.dims) == 4]
    assert conv_w[0].dims[0] < 32


def test_prune_with_finetune_recovers_accuracy(tmp_path):
    kw = dict(target="x86-cpu", precision="fp32", prune=0.5, eval_limit=2000, min_agreement=0.0,
              max_accuracy_drop=100, max_prune_drop=100)
    raw = lepton_edge.export("zoo:fashion-cnn", out=tmp_path / "a", **kw)
    tuned = lepton_edge.export("zoo:fashion-cnn", out=tmp_path / "b", finetune_epochs=1, **kw)
    assert tuned.manifest.compression["pruning"]["finetune_epochs"] == 1
    # The reference is the pruned (and fine-tuned) torch model; the unpruned model's accuracy is reported beside.
    before = raw.manifest.compression["pruning"]["accuracy_before"]
    assert before > 0.8 and raw.manifest.validation["top1_agreement"] > 0.99
    assert raw.manifest.validation["accuracy_reference"] < before - 0.02  # pruning half the channels costs
    assert tuned.manifest.validation["accuracy_reference"] > raw.manifest.validation["accuracy_reference"] + 0.02
    # the pruned torch model's own accuracy, measured where pruning was judged, is what fp32 keeps
    assert abs(raw.manifest.compression["pruning"]["accuracy_after"] - raw.manifest.validation["accuracy_reference"]) \
        < 0.01


def test_recipe_search_falls_back_to_float_layers(tmp_path):
    """With an agreement bar plain int8 cannot meet, the search keeps the most sensitive layers in float."""
    first = lepton_edge.export("zoo:fashion-cnn", target="x86-cpu", recipes=["u8-minmax"], out=tmp_path / "a",
                               eval_limit=2000)
    bar = first.manifest.validation["top1_agreement"] + 0.0004  # one more of the 2000 inputs must agree
    r = lepton_edge.export("zoo:fashion-cnn", target="x86-cpu", recipes=["u8-minmax", "u8-minmax-sensitive"],
                           out=tmp_path / "b", eval_limit=2000, min_agreement=bar)
    q = r.manifest.compression["quantization"]
    assert q["attempts"][0]["passed"] is False and q["attempts"][-1]["passed"] is True
    assert q["float_nodes"] and q["recipe"].startswith("u8-minmax-sensitive")
    assert r.manifest.validation["top1_agreement"] >= bar


def test_failed_gate_leaves_nothing(tmp_path):
    with pytest.raises(CheckFailed, match="failed the accuracy gate with all 1 recipes tried"):
        lepton_edge.export("zoo:fashion-cnn", target="x86-cpu", recipes=["u8-minmax"], min_agreement=1.0,
                           out=tmp_path, eval_limit=500)
    assert list(tmp_path.iterdir()) == []


def test_failed_gate_json_names_every_candidate(tmp_path):
    """`export --json` refused by the gate: exit 1, the line on stderr, and on stdout the same as JSON,
    with the best candidate's metrics and every candidate tried; nothing written."""
    r = run_cli("export", "zoo:fashion-cnn", "--target", "x86-cpu", "--recipes", "u8-minmax,s8-minmax",
                "--task", "raw", "--min-sqnr", "90", "--eval-limit", "500", "-o", str(tmp_path), "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: int8 failed the accuracy gate with all 2 recipes tried")
    rep = json.loads(r.stdout)
    assert rep["ok"] is False and rep["exit_code"] == 1 and line.endswith(rep["error"])
    assert rep["task"] == "raw" and [a["recipe"] for a in rep["attempts"]] == ["u8-minmax", "s8-minmax"]
    best = max(rep["attempts"], key=lambda a: a["metrics"]["sqnr_db"])
    assert rep["best"]["recipe"] == best["recipe"] and 10 < rep["best"]["metrics"]["sqnr_db"] < 90
    assert f"best: {best['recipe']}" in rep["error"]
    assert list(tmp_path.iterdir()) == []


def test_size_budget_fails_with_advice_and_leaves_nothing(tmp_path):
    r = run_cli("export", "zoo:fashion-cnn", "--precision", "fp32", "--max-size", "100KB", "-o", str(tmp_path),
                "--eval-limit", "500")
    assert r.returncode == 1
    assert "over the 100.00 KB budget" in r.stderr and "--precision int8" in r.stderr and "--prune" in r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_synthetic_calibration_refused_for_int8(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    with pytest.raises(BadInput, match="int8 needs calibration data"):
        lepton_edge.export(model, target="x86-cpu", example_input=torch.zeros(1, 3, 8, 8), out=tmp_path)
    r = lepton_edge.export(model, target="x86-cpu", example_input=torch.zeros(1, 3, 8, 8), out=tmp_path,
                           allow_synthetic_calibration=True, min_agreement=0.0, name="forced")
    assert r.manifest.compression["calibration"]["kind"] == "synthetic"


def test_foreign_onnx_nhwc_dynamic_two_outputs(tmp_path):
    """Someone else's ONNX: NHWC input with dynamic batch and size, two outputs, int8 from photos."""
    import cv2

    from lepton_edge.datasets import photo_crops

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 5)

        def forward(self, x):
            f = torch.relu(self.c(x.permute(0, 3, 1, 2))).mean(dim=(2, 3))
            return self.fc(f), f

    torch.manual_seed(0)
    path = tmp_path / "foreign.onnx"
    torch.onnx.export(Net().eval(), (torch.zeros(1, 64, 64, 3),), str(path), dynamo=False, input_names=["pixels"],
                      output_names=["scores", "feat"], dynamic_axes={"pixels": {0: "n", 1: "h", 2: "w"}})
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, im in enumerate(photo_crops(150, 96)):
        cv2.imwrite(str(photos / f"{i:03d}.jpg"), im)
    r = lepton_edge.export(str(path), target="x86-cpu", calib=str(photos), input_shape=[1, 128, 128, 3],
                           out=tmp_path / "out")
    m = r.manifest
    assert m.inputs[0].layout == "NHWC" and m.inputs[0].shape == [1, 128, 128, 3]  # what was validated
    assert [o.name for o in m.outputs] == ["scores", "feat"]
    assert m.validation["agreement_inputs"] == "held-out calibration data"
    assert m.validation["top1_agreement"] >= 0.9
