"""NNCF's post-training quantization on the TFLite route (issue 14 point 5): `nncf-default` runs NNCF's
PT2E path (quantize_pt2e with litert-torch's symmetric quantizer, fast bias correction), converted by
litert-torch like the plain PT2E candidate, and is a candidate of the TFLite int8 search beside it."""
from __future__ import annotations

import json

import pytest

import lepton_edge
from conftest import run_cli
from lepton_edge.compress.quantize import Recipe
from lepton_edge.exporters.tflite import TfliteExporter


def test_tflite_takes_nncf_first_and_names_it_in_the_method():
    """The recipe names the algorithm (NNCF's default PTQ); on TFLite its backend is the PT2E one,
    and the manifest's method says so, never onnxruntime and never NNCF's ONNX backend."""
    tfl = TfliteExporter()
    assert tfl.recipe_examples[0] == "nncf-default" and tfl.supports_recipe("nncf-default")
    assert not tfl.supports_recipe("nncf-mixed")  # litert-torch's quantizer is symmetric: no asymmetric preset
    method = tfl.int8_method(Recipe.parse("nncf-default"))
    assert "NNCF" in method and "quantize_pt2e" in method and "ONNX" not in method
    assert "onnxruntime" not in method


@pytest.mark.slow
def test_nncf_pt2e_candidate_wins_and_the_manifest_names_nncf(tmp_path):
    r = lepton_edge.export("zoo:fashion-cnn", target="rpi4", recipes=["nncf-default"], calib_samples=64,
                           eval_limit=1000, out=tmp_path, measure_latency=False)
    m = r.bundle.manifest
    q = m.compression["quantization"]
    assert q["recipe"] == "nncf-default" and "NNCF" in q["method"] and "quantize_pt2e" in q["method"]
    assert [(a["recipe"], a["passed"], a["chosen"]) for a in q["attempts"]] == [("nncf-default", True, True)]
    assert m.validation["accuracy_drop_pp"] <= 0.5
    info = json.loads(run_cli("inspect", str(r.bundle.model_path), "--json").stdout)
    assert info["precision"] == "int8" and info["ops"]["QUANTIZE"] >= 1  # an int8 body behind a float interface


@pytest.mark.slow
def test_rpi4_default_search_tries_and_records_the_nncf_candidate(rpi4_bundle):
    """rpi4's profile lists nncf-default first: the TFLite search validates it first and records its
    metrics, size and time beside the other candidates, whichever wins."""
    q = rpi4_bundle.manifest.compression["quantization"]
    first = q["attempts"][0]
    assert first["recipe"] == "nncf-default" and not first["skipped"], first
    assert first["metrics"]["top1_agreement"] > 0.9 and first["bytes"] > 0 and first["seconds"] > 0
    assert [a["recipe"] for a in q["attempts"]][1:] == ["s8-minmax", "s8-minmax-litert"]
    assert sum(a["chosen"] for a in q["attempts"]) == 1


@pytest.mark.slow
def test_nncf_pt2e_quantizes_a_torchscript_model(tmp_path):
    """torch's TorchScript converter writes convolutions as the generic aten.convolution, which NNCF's
    PT2E path does not know ('UnknownMetatype' has no attribute 'weight_port_ids', found on MTCNN's
    O-Net); the exporter names them conv2d first, so NNCF quantizes a scripted model too."""
    import torch

    from test_torchscript_tflite import TwoHeads

    torch.manual_seed(0)
    path = tmp_path / "heads.pt"
    torch.jit.save(torch.jit.trace(TwoHeads().eval(), torch.rand(1, 3, 24, 24)), path)
    r = lepton_edge.export(str(path), target="rpi4", input_shape=[1, 3, 24, 24], recipes=["nncf-default"],
                           allow_synthetic_calibration=True, calib_samples=16, out=tmp_path / "out",
                           measure_latency=False)
    q = r.bundle.manifest.compression["quantization"]
    assert [(a["recipe"], a["skipped"], a["chosen"]) for a in q["attempts"]] == [("nncf-default", False, True)], q
    assert "NNCF" in q["method"] and r.bundle.manifest.precision == "int8"
