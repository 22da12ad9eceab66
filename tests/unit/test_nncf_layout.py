"""The prediction of which layers NNCF's graph leaves with a float output (compress/nncf_layout.py),
on small graphs with each pattern it reads, and where it moves NNCF in the int8 search."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lepton_edge.compress import nncf_layout  # noqa: E402


def _model(after: list[list[tuple]], const_weights: bool = True):
    """Conv layers in a row on a [1,4,8,8] input, each followed by the nodes in `after[i]`: tuples
    (op, inputs, outputs) where "{c}" is the conv's output and "{y}" the value the next conv reads."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(3.0, np.float32), "three")]
    nodes, x = [], "x"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])]
    for i, tail in enumerate(after):
        w, c, y = f"w{i}", f"c{i}", f"y{i}"
        if const_weights:
            inits.append(numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), w))
        else:
            inputs.append(helper.make_tensor_value_info(w, TensorProto.FLOAT, [4, 4, 1, 1]))
        nodes.append(helper.make_node("Conv", [x, w], [c]))
        if not tail:
            nodes.append(helper.make_node("Identity", [c], [y]))
        for op, ins, outs in tail:
            nodes.append(helper.make_node(op, [s.format(c=c, y=y, x=x, i=i) for s in ins],
                                          [s.format(c=c, y=y, i=i) for s in outs]))
        x = y
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


HARDSWISH = [("HardSwish", ["{c}"], ["{y}"])]
HARDSWISH_AS_MUL = [("HardSigmoid", ["{c}"], ["h{i}"]), ("Mul", ["{c}", "h{i}"], ["{y}"])]
SILU = [("Sigmoid", ["{c}"], ["s{i}"]), ("Mul", ["{c}", "s{i}"], ["{y}"])]
RELU = [("Relu", ["{c}"], ["{y}"])]
RELU6_THEN_HARDSIGMOID = [("Clip", ["{c}"], ["r{i}"]), ("HardSigmoid", ["r{i}"], ["{y}"])]
BIAS_ADD = [("Add", ["{c}", "three"], ["{y}"])]
RESIDUAL_ADD = [("Add", ["{c}", "{x}"], ["{y}"])]


@pytest.mark.parametrize("tail,floats", [
    (HARDSWISH, True), (HARDSWISH_AS_MUL, True), (SILU, True), (BIAS_ADD, True),
    (RELU, False), (RELU6_THEN_HARDSIGMOID, False), (RESIDUAL_ADD, False), ([], False)])
def test_a_layer_is_float_where_nncf_fuses_what_follows_it(tail, floats):
    """NNCF fuses a layer with an activation or a constant's arithmetic after it and quantizes after those;
    onnxruntime folds a Relu/Clip into the quantized layer (what follows those is not read: the prediction
    undercounts rather than guess), and a residual Add's inputs are quantized."""
    found = nncf_layout.predict(_model([tail, RELU]))
    assert (found.float_layers, found.layers) == (int(floats), 2)


def test_most_layers_float_is_what_moves_nncf():
    assert nncf_layout.predict(_model([HARDSWISH, SILU, RELU])).mostly
    assert nncf_layout.predict(_model([HARDSWISH, RELU])).mostly  # half counts
    assert not nncf_layout.predict(_model([HARDSWISH, RELU, RELU])).mostly
    assert not nncf_layout.predict(_model([RELU, RELU])).mostly
    # a convolution whose weights are an input is no layer NNCF quantizes with int8 weights
    assert nncf_layout.predict(_model([HARDSWISH, SILU], const_weights=False)).layers == 0
    assert not nncf_layout.predict(_model([HARDSWISH], const_weights=False)).mostly


def test_nncf_goes_after_two_of_onnxruntimes_candidates():
    from lepton_edge.exporters import recipes as r

    x86 = ["nncf-default", "u8-minmax", "u8-percentile", "nncf-mixed", "s8-minmax-ends", "s8-entropy-ends"]
    order = [(n, False) for n in x86] + [("u8-minmax-sensitive", True)]
    assert [n for n, _ in r._nncf_after_two(order)] == [
        "u8-minmax", "u8-percentile", "nncf-default", "nncf-mixed", "s8-minmax-ends", "s8-entropy-ends",
        "u8-minmax-sensitive"]
    assert r._nncf_after_two([("nncf-default", False), ("u8-minmax", False)]) == [
        ("u8-minmax", False), ("nncf-default", False)]


def test_nncf_is_not_started_only_after_a_candidate_no_slower_than_fp32():
    from lepton_edge.compress.quantize import Recipe
    from lepton_edge.exporters import recipes as r

    mostly = nncf_layout.FloatLayers(40, 64)
    speeds = r._Speeds(50.0, mostly)
    nncf = Recipe.parse("nncf-default")
    assert speeds.outranked(nncf, "u8-minmax") is None  # nothing timed yet
    speeds.passed(Recipe.parse("u8-minmax"), "u8-minmax", True, {"vs_fp32": 0.87, "slower_than_fp32": False}, True)
    why = speeds.outranked(nncf, "u8-minmax")
    assert why and "40 of 64 layers" in why and "u8-minmax" in why and "0.87x" in why
    assert speeds.outranked(Recipe.parse("s8-minmax-ends"), "u8-minmax") is None  # onnxruntime's: tried
    slow = r._Speeds(50.0, mostly)  # the best slower than fp32, or over the budget: NNCF may beat it
    slow.passed(Recipe.parse("u8-minmax"), "u8-minmax", True, {"vs_fp32": 1.4, "slower_than_fp32": True}, True)
    assert slow.outranked(nncf, "u8-minmax") is None
    over = r._Speeds(50.0, mostly)
    over.passed(Recipe.parse("u8-minmax"), "u8-minmax", False, {"vs_fp32": 0.9, "slower_than_fp32": False}, True)
    assert over.outranked(nncf, "u8-minmax") is None
    kept = r._Speeds(50.0, None)  # most layers not predicted float: NNCF keeps its place and its chance
    kept.passed(Recipe.parse("u8-minmax"), "u8-minmax", True, {"vs_fp32": 0.87, "slower_than_fp32": False}, True)
    assert kept.outranked(nncf, "u8-minmax") is None


def test_patience_counts_by_place_in_the_given_order():
    """Against the best, patience counts the candidates judged (or not started as outranked) whose place in
    the given order is after the best's: with NNCF moved back, onnxruntime's two tried before it count
    (they came after it), and NNCF not started behind an onnxruntime best counts only if it came after."""
    from lepton_edge.exporters import recipes as r

    within, over = r.SearchResult(rank_key=(True,)), r.SearchResult(rank_key=(False,))
    tally = r._Patience()
    assert tally.used(None) == 0
    for place in (1, 2, 0):  # u8-minmax, u8-percentile, then nncf-default (place 0) passes
        tally.count(place)
    tally.best_place = 0
    assert tally.used(within) == 2 and tally.used(over) == 0  # over the latency budget: patience waits
    tally.best_place = 2  # u8-percentile the best: nncf-default (0) was before it, nncf-mixed (3) after
    tally.count(3)
    assert tally.used(within) == 1
