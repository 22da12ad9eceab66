"""How validation lines up a model's outputs over many calls, and what it refuses to judge against."""
from __future__ import annotations

import numpy as np
import pytest

from lepton_edge.errors import BadInput
from lepton_edge.exporters.validation import _finite_reference, batched, stack_outputs


def test_outputs_of_many_calls_stack_along_the_first_axis():
    parts = [[np.ones((1, 3, 4)), np.array(2.0)], [np.zeros((2, 3, 4)), np.array(3.0)]]
    out = stack_outputs(parts)
    assert out[0].shape == (3, 3, 4) and out[1].tolist() == [2.0, 3.0]  # a 0-d output: one value a call


@pytest.mark.parametrize("shapes", [[(1, 10, 4), (1, 11, 4)], [(2, 7), (2, 9)]])
def test_an_output_whose_size_follows_the_data_is_one_line(shapes):
    """A detector with NMS in the graph ([1, K, 4]) or NonZero's [2, K]: numpy's traceback, now one line."""
    with pytest.raises(BadInput) as e:
        stack_outputs([[np.zeros(s)] for s in shapes])
    said = str(e.value)
    assert said.startswith("output 0's shape depends on the input") and "cannot be compared with fp32's" in said
    assert said.endswith("export the model without that step (the runtime decodes boxes from a detector's raw head)")


def test_a_reference_with_nan_says_on_how_many_inputs():
    out = np.ones((5, 3), np.float32)
    out[[1, 3], 0] = np.nan
    with pytest.raises(BadInput, match=r"^the fp32 model's output 'y' is NaN on 2 of 5 validation inputs: check"):
        _finite_reference([out], [{"name": "y"}])
    with pytest.raises(BadInput, match=r"output '0' is NaN on 1 of 1 validation inputs"):
        _finite_reference([np.float32("nan")], [])


def _model_of(outputs_of):
    """A predictor whose outputs for a batch are `outputs_of(batch)` (arrays made per call, as an engine's)."""
    return lambda xb: outputs_of(np.asarray(xb))


def test_batched_outputs_equal_the_stacked_calls_in_every_case():
    x = np.arange(20, dtype=np.float32).reshape(20, 1)
    got = batched(_model_of(lambda xb: [xb * 2, np.float32(xb.sum())]), x, 8)  # a 0-d output: one value a call
    assert got[0].tolist() == (x * 2).tolist() and got[1].tolist() == [28.0, 92.0, 70.0]
    same = batched(_model_of(lambda xb: [xb[:, :, None] + np.zeros((1, 1, 3), np.float32)]), x, 8)
    assert same[0].shape == (20, 1, 3) and same[0].dtype == np.float32 and same[0][19, 0, 2] == 19.0
    calls = iter([np.zeros((8, 4)), np.zeros((8, 4)), np.zeros((4, 5))])  # the shape changes after two calls
    with pytest.raises(BadInput, match=r"^output 0's shape depends on the input"):
        batched(_model_of(lambda xb: [next(calls)]), x, 8)


def test_batched_outputs_are_not_held_twice():
    """The calls' parts and their concatenation were held together: twice the outputs at the peak."""
    import tracemalloc

    x = np.zeros((64, 1), np.float32)
    tracemalloc.start()
    try:
        out = batched(_model_of(lambda xb: [np.ones((len(xb), 1 << 18), np.float32)]), x, 8)  # 1 MiB an input
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out[0].shape == (64, 1 << 18) and out[0].sum() == 64 * (1 << 18)
    assert peak < 1.3 * out[0].nbytes, f"peak {peak / 2**20:.0f} MiB for {out[0].nbytes / 2**20:.0f} MiB of outputs"


def test_rows_that_follow_the_data_without_a_batch_axis_are_one_line():
    """[K, 4] (NonZero's boxes, no batch axis): joined, the rows looked like a batch; every int8 candidate then
    failed on numpy's broadcast error and fp16 ended in a traceback. The calls' inputs show it up front."""
    parts = [[np.zeros((96, 4))], [np.zeros((98, 4))]]
    with pytest.raises(BadInput, match=r"^output 0's size depends on the input \(96 rows from 1 input\(s\) on one "
                                       r"call, 98 from 1 on another\): an output whose size follows the data"):
        stack_outputs(parts, [1, 1])
    # rows that follow the batch, a last call of fewer inputs, and a 0-d output (one value a call) all line up
    assert stack_outputs([[np.zeros((8, 4)), np.array(1.0)], [np.zeros((4, 4)), np.array(2.0)]], [8, 4])[0].shape == \
        (12, 4)
    x = np.zeros((10, 1), np.float32)
    with pytest.raises(BadInput, match=r"^output 0's size depends on the input"):
        batched(_model_of(lambda xb: [np.zeros((int(xb.shape[0]) * 3 + (len(xb) == 2), 4))]), x, 4)


