"""ExportOptions (one typed options object for the CLI, the Python API and --compare) and the
exporter registry (built-ins and a third-party exporter through an entry point)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

import lepton_edge
from lepton_edge.errors import BadInput
from lepton_edge.exporters.options import ExportOptions


@pytest.mark.parametrize("kw,needles", [
    ({"color": "rgb"}, ["color", "'RGB', 'BGR' or 'GRAY'", "'rgb'"]),
    ({"mean": [0.5, 0.5]}, ["mean has 2 value(s)", "1 or 3"]),
    ({"std": [0.2, 0.2, 0.2], "color": "GRAY"}, ["std has 3 value(s)", "GRAY"]),
    ({"std": [0.0]}, ["std", "0"]),
    ({"min_f1": -0.1}, ["min_f1", "-0.1"]),
    ({"max_accuracy_drop": -1}, ["max_accuracy_drop", "-1"]),
    ({"min_sqnr": float("nan")}, ["min_sqnr", "finite"]),
    ({"min_agreement": True}, ["min_agreement"]),
    ({"search_time": 0}, ["search_time"]),
    ({"max_memory": "1MB"}, ["max_memory", "64MiB"]),
    ({"max_size": "lots"}, ["max_size", "'lots'"]),
    ({"precision": "int4"}, ["precision", "'int4'"]),
    ({"task": "segmentation"}, ["task", "'segmentation'"]),
    ({"resize": "squash"}, ["resize", "'squash'"]),
    ({"recipes": ["q8-fast"]}, ["recipes", "unknown recipe 'q8-fast'"]),
    ({"input_shape": [1, 0, 28, 28]}, ["input_shape[1]"]),
    ({"finetune_epochs": 1}, ["finetune_epochs applies after prune"]),
    ({"int8_io": True, "format": "onnx"}, ["int8_io applies to TFLite"]),
    ({"colour": "RGB"}, ["unknown export option 'colour'", "did you mean: color"]),
])
def test_the_python_api_refuses_bad_options_in_one_line_before_any_work(tmp_path, kw, needles):
    t0 = time.monotonic()
    with pytest.raises(BadInput) as e:
        lepton_edge.export("zoo:fashion-cnn", out=tmp_path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) <= 300, msg
    for n in needles:
        assert n in msg, msg
    assert time.monotonic() - t0 < 5, "checked after loading the model"
    assert not any(tmp_path.iterdir())


def test_resize_reaches_the_manifest_the_device_reads(tmp_path):
    """--resize letterbox: the bundle's input spec says so, so the device letterboxes frames as the
    calibration and validation did (a wide captcha stretched to a square loses its characters)."""
    import json

    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model(torch.zeros(1, 3, 16, 16))
    res = lepton_edge.export(model, out=tmp_path, example_input=torch.zeros(1, 3, 16, 16), precision="fp32",
                             resize="letterbox", name="lb")
    manifest = json.loads((res.bundle.path / "manifest.json").read_text())
    assert manifest["inputs"][0]["resize"] == "letterbox", manifest["inputs"]


def test_a_mean_that_does_not_fit_the_model_channels_is_one_line(tmp_path):
    """Without --color the channel count is the model's: a 3-value mean for a 1-channel model is
    refused once the model is loaded, not by numpy later."""
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model(torch.zeros(1, 1, 16, 16))
    with pytest.raises(BadInput, match=r"mean has 3 values but the model's input has 1 channel"):
        lepton_edge.export(model, out=tmp_path, example_input=torch.zeros(1, 1, 16, 16), precision="fp32",
                           mean=[0.5, 0.5, 0.5])


def test_options_object_and_keywords_combine_and_keywords_win(tmp_path):
    base = ExportOptions(target="rpi4", out=tmp_path, min_f1=0.5)
    merged = ExportOptions.of(base, min_f1=0.8, precision="fp16")
    assert (merged.target, merged.out, merged.min_f1, merged.precision) == ("rpi4", tmp_path, 0.8, "fp16")
    assert base.min_f1 == 0.5  # the base is not changed
    th = merged.thresholds()
    assert th.min_f1 == 0.8 and th.max_accuracy_drop == 0.5
    assert merged.max_size_bytes is None and ExportOptions(max_size="1MB").max_size_bytes == 1_000_000


CLI_FLAGS = ["--target", "rpi4", "--precision", "int8", "--format", "tflite", "--layout", "nhwc", "--int8-io",
             "--input-shape", "1,3,32,32", "--calib", "photos/", "--calib-samples", "50", "--eval", "ev.npz",
             "--eval-limit", "100", "--prune", "0.3", "--finetune-epochs", "2", "--train", "tr.npz",
             "--max-size", "2MB", "--task", "CLASSIFY", "--min-agreement", "0.9", "--min-confident-kept", "0.95",
             "--min-top5", "0.9", "--max-accuracy-drop", "1.5", "--min-sqnr", "10", "--min-cosine", "0.9",
             "--min-f1", "0.8", "--recipes", "s8-minmax,s8-minmax-litert", "--search-time", "60",
             "--max-memory", "4GB", "--allow-synthetic-calibration", "--name", "m", "--color", "bgr",
             "--resize", "letterbox", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--weights", "w.pth"]
API_KW = {
    "target": "rpi4", "precision": "int8", "format": "tflite", "layout": "NHWC", "int8_io": True,
    "input_shape": [1, 3, 32, 32], "calib": "photos/", "calib_samples": 50, "eval": "ev.npz", "eval_limit": 100,
    "prune": 0.3, "finetune_epochs": 2, "train": "tr.npz", "max_size": "2MB", "task": "classify",
    "min_agreement": 0.9, "min_confident_kept": 0.95, "min_top5": 0.9, "max_accuracy_drop": 1.5, "min_sqnr": 10.0,
    "min_cosine": 0.9, "min_f1": 0.8, "recipes": ["s8-minmax", "s8-minmax-litert"], "search_time": 60.0,
    "max_memory": "4GB", "allow_synthetic_calibration": True, "name": "m", "color": "BGR",
    "resize": "letterbox", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "weights": "w.pth",
}


def _captured(monkeypatch):
    """Replace the export steps with a recorder: what reaches them is what the caller built."""
    from lepton_edge.exporters import base

    seen = []

    def record(model, options, example_input=None):
        seen.append(options)
        raise BadInput("recorded")

    monkeypatch.setattr(base, "run_export", record)
    return seen


def _cli(*args):
    from lepton_edge.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_and_python_api_build_the_same_options(tmp_path, monkeypatch):
    seen = _captured(monkeypatch)
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    _cli("export", "zoo:fashion-cnn", "-o", str(tmp_path), "--labels", str(labels), *CLI_FLAGS)
    with pytest.raises(BadInput, match="recorded"):
        lepton_edge.export("zoo:fashion-cnn", out=tmp_path, labels=["a", "b", "c"], **API_KW)
    assert len(seen) == 2, seen
    cli, api = seen
    assert cli == api
    # and the defaults of both are the same: every flag's default is the option's
    seen.clear()
    _cli("export", "zoo:fashion-cnn", "-o", str(tmp_path))
    with pytest.raises(BadInput):
        lepton_edge.export("zoo:fashion-cnn", out=tmp_path)
    assert seen[0] == seen[1] == ExportOptions(out=tmp_path)


def test_cli_names_the_flag_in_its_one_line_error(tmp_path):
    for flags, start in ((["--min-cosine", "1.5"], "--min-cosine: "), (["--mean", "1,2"], "--mean has 2 value(s)"),
                         (["--finetune-epochs", "2"], "--finetune-epochs applies after --prune; give --prune")):
        r = _cli("export", "zoo:fashion-cnn", "-o", str(tmp_path), *flags)
        assert isinstance(r.exception, BadInput), r.output
        assert str(r.exception).startswith(start), str(r.exception)


def test_compare_builds_one_options_object_per_variant(tmp_path, monkeypatch):
    from lepton_edge.compare import VARIANTS, compare

    seen = _captured(monkeypatch)
    base = ExportOptions(out=tmp_path, int8_io=True, calib="photos/", min_f1=0.7)
    rows = compare("zoo:fashion-cnn", base)
    assert [(r["format"], r["precision"], r["status"]) for r in rows] == [(f, p, "failed") for f, p in VARIANTS]
    assert [(o.format, o.precision) for o in seen] == VARIANTS
    for o in seen:
        assert o.int8_io == (o.format == "tflite")  # ONNX keeps float I/O
        assert o.model_copy(update={"format": None, "precision": None, "int8_io": True}) == base
    with pytest.raises(BadInput, match="--compare runs every format"):
        compare("zoo:fashion-cnn", base.varied(format="tflite"))


def test_registry_finds_the_built_in_exporters():
    from lepton_edge.exporters.exporter import Exporter, formats, get_exporter

    assert formats()[:2] == ["onnx", "tflite"]
    for fmt in ("onnx", "tflite"):
        ex = get_exporter(fmt)
        assert isinstance(ex, Exporter) and ex.format == fmt
    with pytest.raises(BadInput, match=r"format 'coreml' is not available \(have: onnx, tflite"):
        get_exporter("coreml")
    with pytest.raises(TypeError):  # abc: an exporter that leaves out a step cannot be made
        type("Half", (Exporter,), {"format_": "half"})()


PLUGIN = '''
from lepton_edge.errors import BadInput
from lepton_edge.exporters.onnx import OnnxExporter


class ToyExporter(OnnxExporter):
    """A third-party format: ONNX with another name; its fp32 step says what it was given."""

    format = "toy"
    suffix = ".toy"

    def to_fp32(self, ctx, path):
        raise BadInput(f"toy exporter got {ctx.source.name} for {ctx.profile.id} in {ctx.workdir.name[:14]}")
'''


def test_an_exporter_added_from_outside_through_an_entry_point(tmp_path):
    """A package that is not lepton-edge declares `[lepton_edge.exporters] toy = ...`: the registry
    lists it, and `export --format toy` runs it with the export's context."""
    site = tmp_path / "site"
    dist = site / "toy_exporter-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-exporter\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lepton_edge.exporters]\ntoy = toy_exporter:ToyExporter\n")
    (site / "toy_exporter.py").write_text(PLUGIN)
    script = textwrap.dedent("""
        import sys
        import lepton_edge
        from lepton_edge.errors import BadInput
        from lepton_edge.exporters.exporter import formats
        print("formats", " ".join(formats()))
        try:
            lepton_edge.export("zoo:fashion-cnn", format="toy", precision="fp32", out=sys.argv[1])
        except BadInput as e:
            print("error", e)
    """)
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True,
                       env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = dict(ln.split(" ", 1) for ln in r.stdout.splitlines() if ln.startswith(("formats", "error")))
    assert lines["formats"].split() == ["onnx", "tflite", "toy"]
    assert lines["error"] == "toy exporter got fashion-cnn for x86-cpu in lepton-export-"


