"""Files that crashed the process or wrote to the operator's terminal: a .tflite whose load crashed LiteRT
(SIGSEGV, no message), profile descriptions and paths with Rich markup ("[/]": a MarkupError traceback) or
terminal escapes (ESC retitled the terminal, cleared the screen), ONNX metadata out of range, and op
names that are not UTF-8. Each is one line, or the text shown as text."""
from __future__ import annotations

import io
from types import SimpleNamespace

import onnx
import pytest
from onnx import TensorProto, helper
from rich.console import Console

from conftest import ROOT, run_cli
from test_plain_model_inputs import _mean_tflite

ESC = "\x1b]0;PWNED\x07\x1b[2J"


def _one_line(r, *words):
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-1500:])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr[-1500:]
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_a_tflite_whose_test_load_dies_by_a_signal_is_one_line_and_never_loaded_here(tmp_path, monkeypatch):
    """A mutated 3 KB .tflite corrupted LiteRT's heap: `run` died by SIGSEGV with no message. The first load
    is a child's; its death by a signal is one line. (The stand-in child kills itself: the real file's crash
    depends on the heap's layout.)"""
    from lepton_edge.errors import BadInput
    from lepton_edge.runtime import litert_loader

    m = tmp_path / "m.tflite"
    _mean_tflite(m, "uint8", (1 / 128, 128))
    monkeypatch.setattr(litert_loader, "_probed", set())
    monkeypatch.setattr(litert_loader, "PROBE_CODE", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    monkeypatch.setattr(litert_loader, "interpreter_class", lambda: pytest.fail("loaded in this process"))
    with pytest.raises(BadInput, match=r"LiteRT crashed loading this model \(SIGSEGV in a test load\)"):
        litert_loader.load_interpreter(m)


def _custom_op_tflite(path) -> None:
    """_mean_tflite's model with its MEAN turned into a custom op LiteRT lacks."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils as fu

    _mean_tflite(path, "uint8", (1 / 128, 128))
    m = fu.read_model(str(path))
    oc = m.operatorCodes[1]
    oc.builtinCode = oc.deprecatedBuiltinCode = s.BuiltinOperator.CUSTOM
    oc.customCode = "EvilOp"
    fu.write_model(m, str(path))



def test_the_test_load_never_imports_from_the_working_directory(tmp_path, monkeypatch):
    """`python -c` puts the working directory first on the child's sys.path, ahead of the standard library:
    `lepton-edge run BUNDLE` from a folder holding a ctypes.py ran that file. The child still refuses what
    its LiteRT refuses."""
    from lepton_edge.errors import BadInput
    from lepton_edge.runtime import litert_loader

    bad, good = tmp_path / "bad.tflite", tmp_path / "good.tflite"
    _custom_op_tflite(bad)
    _mean_tflite(good, "uint8", (1 / 128, 128))
    here = tmp_path / "cwd"
    here.mkdir()
    marker = tmp_path / "RAN"
    (here / "ctypes.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise ImportError('planted')\n")
    monkeypatch.chdir(here)
    monkeypatch.setattr(litert_loader, "_probed", set())
    with pytest.raises(BadInput, match="uses custom op 'EvilOp'"):
        litert_loader.load_interpreter(bad)
    litert_loader.load_interpreter(good)
    assert not marker.exists(), "the test load imported ctypes.py from the working directory"

def test_a_file_litert_refused_in_the_test_load_is_refused_without_loading_it_here(tmp_path, monkeypatch):
    """The crashing file was a clean refusal in a bare process and a SIGSEGV in `run`'s: what the child's
    LiteRT refuses is refused with its line, and this process's LiteRT never sees it. A model that loads
    is probed once per process."""
    from lepton_edge.errors import BadInput
    from lepton_edge.runtime import litert_loader

    bad, good = tmp_path / "bad.tflite", tmp_path / "good.tflite"
    _custom_op_tflite(bad)
    _mean_tflite(good, "uint8", (1 / 128, 128))
    monkeypatch.setattr(litert_loader, "_probed", set())
    real = litert_loader.interpreter_class
    monkeypatch.setattr(litert_loader, "interpreter_class", lambda: pytest.fail("loaded in this process"))
    with pytest.raises(BadInput, match="uses custom op 'EvilOp', which this LiteRT interpreter lacks"):
        litert_loader.load_interpreter(bad)
    monkeypatch.setattr(litert_loader, "interpreter_class", real)
    calls = []
    import subprocess

    popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a) or popen(*a, **k))
    for _ in range(2):
        it = litert_loader.load_interpreter(good)
        assert it.get_output_details()[0]["shape"].tolist() == [1, 3]
    assert len(calls) == 1


def test_inspect_and_run_refuse_a_file_the_test_load_refused_in_one_line(tmp_path):
    m = tmp_path / "bad.tflite"
    _custom_op_tflite(m)
    r = run_cli("inspect", str(m))
    assert r.returncode == 0 and "Traceback" not in r.stderr and "EvilOp" in r.stdout, r.stderr[-1500:]
    _one_line(run_cli("run", str(m), "--source", str(tmp_path), "--no-show"), "EvilOp")


def test_op_names_litert_cannot_decode_are_reported_by_inspect(tmp_path, monkeypatch):
    """A mutated op name made LiteRT's operator list a UnicodeDecodeError traceback under `inspect`."""
    from lepton_edge import inspect as insp
    from lepton_edge.runtime import litert_loader

    class Interp:
        def _get_ops_details(self):
            raise UnicodeDecodeError("utf-8", b"\xfb", 0, 1, "invalid start byte")

    m = tmp_path / "m.tflite"
    _mean_tflite(m, "uint8", (1 / 128, 128))
    monkeypatch.setattr(litert_loader, "load_interpreter", lambda *a, **k: Interp())
    info = insp.inspect(m)
    assert "LiteRT cannot list its operators (UnicodeDecodeError" in info["xnnpack"]["error"]


def test_error_lines_show_control_characters_from_model_files_as_text(tmp_path):
    """An input name with ESC in an ONNX file went into the one-line error as it was: the terminal was
    retitled and cleared. Markup in it is text too."""
    names = [f"a{ESC}[/]b", "c"]
    g = helper.make_graph([helper.make_node("Add", names, ["y"])], "g",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8]) for n in names],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    line = _one_line(run_cli("run", str(tmp_path / "m.onnx"), "--source", str(tmp_path), "--no-show"),
                     "the model has 2 inputs")
    assert "\x1b" not in line and "\x07" not in line and "a?]0;PWNED??[2J[/]b" in line


