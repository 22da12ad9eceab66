"""The export's inputs held to its memory and time budgets (found by an adversarial sweep): random inputs
are sized before they are drawn, an array file's header is read before its rows, fine-tuning stops when
its epochs cannot end in time. Each is one line, before the memory or the time is spent.

Real parts: ONNX graphs built with onnx.helper, .npz files written with numpy's own format module, a
small torch module fine-tuned by the real loop.
"""
from __future__ import annotations

import io
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto as T, helper as h, numpy_helper as nh

import lepton_edge
from lepton_edge.bundle import InputSpec
from lepton_edge.compress import calibration as cal
from lepton_edge.errors import CheckFailed


def _net(path: Path, hw: tuple[int, int]) -> Path:
    """x [1,3,H,W] -> 1x1 Conv (4 channels) -> Relu -> GlobalAveragePool -> [1,4,1,1]."""
    import onnx

    rng = np.random.default_rng(0)
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"), h.make_node("Relu", ["c"], ["r"], name="relu"),
             h.make_node("GlobalAveragePool", ["r"], ["y"], name="gap")]
    inits = [nh.from_array((rng.standard_normal((4, 3, 1, 1)) * 0.3).astype(np.float32), "w"),
             nh.from_array(np.zeros(4, np.float32), "b")]
    graph = h.make_graph(nodes, "net", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, *hw])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 1, 1])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _spec(hw=(32, 32)) -> InputSpec:
    return InputSpec(name="x", shape=[1, 3, *hw], dtype="float32", layout="NCHW", color="RGB", mean=[0.0] * 3,
                     std=[1.0] * 3)


def test_random_inputs_over_the_budget_are_one_line_before_any_is_drawn(tmp_path, monkeypatch):
    """--calib-samples 3000 of 1x3x256x256 with --allow-synthetic-calibration went past 2 GB under
    --max-memory 1GB, and fp32 of a 1x3x4096x4096 model with no data drew 24 GB of float64 (a MemoryError):
    both are refused by size (over half the budget), naming the option to change, before a random value is drawn."""
    drawn = []
    real = cal.synthetic
    monkeypatch.setattr(cal, "synthetic", lambda *a, **k: drawn.append(a) or real(*a, **k))
    model = _net(tmp_path / "m.onnx", (128, 128))  # 192 KiB an input as float32: 1564 of them, 307 MB
    with pytest.raises(CheckFailed, match=r"1564 random inputs .* --calib-samples \d+"):
        lepton_edge.export(str(model), precision="int8", recipes=["u8-minmax"], allow_synthetic_calibration=True,
                           calib_samples=1500, max_memory="512MiB", out=tmp_path / "o", task="raw",
                           measure_latency=False)
    big = _net(tmp_path / "big.onnx", (512, 512))  # 3 MiB an input: 100 agreement inputs are 315 MB
    with pytest.raises(CheckFailed, match=r"100 random inputs .* --holdout \d+"):
        lepton_edge.export(str(big), precision="fp32", max_memory="512MiB", holdout=100, out=tmp_path / "o",
                           task="raw", measure_latency=False)
    assert not drawn


def test_random_inputs_are_float32_drawn_in_chunks_and_sized_first(monkeypatch):
    """synthetic() writes float32 a chunk at a time (the values of one float64 draw, as before) and refuses
    a count over its budget with one line instead of numpy's MemoryError."""
    monkeypatch.setattr(cal, "SYNTHETIC_CHUNK", 1000)
    x = cal.synthetic(_spec(), 5, seed=3).x
    assert x.dtype == np.float32 and x.shape == (5, 3, 32, 32)
    assert np.array_equal(x, np.random.default_rng(3).standard_normal((5, 3, 32, 32)).astype(np.float32))
    with pytest.raises(CheckFailed, match="10000000 random inputs .* --calib-samples"):
        cal.synthetic(_spec(), 10_000_000, max_bytes=1 << 30)


def _bomb(path: Path, rows: int) -> Path:
    """A .npz whose x is `rows` x 3x32x32 float32 zeros: deflated to a few hundred KB."""
    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {"descr": "<f4", "fortran_order": False, "shape": (rows, 3, 32, 32)})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z, z.open("x.npy", "w") as f:
        f.write(hdr.getvalue())
        row = bytes(3 * 32 * 32 * 4)
        for _ in range(rows):
            f.write(row)
    return path


def test_an_npz_is_read_from_its_header_only_the_rows_used(tmp_path):
    """A 3.5 MB .npz decompressed to 3.7 GB before any check: now only the first `limit` rows are read,
    and rows that would take over the budget are one line naming --calib-samples."""
    bomb = _bomb(tmp_path / "bomb.npz", 20_000)  # 246 MB of zeros once decompressed
    assert bomb.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        s = cal.load_inputs(str(bomb), _spec(), limit=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert s.x.shape == (100, 3, 32, 32) and peak < 40 << 20, peak
    with pytest.raises(CheckFailed, match=r"20000 inputs .* over half the export's memory budget .*--calib-samples"):
        cal.load_inputs(str(bomb), _spec(), max_bytes=64 << 20)


def test_array_files_read_by_header_hold_what_np_load_gives(tmp_path):
    """The header-first reader returns what np.load did: C and Fortran order, .npy and .npz, labels paired."""
    rng = np.random.default_rng(0)
    x = rng.random((12, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 4, 12)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    np.savez_compressed(tmp_path / "xy.npz", x=x, y=y)
    assert np.array_equal(cal.load_inputs(str(tmp_path / "f.npy"), _spec(), limit=5).x, x[:5])
    s = cal.load_inputs(str(tmp_path / "xy.npz"), _spec(), limit=7, labelled=True)
    assert np.array_equal(s.x, x[:7]) and np.array_equal(s.y, y[:7])


FINETUNE = """
import numpy as np, torch
from lepton_edge.compress import prune
from lepton_edge.errors import CheckFailed
m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
x, y = np.zeros((8, 12), np.float32), np.zeros(8, np.int64)
try:
    prune.finetune(m, x, y, 10**9)
except CheckFailed as e:
    print("REFUSED", e)
"""


def test_finetune_epochs_that_cannot_end_in_time_stop_within_seconds():
    """finetune_epochs=10**9 on 64 samples ran until killed: the epochs' projected time, judged between
    batches, is one line naming --finetune-epochs within seconds (its own process: the old loop never ends)."""
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-c", FINETUNE], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("fine-tuning 10**9 epochs still ran after 60 s")
    assert "REFUSED" in r.stdout and "--finetune-epochs" in r.stdout, r.stdout + r.stderr[-2000:]
    assert time.monotonic() - t0 < 30


def test_finetune_stops_at_its_time_budget():
    """A budget smaller than the epochs need: CheckFailed between batches, within seconds of it."""
    torch = pytest.importorskip("torch")
    from lepton_edge.compress import prune

    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    t0 = time.monotonic()
    with pytest.raises(CheckFailed, match="over its 0.2 s budget"):
        prune.finetune(m, np.zeros((8, 12), np.float32), np.zeros(8, np.int64), 10**6, max_seconds=0.2)
    assert time.monotonic() - t0 < 10