def test_manifest_sections_keep_what_older_and_newer_manifests_hold():
    """The typed sections read a manifest's dicts as they are (unknown keys kept, nothing added),
    so manifests keep their shape; a wrong type is refused by name."""
    from pydantic import ValidationError

    from lepton_edge.manifest_sections import CompressionSection, ValidationSection

    old = {"calibration": {"source": "zoo:fashion-cnn", "kind": "zoo", "samples": 100}, "params": 101802,
           "quantization": {"method": "PT2E", "recipe": "s8-minmax", "float_nodes": [], "attempts": [{"recipe": "x"}],
                            "search_seconds": 1.5, "peak_rss_bytes": 1, "max_memory_bytes": None,
                            "speed_vs_fp32": 0.8, "from_a_newer_version": True},
           "fp32_bytes": 10, "bytes": 4, "size_vs_fp32": 0.4}
    c = CompressionSection.model_validate(old)
    assert c.record() == old and c.quantization.recipe == "s8-minmax" and c.calibration.samples == 100
    v = {"passed": True, "why": None, "task": "classify", "top1_agreement": 0.99, "metrics": {"top1_agreement": 0.99}}
    assert ValidationSection.model_validate(v).record() == v
    with pytest.raises(ValidationError, match="search_seconds"):
        CompressionSection.model_validate({"quantization": {**old["quantization"], "search_seconds": "slow"}})