def test_targets_show_prints_a_profiles_markup_and_escapes_as_text(tmp_path):
    base = (ROOT / "targets" / "x86-cpu.toml").read_text()
    lines = [ln if not ln.startswith("description =") else 'description = "evil [/] close \\u001b[2Jx\\u0007"'
             for ln in base.splitlines()]
    (tmp_path / "t.toml").write_text("\n".join(lines) + "\n")
    r = run_cli("targets", "show", str(tmp_path / "t.toml"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert "evil [/] close ?[2Jx?" in r.stdout and "\x1b" not in r.stdout and "\x07" not in r.stdout


def _render(renderable) -> str:
    c = Console(file=io.StringIO(), width=400, highlight=False)
    c.print(renderable)
    return c.file.getvalue()


def test_compare_table_shows_paths_and_reasons_as_text():
    """`export --compare` with "[/]" in the model's path: a MarkupError traceback after every export had run."""
    from lepton_edge.compare import table

    rows = [{"format": "onnx", "precision": "fp32", "status": "failed", "reason": f"a[/]m.onnx: no {ESC}"},
            {"format": "onnx", "precision": "int8", "status": "ok", "bytes": 10, "accuracy": None,
             "accuracy_drop_pp": None, "agreement": None, "latency_ms": 1.0, "threads": 1, "recipe": "[/]minmax"}]
    text = _render(table(rows, "a[/]m.onnx for ./p[/]t.toml: formats"))
    assert "a[/]m.onnx for ./p[/]t.toml" in text and "a[/]m.onnx: no ?]0;PWNED??[2J" in text
    assert "[/]minmax" in text and "\x1b" not in text


def _backend(meta):
    return SimpleNamespace(session=SimpleNamespace(get_modelmeta=lambda: SimpleNamespace(custom_metadata_map=meta)))


@pytest.mark.parametrize("imgsz, size", [("1e400", None), ("[]", None), ("float('nan')", None), ("[1e999, 5]", None),
                                         ("-32", None), ("0", None), ("[1, 2, 3]", None), ("'a'", None),
                                         ("[" * 150 + "]" * 150, None), ("True", None), ("9000", None),
                                         ("320", (320, 320)), ("[480, 640]", (480, 640)), ("(64.0,)", (64, 64))])
def test_onnx_metadata_out_of_range_is_left_out(imgsz, size):
    """imgsz "1e400" was int(inf), an OverflowError traceback from `run`, and "[]" an IndexError."""
    from lepton_edge.runtime.spec import model_metadata

    assert model_metadata(_backend({"imgsz": imgsz})).get("size") == size


def test_onnx_metadata_names_that_are_not_labels_are_left_out():
    from lepton_edge.runtime.spec import model_metadata

    backend = _backend
    for names in ("{0: [1, 2], 1: None}", "{0: 'a', 'b': 'c'}", "[" * 150 + "]" * 150, "'abc'"):
        assert "labels" not in model_metadata(backend({"names": names}))
    assert model_metadata(backend({"names": "{1: 'b', 0: 'a'}"}))["labels"] == ["a", "b"]


def test_export_report_shows_the_bundle_name_as_text(monkeypatch):
    from lepton_edge import cli

    buf = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buf, width=400, highlight=False))
    rep = {"name": f"n{ESC}[/]x", "target": "x86-cpu", "format": "onnx", "precision": "fp32",
           "bundle": f"/b/n{ESC}[/]x", "bytes": 100, "fp32_bytes": 100, "seconds": 1.0, "compression": {},
           "latency": {}, "validation": {"task": "raw", "samples": 4, "agreement_inputs": "synthetic"}}
    cli._print_report(rep)
    text = buf.getvalue()
    assert "n?]0;PWNED??[2J[/]x -> x86-cpu" in text and "\x1b" not in text and "\x07" not in text


