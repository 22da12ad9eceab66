"""TorchScript (.pt from torch.jit.script / torch.jit.trace) to TFLite: litert-torch traces with
torch.export, which cannot read TorchScript, so the TFLite exporter converts it first with
torch's TorchScript -> ExportedProgram converter (issue 14: facenet-pytorch's MTCNN ships this way).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lepton_edge
from lepton_edge.errors import BadInput
from lepton_edge.runtime.litert_loader import load_interpreter


class TwoHeads(torch.nn.Module):
    """Small and MTCNN-shaped: convolutions, PReLU, pooling, a dense layer and two outputs."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.act = torch.nn.PReLU(8)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.box = torch.nn.Linear(8, 4)
        self.prob = torch.nn.Linear(8, 2)

    def forward(self, x):
        h = self.pool(self.act(self.conv(x))).flatten(1)
        return self.box(h), torch.softmax(self.prob(h), dim=1)


def _saved(tmp_path, how: str):
    torch.manual_seed(0)
    m = TwoHeads().eval()
    x = torch.rand(1, 3, 24, 24)
    scripted = torch.jit.script(m) if how == "script" else torch.jit.trace(m, x)
    path = tmp_path / f"{how}.pt"
    torch.jit.save(scripted, path)
    return path, m


@pytest.mark.slow
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_exports_to_rpi4_tflite(tmp_path, how):
    path, module = _saved(tmp_path, how)
    r = lepton_edge.export(str(path), target="rpi4", precision="fp32", input_shape=[1, 3, 24, 24],
                           out=tmp_path / "out", name=f"ts-{how}", measure_latency=False)
    m = r.bundle.manifest
    assert (m.format, m.precision, m.inputs[0].layout) == ("tflite", "fp32", "NHWC")
    v = m.validation
    assert v["reference"].startswith("pytorch") and v["conversion"]["max_abs_diff"] < 1e-4
    # The artifact computes the original module's outputs (both heads) on a new input.
    x = np.random.default_rng(3).random((1, 3, 24, 24), dtype=np.float32)
    it = load_interpreter(r.bundle.model_path, 1)
    it.set_tensor(it.get_input_details()[0]["index"], x.transpose(0, 2, 3, 1).copy())  # NHWC
    it.invoke()
    got = sorted((it.get_tensor(d["index"]) for d in it.get_output_details()), key=lambda a: a.shape[-1])
    with torch.no_grad():
        want = sorted((t.numpy() for t in module(torch.from_numpy(x))), key=lambda a: a.shape[-1])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_torchscript_the_converter_cannot_read_is_one_line(tmp_path, monkeypatch):
    """When torch's converter fails, the export says so in one line, with its reason."""
    from torch._export import converter

    def broken(self, *a, **k):
        raise RuntimeError("unsupported node prim::Fake\nmore detail")

    monkeypatch.setattr(converter.TS2EPConverter, "convert", broken)
    path, _ = _saved(tmp_path, "trace")
    with pytest.raises(BadInput, match=r"TorchScript converter failed on this one \(unsupported node prim::Fake\)"):
        lepton_edge.export(str(path), target="rpi4", precision="fp32", input_shape=[1, 3, 24, 24],
                           out=tmp_path / "out", measure_latency=False)


@pytest.mark.slow
def test_a_torch_export_file_exports_to_rpi4_tflite(tmp_path):
    """A .pt2's module() refuses eval()/train(): giving it the NHWC input the rpi4 profile asks for
    raised NotImplementedError ("Calling train() is not supported yet") as a traceback."""
    torch.manual_seed(0)
    m = TwoHeads().eval()
    x = torch.rand(1, 3, 24, 24)
    path = tmp_path / "two.pt2"
    torch.export.save(torch.export.export(m, (x,)), path)
    r = lepton_edge.export(str(path), target="rpi4", precision="fp32", out=tmp_path / "out", name="pt2",
                           measure_latency=False)
    man = r.bundle.manifest
    assert (man.format, man.inputs[0].layout, man.inputs[0].shape) == ("tflite", "NHWC", [1, 24, 24, 3])
    it = load_interpreter(r.bundle.model_path, 1)
    it.set_tensor(it.get_input_details()[0]["index"], x.numpy().transpose(0, 2, 3, 1).copy())
    it.invoke()
    got = sorted((it.get_tensor(d["index"]) for d in it.get_output_details()), key=lambda a: a.shape[-1])
    with torch.no_grad():
        want = sorted((t.numpy() for t in m(x)), key=lambda a: a.shape[-1])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4)