@pytest.mark.slow
def test_an_int8_model_slower_than_fp32_on_this_host_is_a_warning(tmp_path, monkeypatch, caplog):
    """onnxruntime's x86 kernels can run an int8 graph slower than its fp32 one (quantize/dequantize
    pairs around layers without int8 kernels): the export says so instead of implying int8 is faster.
    The host's timings are replaced (the artifact's, then fp32's, timed side by side), since which models
    are slower depends on the CPU."""
    import logging

    import numpy as np
    import torch

    from lepton_edge.exporters import validation as val

    def ms(v: float) -> dict:
        return {"p50_ms": v, "p90_ms": v, "min_ms": v, "runs": 5}

    def timed(pred, ref, x, **kw):  # the search's quick timing passes runs=...; the report's does not
        return (ms(4.0), ms(4.0)) if "runs" in kw else (ms(12.0), ms(4.0))

    monkeypatch.setattr(val, "paired_latency_ms", timed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    model(torch.zeros(1, 3, 16, 16))
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).uniform(0, 1, (64, 3, 16, 16)).astype(np.float32))
    with caplog.at_level(logging.WARNING):
        res = lepton_edge.export(model, out=tmp_path / "out", example_input=torch.zeros(1, 3, 16, 16),
                                 calib=str(calib), task="raw", recipes=["u8-minmax"])
    assert res.bundle.manifest.precision == "int8"
    assert any("3.0x slower than fp32 on this host" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("kw,needles", [
    ({"max_size": "1e300GB"}, ["max_size", "at most 1 EiB"]),  # int(inf): an OverflowError traceback
    ({"max_memory": "1e300GB"}, ["max_memory", "at most 1 EiB"]),
    ({"max_size": 0}, ["max_size", "positive number of bytes", "got 0"]),  # 0 read as "no limit"
    ({"max_size": -5}, ["max_size", "got -5"]),  # failed every export on its size check
    ({"labels": ["cat\ndog", "bird"]}, ["labels", "label 0 holds a line break"]),
    ({"labels": ["cat", "dog\x85", "bird"]}, ["labels", "label 1 holds a line break"]),  # (U+0085 splits a line)
    ({"labels": ["cat", "  ", "bird"]}, ["labels", "label 1 is blank"]),
    ({"labels": ["x" * (5 << 20), "b"]}, ["labels", "over the 4 MiB"]),  # a bundle Bundle.load refuses
    ({"name": "evil\x1b[31mRED"}, ["name", "printable characters only", "\\x1b"]),
    ({"name": "a\nb"}, ["name", "printable characters only"]),
    ({"std": [-1.0, -1.0, -1.0]}, ["std", "must be positive"]),  # ValueError/ZeroDivisionError tracebacks
    ({"std": [2.0, -1.0, 1.0]}, ["std", "must be positive"]),
    ({"out": "~nosuchuser-lepton/x"}, ["out", "cannot expand '~'"]),  # pathlib's RuntimeError
    ({"calib_samples": 100_001}, ["calib_samples", "100000"]),
    ({"holdout": 10**9}, ["holdout", "100000"]),
    ({"finetune_epochs": 10**6, "prune": 0.5}, ["finetune_epochs", "10000"]),
    ({"recipes": []}, ["recipes is empty"]),  # once meant the target's own recipes, silently
    ({"recipes": ["s8-minmax-ends-ends"]}, ["recipes", "'s8-minmax-ends-ends'", "named twice"]),
    ({"recipes": ["nncf-default-sq-sq"]}, ["recipes", "named twice"]),
])
def test_an_option_out_of_its_range_is_one_line_not_a_traceback_or_a_bad_bundle(kw, needles):
    """What the CLI refuses (or should) the Python API refuses the same way, before any work."""
    with pytest.raises(BadInput) as e:
        ExportOptions.of(**kw)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) <= 300, msg
    for n in needles:
        assert n in msg, msg