def test_export_compare_titles_a_path_with_markup_as_text(tmp_path, monkeypatch):
    """The table's title quotes the model's path: "[/]" in it was a MarkupError after every export had run."""
    from typer.testing import CliRunner

    from lepton_edge import cli, compare

    rows = [{"format": "onnx", "precision": "fp32", "status": "failed", "reason": "a[/]m.onnx: no"}]
    monkeypatch.setattr(compare, "compare", lambda model, options: rows)
    monkeypatch.setattr(cli, "out", Console(file=io.StringIO(), width=400, highlight=False))
    r = CliRunner().invoke(cli.app, ["export", "a[/]m.onnx", "--compare", "--out", str(tmp_path / "o")])
    assert type(r.exception).__name__ == "CheckFailed", r.exception  # (no variant passed), not a MarkupError
    assert "a[/]m.onnx for" in cli.out.file.getvalue()


def test_a_tflite_lacking_several_custom_ops_names_them_all(tmp_path):
    """MediaPipe's face_landmark_with_attention.tflite needs three custom ops (Landmarks2TransformMatrix,
    TransformTensorBilinear, TransformLandmarks); LiteRT names the first it lacks, and a user who
    registered that one met the next only on the next try. The one line lists the others the file uses."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils as fu

    path = tmp_path / "two.tflite"
    _mean_tflite(path, "uint8", (1 / 128, 128))
    m = fu.read_model(str(path))
    for oc, name in zip(m.operatorCodes, ("FirstOp", "SecondOp")):
        oc.builtinCode = oc.deprecatedBuiltinCode = s.BuiltinOperator.CUSTOM
        oc.customCode = name
    fu.write_model(m, str(path))
    folder = tmp_path / "frames"
    folder.mkdir()
    import cv2
    import numpy as np

    cv2.imwrite(str(folder / "a.png"), np.zeros((8, 8, 3), np.uint8))
    line = _one_line(run_cli("run", str(path), "--source", str(folder), "--no-show"), "custom op")
    assert "FirstOp" in line and "SecondOp" in line, line
