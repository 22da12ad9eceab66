"""The twin of a uint8-activation QDQ graph with int8 activations (compress/activation_twin.py): the same
quantizers in the same places and the same real values, so onnxruntime runs the kernels an s8 candidate
gets. It is only timed, but a twin that computed something else would time something else."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static  # noqa: E402

from lepton_edge.compress.activation_twin import int8_activation_twin  # noqa: E402


class _Reader(CalibrationDataReader):
    def __init__(self, xs):
        self.it = iter({"x": x} for x in xs)

    def get_next(self):
        return next(self.it, None)


def _fp32(path):
    """Conv -> Relu -> Add(constant) -> Conv: weights, an activation and a constant onnxruntime quantizes."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.uniform(0.1, 0.5, (1, 8, 1, 1)).astype(np.float32), "k")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Add", ["r", "k"], ["a"]), helper.make_node("Conv", ["a", "w2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def _quantized(tmp_path, activation):
    _fp32(tmp_path / "m.onnx")
    xs = [np.random.default_rng(i).standard_normal((1, 3, 16, 16)).astype(np.float32) for i in range(4)]
    out = tmp_path / f"{activation}.onnx"
    quantize_static(str(tmp_path / "m.onnx"), str(out), _Reader(xs), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8 if activation == "u8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8, extra_options={"QuantizeBias": False})
    return out


def _run(path, x, fused: bool = True):
    so = ort.SessionOptions()
    if not fused:  # the Q/DQ graph's own arithmetic, no fused int8 kernel
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_the_twin_has_int8_activations_and_computes_the_same(tmp_path):
    u8 = _quantized(tmp_path, "u8")
    assert int8_activation_twin(u8, tmp_path / "twin.onnx")
    g = onnx.load(str(tmp_path / "twin.onnx")).graph
    inits = {t.name: t for t in g.initializer}
    zps = [inits[n.input[2]] for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zps and all(t.data_type == TensorProto.INT8 for t in zps)
    assert len(g.node) == len(onnx.load(str(u8)).graph.node)  # the same quantizers in the same places
    x = np.random.default_rng(9).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "twin.onnx", x), _run(u8, x), rtol=1e-5, atol=1e-5)


def test_a_graph_with_int8_activations_has_no_twin(tmp_path):
    assert not int8_activation_twin(_quantized(tmp_path, "s8"), tmp_path / "twin.onnx")
    assert not (tmp_path / "twin.onnx").exists()


def _chain(path):
    """Conv -> Conv -> Conv, no activations (onnxruntime's s8 graphs keep a Relu its uint8 ones fold away)."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w3")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Conv", ["c1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Conv", ["c2", "w3"], ["y"], name="conv3")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def _shape(path):
    """Op types and initializer types, by count: what decides which kernels run."""
    g = onnx.load(str(path)).graph
    return sorted(n.op_type for n in g.node), sorted(t.data_type for t in g.initializer)


def test_with_its_end_layers_float_the_twin_is_the_ends_candidates_graph(tmp_path):
    """The twin of the uint8 best, its first and last layers made float, has the ops and constant types of
    the project's own s8-minmax-ends graph of the same model (first layer reading the input unquantized,
    last one writing the output unquantized, the middle int8) and computes what that graph does."""
    from lepton_edge.compress import quantize as q

    _chain(tmp_path / "m.onnx")
    xs = np.random.default_rng(3).standard_normal((8, 3, 16, 16)).astype(np.float32)
    u8 = q.quantize_int8(tmp_path / "m.onnx", tmp_path / "u8.onnx", xs, q.Recipe.parse("u8-minmax")).path
    s8e = q.quantize_int8(tmp_path / "m.onnx", tmp_path / "s8e.onnx", xs, q.Recipe.parse("s8-minmax-ends")).path
    ends = q.end_layers(onnx.load(str(tmp_path / "m.onnx")))
    assert ends == ["conv1", "conv3"]
    assert int8_activation_twin(u8, tmp_path / "twin.onnx", ends)
    assert _shape(tmp_path / "twin.onnx") == _shape(s8e)
    assert _shape(tmp_path / "twin.onnx") != _shape(u8)
    x = xs[:1]
    twin, ref, fp32 = _run(tmp_path / "twin.onnx", x), _run(s8e, x), _run(tmp_path / "m.onnx", x)
    assert np.abs(twin - ref).max() < 0.05 * np.abs(fp32).max(), (np.abs(twin - ref).max(), np.abs(fp32).max())


def _w(name, *shape):
    return numpy_helper.from_array(np.random.default_rng(len(name)).standard_normal(shape).astype(np.float32) * 0.3,
                                   name)


def _graph(path, kind):
    """Small models of the shapes onnxruntime's placement rules differ on: Relus after convolutions (a uint8
    quantizer folds them, an int8 one keeps them), a pass-through op after the last layer (it runs in float
    behind an excluded layer), the input read by the first layer and a quantized op beside it (its quantizer
    stays), a Concat and Resize tail, a Clip with constant bounds, two Relus in a row and one writing the
    output, a pass-through op that onnxruntime reaches before the layer that quantizes its input."""
    node, inits = helper.make_node, [_w("w1", 8, 3, 3, 3), _w("w2", 8, 8, 3, 3), _w("w3", 8, 8, 1, 1)]
    out_shape = [1, 8, 16, 16]
    if kind == "relus":
        nodes = [node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
                 node("Relu", ["c1"], ["r1"], name="relu1"),
                 node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
                 node("Relu", ["c2"], ["r2"], name="relu2"), node("Conv", ["r2", "w3"], ["y"], name="conv3")]
    elif kind == "reshape_tail":
        inits.append(numpy_helper.from_array(np.array([1, 8, 256], np.int64), "shape"))
        nodes = [node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
                 node("Conv", ["c1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
                 node("Conv", ["c2", "w3"], ["c3"], name="conv3"),
                 node("Reshape", ["c3", "shape"], ["y"], name="reshape")]
        out_shape = [1, 8, 256]
    elif kind == "shared_input":
        inits[0] = _w("w1", 3, 3, 3, 3)
        inits[1], inits[2] = _w("w2", 3, 3, 3, 3), _w("w3", 8, 3, 1, 1)
        nodes = [node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
                 node("Add", ["c1", "x"], ["a"], name="add"),
                 node("Conv", ["a", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
                 node("Conv", ["c2", "w3"], ["y"], name="conv3")]
    elif kind == "concat_resize":
        inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
        nodes = [node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
                 node("Conv", ["c1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
                 node("Concat", ["c1", "c2"], ["cat"], axis=1, name="concat"),
                 node("Conv", ["cat", "w4"], ["c3"], name="conv3"),
                 node("Resize", ["c3", "", "scales"], ["y"], mode="nearest", name="resize")]
        inits.append(_w("w4", 8, 16, 1, 1))
        out_shape = [1, 8, 32, 32]
    elif kind == "relu_chain_last":  # two Relus in a row, and a Relu writing the graph's output
        nodes = [node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
                 node("Relu", ["c1"], ["r1"], name="relu1"), node("Relu", ["r1"], ["r2"], name="relu2"),
                 node("Conv", ["r2", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
                 node("Conv", ["c2", "w3"], ["c3"], name="conv3"), node("Relu", ["c3"], ["y"], name="relu3")]
    elif kind == "pool_before_reader":  # a pass-through op placed before the layer that quantizes its input
        nodes = [node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
                 node("MaxPool", ["c1"], ["p"], kernel_shape=[2, 2], name="pool"),
                 node("Conv", ["c1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
                 node("Conv", ["c2", "w3"], ["c3"], name="conv3"), node("Exp", ["p"], ["e"], name="exp"),
                 node("ReduceMean", ["e"], ["m"], keepdims=1, name="mean"), node("Add", ["c3", "m"], ["y"], name="add")]
    else:  # clip
        inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in (("lo", 0.0), ("hi", 6.0))]
        nodes = [node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
                 node("Conv", ["c1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
                 node("Clip", ["c2", "lo", "hi"], ["k"], name="clip"), node("Conv", ["k", "w3"], ["y"], name="conv3")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def _ops(path):
    from collections import Counter

    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("kind", ["relus", "reshape_tail", "shared_input", "concat_resize", "clip", "relu_chain_last",
                                  "pool_before_reader"])
def test_the_twin_has_the_ops_of_onnxruntimes_own_s8_graph(tmp_path, kind):
    """Built from the uint8 best and the float model, the twin has every op of the project's own s8 graph of
    the same model, as many of each (the kernels timed), with every layer int8 (s8-minmax) and with the end
    layers float (s8-minmax-ends), and computes what that graph does."""
    from lepton_edge.compress import quantize as q

    _graph(tmp_path / "m.onnx", kind)
    xs = np.random.default_rng(3).standard_normal((8, 3, 16, 16)).astype(np.float32)
    u8 = q.quantize_int8(tmp_path / "m.onnx", tmp_path / "u8.onnx", xs, q.Recipe.parse("u8-minmax")).path
    ends = q.end_layers(onnx.load(str(tmp_path / "m.onnx")))
    fp32 = _run(tmp_path / "m.onnx", xs[:1])
    for recipe, floated in (("s8-minmax", []), ("s8-minmax-ends", ends)):
        real = q.quantize_int8(tmp_path / "m.onnx", tmp_path / f"{recipe}.onnx", xs, q.Recipe.parse(recipe)).path
        twin = tmp_path / f"twin-{recipe}.onnx"
        assert int8_activation_twin(u8, twin, floated, fp32=tmp_path / "m.onnx"), recipe
        assert _ops(twin) == _ops(real), (recipe, _ops(twin), _ops(real), _ops(u8))
        # (the graphs' arithmetic: fused, onnxruntime's s8s8 kernels on an x86 CPU without VNNI (AVX2 only, an
        # AMD EPYC here) saturate, and the real s8 graph read 2.07 off fp32's 5.97 where the twin read 0.54)
        diff = np.abs(_run(twin, xs[:1], fused=False) - _run(real, xs[:1], fused=False)).max()
        assert diff < 0.1 * np.abs(fp32).max(), (recipe, diff, np.abs(fp32).max())


def test_a_quantizer_onnxruntimes_rules_do_not_explain_leaves_no_float_layers_twin(tmp_path):
    """The rules that decide which Q/DQ pairs a layer made float takes away are onnxruntime's: a graph with
    a pair they would not have placed (between two ops that quantize nothing) is not theirs, so its twin
    would be a guess: none with float layers (the all-int8 twin needs no such rules)."""
    from lepton_edge.compress import quantize as q

    _graph(tmp_path / "m.onnx", "relus")
    xs = np.random.default_rng(3).standard_normal((8, 3, 16, 16)).astype(np.float32)
    u8 = q.quantize_int8(tmp_path / "m.onnx", tmp_path / "u8.onnx", xs, q.Recipe.parse("u8-minmax")).path
    model = onnx.load(str(u8))
    zp = next(n.input[1:] for n in model.graph.node if n.op_type == "QuantizeLinear")
    model.graph.node.extend([helper.make_node("Exp", ["y"], ["e"]),
                             helper.make_node("QuantizeLinear", ["e", *zp], ["eq"]),
                             helper.make_node("DequantizeLinear", ["eq", *zp], ["edq"]),
                             helper.make_node("Neg", ["edq"], ["n"])])
    model.graph.output.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, None))
    onnx.save(model, str(tmp_path / "odd.onnx"))
    assert not int8_activation_twin(tmp_path / "odd.onnx", tmp_path / "twin.onnx", ["conv1", "conv3"])
    assert int8_activation_twin(tmp_path / "odd.onnx", tmp_path / "twin.onnx")


def test_a_uint8_constant_read_as_data_leaves_no_twin(tmp_path):
    """Moved by 128, a uint8 zero point that another op reads as data would make that op compute something
    else: such a graph has no twin, and nothing is written."""
    u8 = _quantized(tmp_path, "u8")
    model = onnx.load(str(u8))
    zp = next(n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear")
    model.graph.node.append(helper.make_node("Cast", [zp], ["zp_seen"], to=TensorProto.FLOAT))
    model.graph.output.append(helper.make_tensor_value_info("zp_seen", TensorProto.FLOAT, None))
    onnx.save(model, str(tmp_path / "read.onnx"))
    assert not int8_activation_twin(tmp_path / "read.onnx", tmp_path / "twin.onnx")
    assert not (tmp_path / "twin.onnx").exists()


def test_a_float_layer_not_in_the_graph_leaves_no_twin(tmp_path):
    assert not int8_activation_twin(_quantized(tmp_path, "u8"), tmp_path / "twin.onnx", ["no-such-layer"])
    assert not (tmp_path / "twin.onnx").exists()


class _Stage:
    def info(self, s):
        pass

    def stage(self, s):
        import contextlib

        return contextlib.nullcontext()


def _timer(tmp_path, predictor):
    """The search's real twin timer (exporters/recipes._twin_timer), the exporter's predictor given."""
    from types import SimpleNamespace as NS

    from lepton_edge.exporters import recipes

    _chain(tmp_path / "m.onnx")
    ctx = NS(workdir=tmp_path, progress=_Stage(), threads=1)
    exporter = NS(format="onnx", predictor=predictor)
    fp32 = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x1 = np.zeros((1, 3, 16, 16), np.float32)
    return recipes._twin_timer(ctx, exporter, tmp_path / "m.onnx", x1, None, lambda x: fp32.run(None, {"x": x}))


def _session(path, threads):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: s.run(None, {"x": x})


def _best(tmp_path):
    """The uint8 best of `_timer`'s model, as the search has it (the project's own quantizer)."""
    from lepton_edge.compress import quantize as q

    xs = np.random.default_rng(3).standard_normal((4, 3, 16, 16)).astype(np.float32)
    return q.quantize_int8(tmp_path / "m.onnx", tmp_path / "u8.onnx", xs, q.Recipe.parse("u8-minmax")).path


def test_the_twin_timer_times_the_twin_and_leaves_no_file(tmp_path):
    timed = _timer(tmp_path, _session)
    u8 = _best(tmp_path)
    within, fields = timed(u8, False, [])
    assert within and fields["vs_fp32"] > 0 and fields["min_ms"] > 0
    assert timed(u8, True, []) is not None  # its end layers made float
    assert timed(u8, True, ["conv3"]) is not None  # (one the best keeps float already)
    assert not (tmp_path / "s8-twin.onnx").exists()


def test_no_twin_where_the_best_keeps_in_float_a_layer_the_candidate_quantizes(tmp_path):
    """The twin can make layers float, not quantize what the best left float: an s8 candidate with every
    layer int8 behind a best with one in float is not judged by a twin (it is tried)."""
    timed = _timer(tmp_path, _session)
    assert timed(_best(tmp_path), False, ["conv2"]) is None
    assert timed(_best(tmp_path), True, ["conv2"]) is None


def test_a_twin_that_cannot_be_timed_is_none_and_removed(tmp_path):
    """A predictor that fails (a twin onnxruntime will not load) costs the timing only: None, so the s8
    candidates are tried, and no twin file left behind; a full disk is not a timing failure."""
    seen = []

    def broken(path, threads):
        seen.append(path.exists())
        raise RuntimeError("onnxruntime could not load it")

    timed = _timer(tmp_path, broken)
    assert timed(_best(tmp_path), False, []) is None
    assert seen == [True] and not (tmp_path / "s8-twin.onnx").exists()

    def full(path, threads):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        _timer(tmp_path, full)(_best(tmp_path), False, [])
    assert not (tmp_path / "s8-twin.onnx").exists()
