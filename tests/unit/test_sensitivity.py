"""The sensitivity pass charges each layer with the noise it adds, not with the noise it receives.

Why this test: a layer whose input comes from an activation that is not itself a layer (Relu,
HardSwish written as Add/Clip/Mul/Div) used to be charged as if its input were clean, so on a
PicoDet detector every such convolution "lost" ~57 dB and the ranking named the wrong layers to
keep in float."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lepton_edge.compress import quantize as q, sensitivity as sens


def _conv(name: str, x: str, w: np.ndarray, y: str) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    return helper.make_node("Conv", [x, f"{name}.w"], [y], name=name), numpy_helper.from_array(w, f"{name}.w")


def _model(path) -> None:
    """conv1 makes a loud channel and a quiet one; an activation that is no layer (Abs: onnxruntime
    neither quantizes nor removes it, as it does a Relu after a Conv); `culprit` reads only the quiet
    channel, x1000, so per-tensor quantization of its input (scaled to the loud channel) ruins it;
    Abs; `benign` averages the culprit's output. Only the culprit adds noise of its own."""
    w1 = np.array([100.0, 0.01], np.float32).reshape(2, 1, 1, 1)
    w2 = np.array([[0.0, 1000.0], [0.0, -1000.0]], np.float32).reshape(2, 2, 1, 1)
    w3 = np.full((1, 2, 1, 1), 0.5, np.float32)
    nodes, inits = zip(_conv("conv1", "x", w1, "a"), _conv("culprit", "a_abs", w2, "b"),
                       _conv("benign", "b_abs", w3, "y"))
    g = helper.make_graph(
        [nodes[0], helper.make_node("Abs", ["a"], ["a_abs"], name="abs1"), nodes[1],
         helper.make_node("Abs", ["b"], ["b_abs"], name="abs2"), nodes[2]], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, 8, 8])], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))


def test_the_layer_that_adds_the_noise_ranks_first(tmp_path):
    fp32, qdq = tmp_path / "m.onnx", tmp_path / "q.onnx"
    _model(fp32)
    x = np.random.default_rng(0).uniform(0.1, 1.0, (16, 1, 8, 8)).astype(np.float32)
    res = q.quantize_int8(fp32, qdq, x, q.Recipe.parse("u8-minmax"))
    lost = dict(sens.sensitivity(fp32, res.path, x, res.names))
    ranked = sorted(lost, key=lambda n: -lost[n])
    assert ranked[0] == "culprit", lost
    assert lost["culprit"] > 10  # its quiet input channel is a step or two of the loud one's scale
    assert abs(lost["benign"]) < 3, lost  # noisy in, as noisy out: nothing of its own (was charged 60 dB)
    assert lost["conv1"] < 10, lost  # its input's and output's 8-bit steps, no more


def _quantized(tmp_path) -> tuple:
    fp32, qdq = tmp_path / "m.onnx", tmp_path / "q.onnx"
    _model(fp32)
    x = np.random.default_rng(0).uniform(0.1, 1.0, (16, 1, 8, 8)).astype(np.float32)
    return fp32, q.quantize_int8(fp32, qdq, x, q.Recipe.parse("u8-minmax")), x


def test_a_budget_that_cannot_hold_one_inputs_layer_outputs_stops_the_pass_before_it_runs(tmp_path):
    """Its batches are held in native code that no check stops: the budget is checked before them."""
    from lepton_edge.compress import calibration as cal

    fp32, res, x = _quantized(tmp_path)
    checks = []
    with pytest.raises(cal.MemoryExceeded, match=r"sensitivity pass needs about .* --max-memory"):
        sens.sensitivity(fp32, res.path, x, res.names, lambda: checks.append(1), budget=cal.rss_bytes())
    assert not checks  # no batch was started


def test_the_memory_check_runs_before_every_batch_and_stops_the_pass(tmp_path):
    from lepton_edge.compress import calibration as cal

    fp32, res, x = _quantized(tmp_path)
    checks: list[int] = []
    free = sens.sensitivity(fp32, res.path, x, res.names, lambda: checks.append(1))
    assert len(checks) == 1 + -(-15 // sens.BATCH)  # one input first, then full batches
    # a budget that holds the outputs of one input at a time gives the same ranking, batch by batch
    tight: list[int] = []
    orig = sens.batch_size
    try:
        sens.batch_size = lambda per_input, headroom: 1
        one = sens.sensitivity(fp32, res.path, x, res.names, lambda: tight.append(1),
                               budget=cal.rss_bytes() + (1 << 30))
        assert [n for n, _ in one] == [n for n, _ in free]
        assert [d for _, d in one] == pytest.approx([d for _, d in free], rel=1e-6, abs=1e-9)
    finally:
        sens.batch_size = orig
    assert len(tight) == len(x)

    def over() -> None:
        checks.append(1)
        if len(checks) > 2:
            raise cal.MemoryExceeded("over the budget")

    checks.clear()
    with pytest.raises(cal.MemoryExceeded):
        sens.sensitivity(fp32, res.path, x, res.names, over)
    assert len(checks) == 3


def test_a_sensitivity_batch_takes_at_most_half_the_headroom():
    assert sens.batch_size(100, None) == sens.BATCH
    assert sens.batch_size(100, 10_000) == sens.BATCH
    assert sens.batch_size(100, 600) == 3
    assert sens.batch_size(100, 250) == 1
    assert sens.batch_size(100, 50) == 1  # (one input fits: the pass checked that before)


def _wide_middle(path) -> None:
    """conv1 -> 64 copies of its output side by side (16 MB an input, no layer's input or output) -> their
    mean -> conv2: the pass keeps only the layers' tensors, a run holds the wide one too."""
    w = numpy_helper.from_array(np.full((1, 1, 1, 1), 0.5, np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv1"),
             helper.make_node("Concat", ["a"] * 64, ["wide"], axis=1),
             helper.make_node("ReduceMean", ["wide"], ["r"], axes=[1], keepdims=1),
             helper.make_node("Conv", ["r", "w"], ["y"], name="conv2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 256, 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, 256, 256])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))


def test_batches_are_sized_by_a_runs_working_set_not_only_the_outputs_it_keeps(tmp_path, monkeypatch):
    """A run's intermediate tensors are freed by the time it returns: sized by the outputs kept and the RSS
    measured after the runs, batches of a model whose big activations are no layer's output went over the
    budget (260 MB: 284 MB in batches of 2, 242 MB in batches of 1)."""
    from lepton_edge.compress import calibration as cal

    fp32, qdq = tmp_path / "m.onnx", tmp_path / "q.onnx"
    _wide_middle(fp32)
    x = np.random.default_rng(0).uniform(0.1, 1.0, (8, 1, 256, 256)).astype(np.float32)
    res = q.quantize_int8(fp32, qdq, x, q.Recipe.parse("u8-minmax"))
    seen: list[int] = []
    monkeypatch.setattr(sens, "batch_size", lambda per_input, headroom: seen.append(per_input) or 1)
    # RSS as a sampler may see it after a short run: not grown at all (the allocator's reuse decides)
    monkeypatch.setattr(cal, "rss_bytes", lambda: 100 << 20)
    sens.sensitivity(fp32, res.path, x, res.names, budget=1 << 30)
    assert seen and seen[0] >= 64 * 256 * 256 * 4  # the wide tensor of one input, at least

