"""A model whose input is not an image (a signal [1,400], a feature map [1,64,8,8]): exported from a .npy,
then run on a .npy's rows. Before, `export --calib x.npy` made a bundle that `run` refused ("this runtime
feeds camera frames"), and Runtime.load refused it from Python too."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from lepton_edge.capture import SourceState, open_source
from lepton_edge.errors import BadInput


def _signal_model(path, classes: int = 3) -> str:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((400, classes)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 400])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", classes])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_signal_model_exported_from_a_npy_runs_on_a_npy_as_the_engine_computes_it(tmp_path):
    model = _signal_model(tmp_path / "sig.onnx")
    x = np.random.default_rng(1).standard_normal((64, 400)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = run_cli("export", model, "--target", "x86-cpu", "--precision", "fp32", "--calib", str(tmp_path / "x.npy"),
                "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    (bundle,) = [p.parent for p in (tmp_path / "o").rglob("manifest.json")]
    manifest = json.loads((bundle / "manifest.json").read_text())
    sess = ort.InferenceSession(str(bundle / manifest["model_file"]), providers=["CPUExecutionProvider"])
    want = [int(np.argmax(sess.run(None, {"x": row[None]})[0])) for row in x[:12]]
    # rows of the .npy, stacked [N,400], and in a .npz beside their labels as [N,1,400]
    np.savez_compressed(tmp_path / "x.npz", y=np.zeros(12, np.int64), x=x[:12, None])
    for src in ("x.npy", "x.npz"):
        out = tmp_path / f"{src}.jsonl"
        r = run_cli("run", str(bundle), "--source", str(tmp_path / src), "--max-frames", "12", "--no-show",
                    "--jsonl", str(out), "--json")
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout)["frames"] == 12
        lines = _lines(out)
        assert [d["task"] for d in lines] == ["classify"] * 12  # (an unlabelled classifier: top-k)
        assert [d["result"][0]["index"] for d in lines] == want, src
    # the plain file too, and `bench` (zeros of the input's shape)
    out = tmp_path / "plain.jsonl"
    r = run_cli("run", model, "--source", str(tmp_path / "x.npy"), "--max-frames", "12", "--no-show", "--task", "raw",
                "--jsonl", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    got = [np.asarray(d["result"][0]) for d in _lines(out)]
    ref = [sess.run(None, {"x": row[None]})[0] for row in x[:12]]
    assert all(np.allclose(g, e, rtol=1e-4, atol=1e-4) for g, e in zip(got, ref))
    r = run_cli("bench", str(bundle), "--runs", "20", "--json")
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_signal_bundle_fed_frames_or_asked_to_draw_is_one_line(tmp_path, fashion_folders):
    model = _signal_model(tmp_path / "sig.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((40, 400)).astype(np.float32))
    r = run_cli("export", model, "--target", "x86-cpu", "--precision", "fp32", "--calib", str(tmp_path / "x.npy"),
                "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    (bundle,) = [p.parent for p in (tmp_path / "o").rglob("manifest.json")]
    calib, _ = fashion_folders
    r = run_cli("run", str(bundle), "--source", str(calib), "--max-frames", "3", "--no-show")
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(err) == 1, r.stderr[-2000:]
    assert "is not an image" in err[0] and ".npy" in err[0]
    r = run_cli("run", str(bundle), "--source", str(tmp_path / "x.npy"), "--save", str(tmp_path / "out.mp4"))
    assert r.returncode == 2 and "use --jsonl" in r.stderr and not (tmp_path / "out.mp4").exists()
    # rows of another size, or of the same size in another shape: one line before any row is read
    for name, rows in (("short", np.zeros((5, 399), np.float32)), ("square", np.zeros((5, 20, 20), np.float32))):
        np.save(tmp_path / f"{name}.npy", rows)
        r = run_cli("run", str(bundle), "--source", str(tmp_path / f"{name}.npy"), "--no-show")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"rows of {list(rows.shape[1:])} in" in r.stderr and "are not inputs of [1, 400]" in r.stderr
    # --jsonl onto the file being read: refused, the file kept (it was replaced by JSON lines)
    before = (tmp_path / "x.npy").read_bytes()
    same = str(tmp_path / "x.npy")
    r = run_cli("run", str(bundle), "--source", same, "--no-show", "--jsonl", same)
    assert r.returncode == 2 and "that is the source being read" in r.stderr
    assert (tmp_path / "x.npy").read_bytes() == before


def test_a_3d_feature_input_of_a_plain_file_takes_its_rows_as_they_are(tmp_path):
    """[n,100,40] (a spectrogram) reads as a gray 100x40 frame's tensor; its float rows were pixel-scaled as
    frames (class 1 at 0.36 where onnxruntime says class 2 at 1.0). A row of the input's shape is the input
    itself, as the export takes the same file's rows."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4000, 3)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 4000], np.int64), "s")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["flat"]),
                               helper.make_node("MatMul", ["flat", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 100, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "spec.onnx"))
    x = np.random.default_rng(3).standard_normal((8, 100, 40)).astype(np.float32)
    np.save(tmp_path / "spec.npy", x)
    out = tmp_path / "out.jsonl"
    r = run_cli("run", str(tmp_path / "spec.onnx"), "--source", str(tmp_path / "spec.npy"), "--no-show", "--task",
                "raw", "--jsonl", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    sess = ort.InferenceSession(str(tmp_path / "spec.onnx"), providers=["CPUExecutionProvider"])
    got = [np.asarray(d["result"][0]) for d in _lines(out)]
    assert len(got) == 8
    assert all(np.allclose(g, sess.run(None, {"x": row[None]})[0], rtol=1e-4, atol=1e-3) for g, row in zip(got, x))


def test_a_feature_map_bundle_runs_on_its_arrays(tmp_path):
    """4-D, but 64 channels: not an image either."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 64, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="mix")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fmap.onnx"))
    x = np.random.default_rng(2).standard_normal((24, 64, 8, 8)).astype(np.float32)
    np.save(tmp_path / "fmap.npy", x)
    r = run_cli("export", str(tmp_path / "fmap.onnx"), "--target", "x86-cpu", "--precision", "fp32",
                "--calib", str(tmp_path / "fmap.npy"), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    (bundle,) = [p.parent for p in (tmp_path / "o").rglob("manifest.json")]
    from lepton_edge.pipeline import Pipeline

    with Pipeline(str(tmp_path / "fmap.npy"), str(bundle), max_frames=24) as pipe:
        outs = [np.asarray(r.output[0]) for r in pipe]
    sess = ort.InferenceSession(str(tmp_path / "fmap.onnx"), providers=["CPUExecutionProvider"])
    assert len(outs) == 24
    assert all(np.allclose(o, sess.run(None, {"x": row[None]})[0], atol=1e-4) for o, row in zip(outs, x))


# ---- the source itself (fast) ------------------------------------------------------------------------------


def _rows(spec: str) -> list[np.ndarray]:
    with open_source(spec) as src:
        assert src.kind == "arrays"
        return [f.image for f in src]


def test_the_array_source_reads_rows_of_a_npy_or_a_npz_member(tmp_path):
    x = np.arange(5 * 3 * 2, dtype=np.int16).reshape(5, 3, 2)
    np.save(tmp_path / "a.npy", x)
    assert [r.tolist() for r in _rows(str(tmp_path / "a.npy"))] == x.tolist()
    np.savez_compressed(tmp_path / "a.npz", labels=np.arange(5), inputs=x)  # the inputs, by name
    assert [r.tolist() for r in _rows(str(tmp_path / "a.npz"))] == x.tolist()
    np.savez(tmp_path / "only.npz", np.ones((2, 4), np.float32))  # no known name: the first array
    assert [r.tolist() for r in _rows(str(tmp_path / "only.npz"))] == [[1.0] * 4] * 2


def test_the_array_source_refuses_pickles_huge_rows_and_fortran_order_before_reading(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(BadInput, match="nothing is unpickled"):
        open_source(str(tmp_path / "obj.npy"))
    # a 100-byte header that claims rows of 10**12 values: refused from the header, nothing allocated
    big = tmp_path / "big.npy"
    with open(big, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2, 10 ** 12)})
    with pytest.raises(BadInput, match="too large to be one input"):
        open_source(str(big))
    np.save(tmp_path / "f.npy", np.asfortranarray(np.ones((4, 3), np.float32)))
    with pytest.raises(BadInput, match="Fortran-order"):
        open_source(str(tmp_path / "f.npy"))
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    with pytest.raises(BadInput, match="holds no arrays"):
        open_source(str(tmp_path / "empty.npz"))
    # what is not numbers, refused from the header: a 1.5 GB "row" of void in a 1.4 MB .npz reached 1.6 GB
    for name, dtype in (("void", "|V1500000000"), ("cplx", "<c16"), ("text", "<U8"), ("when", "<M8[s]")):
        with open(tmp_path / f"{name}.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": (1,)})
        with pytest.raises(BadInput, match="not numbers a model takes"):
            open_source(str(tmp_path / f"{name}.npy"))
    np.save(tmp_path / "v9.npy", np.ones((2, 3), np.float32))
    data = bytearray((tmp_path / "v9.npy").read_bytes())
    data[6] = 9  # a format version numpy does not know
    (tmp_path / "v9.npy").write_bytes(bytes(data))
    with pytest.raises(BadInput, match="not a numeric array file"):
        open_source(str(tmp_path / "v9.npy"))


def test_a_npz_member_whose_data_is_damaged_ends_the_source_with_why(tmp_path):
    """A bad CRC (or a broken deflate stream) surfaced as a zipfile traceback from the capture thread."""
    rows = np.arange(4 * 1000, dtype=np.float32).reshape(4, 1000)
    with zipfile.ZipFile(tmp_path / "crc.npz", "w", zipfile.ZIP_STORED) as z, z.open("x.npy", "w") as f:
        np.lib.format.write_array(f, rows)
    data = bytearray((tmp_path / "crc.npz").read_bytes())
    data[data.index(b"\x93NUMPY") + 200 + 3 * 4000] ^= 0xFF  # a byte of the last row
    (tmp_path / "crc.npz").write_bytes(bytes(data))
    with open_source(str(tmp_path / "crc.npz")) as src:
        got = [f.image for f in src]
        assert src.state == SourceState.FAILED and "CRC" in (src.failure or ""), src.failure
        assert len(got) < 4 and all(np.array_equal(g, r) for g, r in zip(got, rows))


def test_a_truncated_array_file_gives_its_whole_rows_then_fails_with_why(tmp_path):
    np.save(tmp_path / "t.npy", np.ones((10, 100), np.float32))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:-(100 * 4 * 6 + 10)])  # 3 whole rows, then part of one
    with open_source(str(tmp_path / "t.npy")) as src:
        rows = [f.image for f in src]
        assert len(rows) == 3 and src.state == SourceState.FAILED and "truncated" in (src.failure or "")
