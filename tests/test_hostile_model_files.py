"""Model files and manifests built to break the runtime, each one line (exit 2) before any frame:
TFLite quantization that crashed LiteRT's allocator (SIGSEGV, the process gone), a file whose shared
FlatBuffer offsets unpack into millions of objects, a sparse gigabyte named .tflite, and manifests whose
claims (schema, input scale and quantization, outputs) disagree with the model or with arithmetic."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from conftest import run_cli
from lepton_edge.bundle import InputSpec, Manifest, OutputSpec, write_manifest
from lepton_edge.errors import BadInput
from test_plain_model_inputs import _mean_tflite


def _frames(tmp_path):
    d = tmp_path / "frames"
    d.mkdir(parents=True)
    for i in range(2):
        cv2.imwrite(str(d / f"{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    return d


def _one_line(r, *words):
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert all(w in r.stderr for w in words), r.stderr[-1500:]


@pytest.mark.parametrize("scale", [0.0, float("nan"), float("inf"), -1.0])
def test_a_quantized_input_whose_scale_is_not_positive_is_refused_before_litert_allocates(tmp_path, scale):
    """LiteRT's allocate_tensors segfaulted on these: `run` and `bench` died with no message (and
    `bench` then waited forever for its worker)."""
    m = tmp_path / "m.tflite"
    _mean_tflite(m, "uint8", (scale, 0))
    _one_line(run_cli("run", str(m), "--source", str(_frames(tmp_path)), "--no-show"), "quantization scale")
    _one_line(run_cli("bench", str(m), "--runs", "2", "--warmup", "1", timeout=60), "quantization scale")


def test_a_tflite_model_without_outputs_or_inputs_is_one_line(tmp_path):
    from ai_edge_litert.tools import flatbuffer_utils as fu

    m = tmp_path / "m.tflite"
    _mean_tflite(m, "uint8", (1 / 128, 128))
    for what in ("outputs", "inputs"):
        model = fu.read_model(str(m))
        setattr(model.subgraphs[0], what, [])
        bad = tmp_path / f"no-{what}.tflite"
        fu.write_model(model, str(bad))
        _one_line(run_cli("run", str(bad), "--source", str(_frames(tmp_path / what)), "--no-show"),
                  f"has no {what}")


def _repeated(b, start, offset: int, k: int) -> int:
    """A vector of `k` references to one table (start: the schema's StartXVector)."""
    start(b, k)
    for _ in range(k):
        b.PrependUOffsetTRelative(offset)
    return b.EndVector()


def _shared_offsets(path, k: int) -> None:
    """A FlatBuffer model whose subgraphs vector lists one subgraph k times, and that subgraph one
    tensor k times: a few KB that unpack into k*k objects."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    b = flatbuffers.Builder(1024)
    name = b.CreateString("t")
    s.TensorStartShapeVector(b, 4)
    for d in (3, 1, 1, 1):
        b.PrependInt32(d)
    shape = b.EndVector()
    s.TensorStart(b)
    s.TensorAddShape(b, shape)
    s.TensorAddName(b, name)
    t = s.TensorEnd(b)
    tensors = _repeated(b, s.SubGraphStartTensorsVector, t, k)
    s.SubGraphStartInputsVector(b, 1)
    b.PrependInt32(0)
    ins = b.EndVector()
    s.SubGraphStartOutputsVector(b, 1)
    b.PrependInt32(0)
    outs = b.EndVector()
    s.SubGraphStart(b)
    s.SubGraphAddTensors(b, tensors)
    s.SubGraphAddInputs(b, ins)
    s.SubGraphAddOutputs(b, outs)
    sg = s.SubGraphEnd(b)
    sgs = _repeated(b, s.ModelStartSubgraphsVector, sg, k)
    s.ModelStart(b)
    s.ModelAddVersion(b, 3)
    s.ModelAddSubgraphs(b, sgs)
    b.Finish(s.ModelEnd(b), file_identifier=b"TFL3")
    path.write_bytes(bytes(b.Output()))


def test_shared_offsets_and_sparse_files_are_refused_before_they_are_unpacked_or_read(tmp_path):
    amp = tmp_path / "amp.tflite"
    _shared_offsets(amp, 1000)  # ~8 KB: a million tensors once unpacked (24 s and 860 MB under inspect)
    assert amp.stat().st_size < 20_000
    for verb in (("inspect", str(amp)), ("run", str(amp), "--source", str(_frames(tmp_path)), "--no-show")):
        _one_line(run_cli(*verb, timeout=60), "over 200,000 tensors and operators")
    sparse = tmp_path / "sparse.tflite"
    with open(sparse, "wb") as f:  # the identifier, then a gigabyte of nothing (a hole: no disk used)
        f.write(b"\0\0\0\0TFL3")
        f.truncate(1 << 30)
    for verb in (("inspect", str(sparse)), ("run", str(sparse), "--source", str(tmp_path / "frames"), "--no-show")):
        _one_line(run_cli(*verb, timeout=60), "no subgraph")


def _bundle(d, *, quant=(1 / 128, 128), **changes):
    """A hand-made bundle around _mean_tflite's uint8 model, with the manifest fields `changes` set."""
    d.mkdir()
    _mean_tflite(d / "model.tflite", "uint8", quant)
    fields = dict(name="mean", created="2026-01-01", target={"id": "rpi4", "threads": 1}, format="tflite",
                  precision="int8", model_file="model.tflite", task="raw",
                  inputs=[InputSpec(name="x", shape=[1, 8, 8, 3], color="RGB", layout="NHWC", dtype="uint8",
                                    quantization={"scale": quant[0], "zero_point": quant[1]})],
                  outputs=[OutputSpec(name="y", shape=[1, 3])])
    fields.update(changes)
    write_manifest(d, Manifest(**fields))
    return d


def test_manifest_claims_that_disagree_with_the_model_or_arithmetic_are_one_line(tmp_path):
    frames = _frames(tmp_path)
    good = _bundle(tmp_path / "good")
    r = run_cli("run", str(good), "--source", str(frames), "--no-show", "--json")
    assert r.returncode == 0, r.stderr[-1500:]

    def edited(name, edit):
        b = _bundle(tmp_path / name)
        man = json.loads((b / "manifest.json").read_text())
        edit(man)
        (b / "manifest.json").write_text(json.dumps(man))  # (manifest.json is not among its own checksummed files)
        return run_cli("run", str(b), "--source", str(frames), "--no-show")

    _one_line(edited("schema", lambda m: m.update(schema_version=99)), "schema_version 99")
    for name, q in [("q-scale", {"scale": 1e300, "zero_point": 128}), ("q-zero", {"scale": 1 / 128, "zero_point": 5})]:
        _one_line(edited(name, lambda m, q=q: m["inputs"][0].update(quantization=q)), "does not match the model's")
    for name, scale in [("tiny", 1e-300), ("negative", -0.0039)]:
        _one_line(edited(name, lambda m, s=scale: m["inputs"][0].update(scale=s)), "must be a number above 0")
    _one_line(edited("outputs-n", lambda m: m["outputs"].append({"name": "z", "shape": [1, 3]})),
              "lists 2 output(s), the model has 1")
    _one_line(edited("outputs-shape", lambda m: m["outputs"][0].update(shape=[1, 1000])),
              "output shape [1, 1000] does not match the model's [1, 3]")
    _one_line(edited("fusion", lambda m: m["target"].update(qdq_fusion="off")), "qdq_fusion")


def test_bench_reports_a_worker_the_engine_killed_instead_of_waiting_for_it(monkeypatch):
    """Pool.apply waited forever when a model crashed LiteRT inside the worker (it quietly started a
    new one); the row now says the engine crashed. (fork: the child keeps this test's stand-in crash.)"""
    import multiprocessing as mp
    import os

    from lepton_edge import bench

    monkeypatch.setattr(bench, "measure", lambda *a: os._exit(139))
    row = bench._isolated(mp.get_context("fork"), ("m.tflite", 1, 2, 1, None, None))
    assert row["model"] == "m.tflite" and "the engine crashed on this model" in row["error"]
    monkeypatch.setattr(bench, "measure", lambda *a: {}["no such key"])
    row = bench._isolated(mp.get_context("fork"), ("m.tflite", 1, 2, 1, None, None))
    assert row["error"].startswith("KeyError")  # any other failure: one row, one line, no traceback


def test_ctrl_c_while_bench_starts_its_worker_leaves_no_half_fed_child():
    """A Ctrl-C that lands after the spawned worker exists but before start() has written it its pickled
    work: the child, fed half of it, printed an EOFError traceback under bench's 'interrupted' (a CI run of
    test_cli_surface.py::test_ctrl_c_says_interrupted caught it). The interrupt now waits for the start to
    end; the worker is then killed whole, silently, and KeyboardInterrupt leaves bench as before."""
    import subprocess
    import sys

    script = """
import multiprocessing as mp, multiprocessing.util as util, signal, sys, time
from lepton_edge import bench

signal.signal(signal.SIGINT, signal.default_int_handler)  # (as from a terminal: a background job ignores it)
real = util.spawnv_passfds
def spawned_then_ctrl_c(*a, **k):
    pid = real(*a, **k)
    if "spawn_main" in str(a):  # the worker (not the resource tracker): it exists, nothing written to it yet
        signal.raise_signal(signal.SIGINT)
    return pid
util.spawnv_passfds = spawned_then_ctrl_c
try:
    bench._isolated(mp.get_context("spawn"), ("m.onnx", 1, 2, 1, None, None, None))
except KeyboardInterrupt:
    print("interrupted", flush=True)
time.sleep(3)  # long enough for a half-fed child to say so
print("children:", len(mp.active_children()))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["interrupted", "children:", "0"], (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "EOFError" not in r.stderr, r.stderr


def test_run_checks_a_signature_against_trusted_keys_and_says_when_it_did_not(tmp_path):
    """A signed bundle changed after signing (files re-checksummed) ran without a word: `run` has no
    key unless given one. Now --trusted-key refuses it, and without one the unchecked signature is said."""
    from lepton_edge import signing

    frames = _frames(tmp_path)
    b = _bundle(tmp_path / "b")
    private, public = signing.new_keys(tmp_path / "keys")
    signing.sign(b, private)
    r = run_cli("run", str(b), "--source", str(frames), "--no-show", "--trusted-key", str(public))
    assert r.returncode == 0 and "signed by trusted key" in r.stderr, r.stderr[-1500:]
    man = Manifest.model_validate_json((b / "manifest.json").read_text())
    write_manifest(b, man.model_copy(update={"name": "evil"}))  # checksums right, signature now wrong
    _one_line(run_cli("run", str(b), "--source", str(frames), "--no-show", "--trusted-key", str(public)),
              "bad signature")
    r = run_cli("run", str(b), "--source", str(frames), "--no-show")
    assert r.returncode == 0 and "its signature was not checked" in r.stderr, r.stderr[-1500:]


@pytest.mark.parametrize("schema", [True, False], ids=["ai-edge-litert", "tflite-runtime-fallback"])
def test_an_inner_zero_scale_is_refused_and_a_constants_allowed(tmp_path, monkeypatch, schema):
    """An activation's zero scale crashed LiteRT at the first invoke; a constant's (a pruned, all-zero weight
    channel, as TFLite's per-channel quantizer writes it) runs. Checked on the FlatBuffer itself, and from
    the interpreter's tensor list where the schema module is missing (tflite_runtime on old devices)."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils as fu

    from lepton_edge.errors import BadInput
    from lepton_edge.runtime import litert_loader

    if not schema:
        monkeypatch.setattr(litert_loader, "_has_schema", lambda: False)
        monkeypatch.setattr(litert_loader, "_check_links", lambda buf, p: None)
    base = tmp_path / "m.tflite"
    _mean_tflite(base, "uint8", (1 / 128, 128))
    for index, name, refused in ((1, "activation", True), (2, "constant", False)):  # "real" (DEQUANTIZE's), "axes"
        m = fu.read_model(str(base))
        q = s.QuantizationParametersT()
        q.scale, q.zeroPoint = [0.0], [0]
        m.subgraphs[0].tensors[index].quantization = q
        f = tmp_path / f"{name}.tflite"
        fu.write_model(m, str(f))
        if refused:
            with pytest.raises(BadInput, match="quantization scale 0.0; a scale must be a finite number above 0"):
                litert_loader.load_interpreter(f)
        else:
            litert_loader.load_interpreter(f)


def test_a_tflite_whose_tensors_would_take_gigabytes_is_refused_by_its_test_loads_memory(tmp_path, monkeypatch):
    """A 3.5 KB .tflite whose input claimed [1,20000,20000,3] took the test load to 7 GB (`inspect` to
    13 GB) before XNNPACK refused it: LiteRT allocates holding the GIL, so no watcher in the process could
    stop it. The test load's child is now ended past the load's memory budget (here made small: an input
    of 8000x8000 needs ~1 GB)."""
    from lepton_edge.runtime import hard_stop, litert_loader

    m = tmp_path / "big.tflite"
    _mean_tflite(m, "uint8", (1 / 128, 128), shape=(1, 8000, 8000, 3))
    monkeypatch.setattr(hard_stop, "growth_budget", lambda path: 64 << 20)
    with pytest.raises(BadInput, match="test load of this model took over 0.3 GiB"):
        litert_loader._probe(m, 1, True)
    monkeypatch.setattr(hard_stop, "growth_budget", lambda path: 4 << 30)  # within its budget it loads
    litert_loader._probe(m, 1, True)