def test_the_cli_refuses_an_overflowing_size_a_negative_std_and_control_characters_by_flag(tmp_path, monkeypatch):
    seen = _captured(monkeypatch)
    for flags, start in ((["--max-size", "1e300GB"], "--max-size: must be at most 1 EiB"),
                         (["--max-memory", "1e300GB"], "--max-memory: must be at most 1 EiB"),
                         (["--std=-1,-1,-1"], "--std: values must be positive"),
                         (["--name", "evil\x1b[31mRED\nline2"], "--name: printable characters only")):
        r = _cli("export", "zoo:fashion-cnn", "-o", str(tmp_path), *flags)
        assert isinstance(r.exception, BadInput), (flags, r.exception, r.output)
        assert str(r.exception).startswith(start), str(r.exception)
    assert not seen


def test_a_labels_file_breaks_lines_at_newlines_only(tmp_path, monkeypatch):
    """U+0085 (NEL) inside a class name split it into two labels with splitlines(), shifting every
    class name after it on the device; now lines end at \\n (\\r\\n too) and such a label is one line."""
    seen = _captured(monkeypatch)
    labels = tmp_path / "labels.txt"
    labels.write_bytes("cat\r\n\n  dog \r\n\u3000\n\xa0\nbird\n".encode())  # (whitespace-only lines: no labels)
    _cli("export", "zoo:fashion-cnn", "-o", str(tmp_path), "--labels", str(labels))
    assert seen[0].labels == ["cat", "dog", "bird"]
    labels.write_bytes("cat\ncrested\u0085crane\nbird\n".encode())
    r = _cli("export", "zoo:fashion-cnn", "-o", str(tmp_path), "--labels", str(labels))
    assert isinstance(r.exception, BadInput), r.output
    assert "label 1 holds a line break" in str(r.exception), str(r.exception)
    assert len(seen) == 1