def test_an_artifact_whose_rows_differ_from_fp32s_fails_its_check():
    from lepton_edge.exporters.task_metrics import structure

    rows = structure([np.zeros((1977, 4))], [np.zeros((1974, 4))], [{"name": "boxes"}], [{"name": "boxes"}], True)
    assert rows[0]["why"] == "output boxes: 1974 rows != fp32's 1977"


def test_an_output_whose_type_changes_between_calls_is_one_line_naming_the_types():
    with pytest.raises(BadInput) as e:
        stack_outputs([[np.zeros((1, 4), np.float32)], [np.zeros((1, 4), np.float16)]])
    assert str(e.value) == ("output 0's type depends on the input (float16 on one call, float32 on another): it "
                            "cannot be compared with fp32's")


def _fit_data(n: int):
    from types import SimpleNamespace

    x = np.zeros((n, 2), np.float32)
    return SimpleNamespace(check_x=x, eval_x=x, eval_y=np.arange(n), split={"validation_inputs": "held out"},
                           check_kind="held-out data")


def test_validation_keeps_the_inputs_whose_outputs_fit_after_the_search_margin():
    """fit_outputs keeps SEARCH_MARGIN (512 MiB) out of what the budget leaves, then as many inputs as
    OUTPUT_COPIES copies of their outputs fit; eval data that is the validation data is cut with it."""
    from lepton_edge.exporters import validation as val
    from lepton_edge.memory import rss_bytes

    per = (64 << 20) // val.OUTPUT_COPIES  # 64 MiB of copies an input
    out = np.zeros(per // 4, np.float32)
    data = _fit_data(40)
    val.fit_outputs(lambda x: [out], data, rss_bytes() + (2 << 30))  # 2 GiB free: 1.5 GiB after the margin
    fit = len(data.check_x)
    assert 23 <= fit <= 24, fit  # 1.5 GiB / 64 MiB (the margin left out: 32)
    assert data.eval_x is data.check_x and len(data.eval_y) == fit
    assert data.split["validation_inputs"] == (f"held out (the first {fit}: the outputs of more would not fit the "
                                               "memory budget)")


def test_outputs_no_budget_can_hold_are_refused_naming_what_is_left():
    from lepton_edge.errors import CheckFailed
    from lepton_edge.exporters import validation as val
    from lepton_edge.ui import human

    data, per, budget = _fit_data(40), 1 << 20, 1 << 20  # a budget under what the process holds: 0 B left
    with pytest.raises(CheckFailed) as e:
        val.fit_outputs(lambda x: [np.zeros(per // 4, np.float32)], data, budget)
    assert str(e.value) == (f"the model's outputs take {human(per)} an input: validating on 8 inputs needs about "
                            f"{human(val.OUTPUT_COPIES * per * 8)} (fp32's and a candidate's outputs and the metrics' "
                            f"working copies: {val.OUTPUT_COPIES}x), over the 0 B the export's memory budget leaves "
                            f"({human(budget)}, --max-memory): give it more, or export a model with smaller outputs")
    assert len(data.check_x) == 40


def test_an_output_whose_shape_changes_names_both_shapes():
    with pytest.raises(BadInput) as e:
        stack_outputs([[np.zeros((1, 3, 4))], [np.zeros((1, 3, 5))]])
    assert str(e.value).startswith("output 0's shape depends on the input ([N, 3, 4] on one, [N, 3, 5] on another): ")


def test_exactly_the_fewest_inputs_that_may_validate_are_kept_not_refused():
    """fit_outputs refuses only below MIN_CHECK_INPUTS: where exactly that many inputs' outputs fit, it
    validates on them. (The outputs are broadcast views: their size counts, no memory is taken.)"""
    from lepton_edge.exporters import validation as val
    from lepton_edge.memory import rss_bytes

    left = (2 << 30) - val.SEARCH_MARGIN  # what 2 GiB free leaves after the margin
    per = int(left / (val.MIN_CHECK_INPUTS + 0.5)) // val.OUTPUT_COPIES  # 8.5 inputs' outputs fit: 8 kept
    out = np.broadcast_to(np.float32(0), (per // 4,))
    data = _fit_data(40)
    val.fit_outputs(lambda x: [out], data, rss_bytes() + (2 << 30))
    assert len(data.check_x) == val.MIN_CHECK_INPUTS


def _fixed(out):
    """A predictor that returns `out`'s first rows for a batch, as a deterministic model would."""
    return lambda x: [o[: len(x)] for o in out]


def test_a_reference_that_repeats_itself_passes_and_one_that_moves_is_one_line():
    from lepton_edge.exporters.validation import _repeatable_reference

    x = np.random.default_rng(0).random((6, 3, 4, 4), dtype=np.float32)
    outs = [np.arange(12, dtype=np.float32).reshape(6, 2) + 1, np.arange(6, dtype=np.int64)]
    _repeatable_reference(_fixed(outs), x, outs, 4, [{"name": "a"}, {"name": "b"}])  # the same: no line
    nudged = [outs[0] * (1 + 1e-6), outs[1]]  # (another summation order moves the last bits: still the same)
    _repeatable_reference(_fixed(nudged), x, outs, 4, [{"name": "a"}, {"name": "b"}])
    moved = [outs[0] * np.float32(1.01), outs[1]]
    with pytest.raises(BadInput) as e:
        _repeatable_reference(_fixed(moved), x, outs, 4, [{"name": "scores"}, {"name": "b"}])
    said = str(e.value)
    assert "output 'scores' moved by up to 0.02, on values up to 2" in said and "training mode" in said, said
    late = [outs[0].copy(), outs[1]]
    late[0][5] += 1  # (a row past the batch run again: not compared, as it was not run again)
    _repeatable_reference(_fixed(late), x, outs, 4, [{"name": "a"}, {"name": "b"}])
    first = [outs[0].copy(), outs[1]]
    first[0][0, 0] += 0.01  # (the first row: compared)
    with pytest.raises(BadInput):
        _repeatable_reference(_fixed(first), x, outs, 4, [{"name": "a"}, {"name": "b"}])
    labels = [outs[0], outs[1].copy()]
    labels[1][2] += 1  # an integer output (an argmax) that moves: compared exactly
    with pytest.raises(BadInput, match="output 'b' moved"):
        _repeatable_reference(_fixed(labels), x, outs, 4, [{"name": "a"}, {"name": "b"}])
    logs = [outs[0].copy(), outs[1]]
    logs[0][1, 1] = -np.inf  # a log of 0 in the reference: the same infinity again is no move...
    _repeatable_reference(_fixed(logs), x, logs, 4, [{"name": "a"}, {"name": "b"}])
    elsewhere = [logs[0].copy(), outs[1]]
    elsewhere[0][1, 1], elsewhere[0][1, 0] = 4.0, -np.inf  # ...one somewhere else is
    with pytest.raises(BadInput, match="output 'a' moved\\)"):
        _repeatable_reference(_fixed(elsewhere), x, logs, 4, [{"name": "a"}, {"name": "b"}])


def test_outputs_that_ignore_differing_inputs_are_one_line():
    from lepton_edge.exporters.validation import _reference_follows_inputs

    x = np.random.default_rng(0).random((5, 3, 4, 4), dtype=np.float32)
    same = [np.ones((5, 2), np.float32), np.zeros((5, 3, 4), np.float32)]
    with pytest.raises(BadInput) as e:
        _reference_follows_inputs(same, x, [{"name": "out"}, {"name": "map"}], "gain = [0.0] (zeros)")
    said = str(e.value)
    assert said.startswith("the fp32 model gives the same outputs ('out', 'map') for all 5 validation inputs, "
                           "which differ: it ignores its image"), said
    assert said.endswith("its other inputs are fed gain = [0.0] (zeros): give the values it needs with --input-value")
    # without constants fed, outputs alike for every input are a model that finds nothing in them (a detector
    # on random inputs): the task's metrics judge that, no line here
    _reference_follows_inputs(same, x, [{"name": "out"}, {"name": "map"}])
    fed = "gain = [0.0] (zeros)"
    one_moves = [same[0], same[1].copy()]
    one_moves[1][4, 0, 0] = 1  # one output follows the last input: the model does not ignore its image
    _reference_follows_inputs(one_moves, x, [{"name": "out"}, {"name": "map"}], fed)
    _reference_follows_inputs(same, np.repeat(x[:1], 5, 0), [{"name": "out"}], fed)  # the inputs are all one
    _reference_follows_inputs([o[:1] for o in same], x[:1], [{"name": "out"}], fed)  # one input shows nothing
    _reference_follows_inputs([*same, np.arange(7)], x, [{"name": "out"}], fed)  # (a [K] output: cannot tell)


@pytest.mark.parametrize("task", ["classify", "embed"])
def test_a_classifier_whose_outputs_ignore_differing_inputs_is_one_line(task):
    """A classifier with zeroed weights gave 0.1 for every class of every photo, and its int8 export passed at
    top-1 agreement 1.0: constant outputs pass any classify or embed gate. Other tasks' constant outputs are a
    model finding nothing (a detector on photos without its objects): their metrics judge that."""
    from lepton_edge.exporters.validation import _reference_follows_inputs

    x = np.random.default_rng(0).random((5, 3, 4, 4), dtype=np.float32)
    same = [np.full((5, 10), 0.1, np.float32)]
    with pytest.raises(BadInput) as e:
        _reference_follows_inputs(same, x, [{"name": "logits"}], task=task)
    assert str(e.value) == ("the fp32 model gives the same outputs ('logits') for all 5 validation inputs, which "
                            f"differ: it ignores its image (untrained or zeroed weights?), so its {task} gate could "
                            "not fail and nothing can be validated: export a trained model (or, as it is, with "
                            "--task raw)")
    for other in ("detect", "segment", "raw", None):
        _reference_follows_inputs(same, x, [{"name": "logits"}], task=other)
    varied = [same[0].copy()]
    varied[0][3, 2] = 0.2
    _reference_follows_inputs(varied, x, [{"name": "logits"}], task=task)  # one input moves it: no line
    sure = [np.tile(np.array([[1.0, 0.0]], np.float32), (5, 1))]  # saturated: sure of every input, no line
    _reference_follows_inputs(sure, x, [{"name": "prob"}], task=task)
    zeros = [np.zeros((5, 10), np.float32)]  # all-zero logits (zeroed weights and biases): sure of nothing
    with pytest.raises(BadInput):
        _reference_follows_inputs(zeros, x, [{"name": "logits"}], task=task)


def test_a_classifier_that_barely_sees_its_inputs_is_one_line():
    """A TorchScript model taking 0..255 pixels (x.float() / 127.5 - 1 inside) fed 0..1: every photo nearly
    black, its scores moved by 0.001 across 56 photos, and int8 passed at top-1 agreement 1.0."""
    from lepton_edge.exporters.validation import _barely_follows

    rng = np.random.default_rng(0)
    x = rng.random((56, 3, 8, 8), dtype=np.float32)
    logits = rng.normal(0, 1, (1, 5)) + 1e-4 * rng.normal(0, 1, (56, 5))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for out in (logits, probs):
        with pytest.raises(BadInput) as e:
            _barely_follows(out.astype(np.float32), x, [{"name": "p"}], "classify")
        assert "hardly changes across the 56 validation inputs" in str(e.value) and "--std 0.00392156" in str(e.value)
    _barely_follows(logits.astype(np.float32), x, [{"name": "p"}], "raw")  # (a map or a measure may vary little)
    seen = rng.normal(0, 1, (1, 5)) + 0.2 * rng.normal(0, 1, (56, 5))  # a model that sees its inputs
    _barely_follows(seen.astype(np.float32), x, [{"name": "p"}], "classify")
    base = np.array([[2.0, -1.0, 0.5, 0.1, -0.3]])
    untrained = base + 0.004 * rng.normal(0, 1, (56, 5))  # an untrained classifier on random inputs: 0.009
    assert 0.005 < float((untrained.max(0) - untrained.min(0)).max()) / 2.0 < 0.02
    _barely_follows(untrained.astype(np.float32), x, [{"name": "p"}], "classify")
    sure = np.full((56, 4), 1e-6)  # a classifier sure of class 0 for every photo: its small scores still move
    sure[:, 1:] *= np.exp(rng.normal(0, 1, (56, 3)))
    sure[:, 0] = 1 - sure[:, 1:].sum(1)
    _barely_follows(sure.astype(np.float32), x, [{"name": "p"}], "classify")


def test_a_constant_first_output_is_not_read_as_the_scores():
    """An SSD-style constant ahead of the scores: top-1 agreement measured on it read 1.0 for an int8 model
    that kept the real scores' top-1 on 76 % of inputs. Inferred: raw; asked for classify: one line."""
    from lepton_edge.exporters import task_metrics as tm

    rng = np.random.default_rng(1)
    prior = np.tile(np.linspace(0.2, 0.01, 10, dtype=np.float32), (6, 1))
    scores = rng.normal(0, 1, (6, 10)).astype(np.float32)
    assert tm.constant_first([prior, scores]) and not tm.constant_first([scores, prior])
    assert not tm.constant_first([prior]) and not tm.constant_first([prior, prior])
    sure = np.tile(np.array([[0, 1, 0]], np.float32), (6, 1))  # a classifier sure of one class for every input
    assert not tm.constant_first([sure, scores])
    assert tm.infer_task([prior, scores], [{"name": "prior"}, {"name": "y"}], None) == "raw"
    assert tm.infer_task([scores, prior], [{"name": "y"}, {"name": "prior"}], None) == "classify"


def test_ceiling_noise_leaves_ids_alone_and_follows_features_own_scale():
    """0.01 in pixel units on token ids (rounded: other tokens) or on features of size 1e-3 took fp32's own
    agreement to 0.33 and 0.42, and an int8 model passed at 0.30 top-1 agreement on 2 classes."""
    from lepton_edge.exporters.validation import noise_unit, perturb

    ids = np.random.default_rng(0).integers(0, 1000, (8, 128))
    assert noise_unit(ids) == 0.0 and np.array_equal(perturb(ids, None, unit=0.0), ids)
    feats = (1e-3 * np.random.default_rng(1).standard_normal((8, 20))).astype(np.float32)
    unit = noise_unit(feats)
    assert unit == pytest.approx(float(feats.std()), rel=1e-6)
    moved = perturb(feats, None, unit=unit) - feats
    assert moved.dtype == np.float32 and 0.005 * unit < float(moved.std()) < 0.02 * unit
    assert noise_unit(np.zeros((8, 3, 4, 4), np.float32)) is None  # pictures: 0..1 pixel units, as before


def test_top1_agreement_is_never_required_below_halfway_from_chance():
    from types import SimpleNamespace

    from lepton_edge.exporters import task_metrics as tm

    rng = np.random.default_rng(2)
    ref_out = rng.normal(0, 1, (64, 2)).astype(np.float32)
    noisy = rng.normal(0, 1, (64, 2)).astype(np.float32)  # fp32 itself at chance under the noise: ceiling ~0.5
    guess = rng.normal(0, 1, (64, 2)).astype(np.float32)
    ref = SimpleNamespace(outputs=[ref_out], noisy=[noisy], eval_outputs=None, eval_y=None)
    th = SimpleNamespace(min_agreement=None, agreement_margin=0.05, min_confident_kept=0.99, min_top5=0.98,
                         max_accuracy_drop=0.5)
    metrics: dict = {}
    why = tm.classify(ref, [guess], None, th, metrics)
    assert metrics["top1_agreement_required"] == metrics["top1_agreement_floor"] == 0.75
    assert why and "halfway from chance" in why[0]
    assert not tm.classify(ref, [ref_out], None, th, {})


def test_a_reference_without_an_evaluation_set_holds_no_labels():
    """The classify metrics read the labelled evaluation set's labels only where the reference has them
    (task_metrics: `ref.eval_y is not None`): one made without such a set must hold none, not an empty value."""
    from lepton_edge.exporters.validation import Reference

    ref = Reference([np.zeros((2, 3))], [{"name": "out"}])
    assert ref.eval_y is None and ref.eval_outputs is None and ref.noisy is None


def test_a_nan_reference_with_inputs_fed_constants_names_those_first():
    """A temperature input fed 0 made every output NaN, and the line blamed the weights and --mean/--std."""
    out = [np.full((4, 3), np.nan, np.float32)]
    with pytest.raises(BadInput) as e:
        _finite_reference(out, [{"name": "y"}], "'temperature:0' = 0")
    assert "check the values its other inputs are fed ('temperature:0' = 0: --input-value)" in str(e.value)
    with pytest.raises(BadInput) as e:
        _finite_reference(out, [{"name": "y"}])
    assert "--input-value" not in str(e.value)