def test_a_long_name_makes_a_folder_name_the_file_system_takes():
    """--name allows 128 characters, but 128 'é' are 256 bytes: over a folder name's 255, the export
    failed with OSError after all its work. The folder's stem is cut by UTF-8 bytes."""
    from types import SimpleNamespace

    from lepton_edge.exporters import writer

    prof = SimpleNamespace(id="x" * 64, format="onnx", precision="fp32")
    name = writer.bundle_name(SimpleNamespace(name="é" * 128), prof, "tflite", "int8")
    assert name.startswith("é" * 60) and name.endswith("-" + "x" * 64 + "-tflite-int8"), name
    assert len(f".{name}.abcdefgh".encode()) <= 255, len(name.encode())
    assert writer.bundle_name(SimpleNamespace(name="m"), prof, "onnx", "fp32") == "m-" + "x" * 64


def test_a_color_that_does_not_fit_the_model_channels_is_one_line(tmp_path):
    """--color GRAY on a 3-channel model wrote a bundle whose input spec no frame can feed."""
    import torch

    from lepton_edge.model_source import default_spec

    with pytest.raises(BadInput, match=r"--color GRAY gives 1 channel\(s\), but input 'input' \[1, 3, 16, 16\]"):
        default_spec([1, 3, 16, 16], color="GRAY")
    with pytest.raises(BadInput, match=r"has 1; give --color GRAY"):
        default_spec([1, 16, 16, 1], layout="NHWC", color="RGB")
    assert default_spec([1, 3, 16, 16], color="BGR").color == "BGR"
    assert default_spec([1, 4, 16, 16], color="RGB").color == "RGB"  # (RGBA: hw() names it, calib may be .npz)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model(torch.zeros(1, 3, 16, 16))
    t0 = time.monotonic()
    with pytest.raises(BadInput, match="--color GRAY gives 1 channel"):
        lepton_edge.export(model, out=tmp_path, example_input=torch.zeros(1, 3, 16, 16), precision="fp32",
                           color="GRAY")
    assert time.monotonic() - t0 < 30 and not any(tmp_path.iterdir())
