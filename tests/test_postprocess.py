"""Postprocessing on outputs laid out as real exported detectors and embedders lay them out."""
from __future__ import annotations

import numpy as np

from lepton_edge.bundle import InputSpec
from lepton_edge.runtime import postprocess as post

SPEC = InputSpec(name="images", shape=[1, 3, 640, 640], resize="letterbox")


def _yolo_v8(boxes_cxcywh, class_scores) -> np.ndarray:
    """[1, 4+nc, N], as Ultralytics exports detect models (with 200 empty candidates after the given ones)."""
    rows = np.concatenate([np.asarray(boxes_cxcywh, np.float32), np.asarray(class_scores, np.float32)], 1)
    return np.concatenate([rows, np.zeros((200, rows.shape[1]), np.float32)]).T[None]


def test_yolo_v8_layout_nms_and_letterbox_undone():
    # frame 1280x720 letterboxed into 640x640: scale 0.5, 140 px bars top and bottom
    boxes = [[320, 320, 100, 50], [322, 321, 100, 50], [100, 200, 40, 40], [500, 500, 20, 20]]
    scores = [[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.1, 0.05]]
    dets = post.detect([_yolo_v8(boxes, scores)], SPEC, (720, 1280), ["person", "dog"])
    assert [d["label"] for d in dets] == ["person", "dog"]  # the overlapping twin is suppressed, the weak one dropped
    x1, y1, x2, y2 = dets[0]["box"]
    assert (x1, y1, x2, y2) == (540.0, 310.0, 740.0, 410.0)
    assert dets[0]["score"] == np.float32(0.9)


def test_yolo_v5_layout_uses_objectness():
    rows = np.array([[320, 320, 100, 100, 0.5, 0.9, 0.1], [100, 100, 50, 50, 0.95, 0.2, 0.9]], np.float32)
    rows = np.concatenate([rows, np.zeros((100, 7), np.float32)])[None]  # [1, N, 5+nc]
    dets = post.detect([rows], SPEC, (640, 640), None, conf=0.3)
    assert [(d["class"], round(d["score"], 3)) for d in dets] == [(1, 0.855), (0, 0.45)]


def test_ssd_postprocessed_layout_tflite_order():
    # TFLite_Detection_PostProcess: boxes [1,N,4] normalised ymin,xmin,ymax,xmax; classes; scores; count
    boxes = np.array([[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0, 0, 0, 0]]], np.float32)
    classes = np.array([[2.0, 0.0, 0.0]], np.float32)
    scores = np.array([[0.8, 0.3, 0.0]], np.float32)
    count = np.array([2.0], np.float32)
    spec = InputSpec(name="x", shape=[1, 300, 300, 3], layout="NHWC")
    dets = post.detect([boxes, classes, scores, count], spec, (300, 600), ["a", "b", "car"], conf=0.25)
    assert [d["label"] for d in dets] == ["car", "a"]
    assert dets[0]["box"] == [120.0, 30.0, 360.0, 150.0]


def test_ssd_with_one_detection_slot_reads_the_count_not_the_class():
    """TFLite_Detection_PostProcess with max_detections=1 (one face, one plate): classes, scores and the count
    are one value each. The count was taken from the classes output, so a class-0 detection was dropped
    (count 0) and a class-2 one claimed two boxes."""
    boxes = np.array([[[0.1, 0.2, 0.5, 0.6]]], np.float32)
    spec = InputSpec(name="x", shape=[1, 300, 300, 3], layout="NHWC")
    for cls in (0.0, 2.0):
        dets = post.detect([boxes, np.array([[cls]], np.float32), np.array([[0.9]], np.float32),
                            np.array([1.0], np.float32)], spec, (300, 300), None, conf=0.25)
        assert [(d["class"], d["box"]) for d in dets] == [(int(cls), [60.0, 30.0, 180.0, 150.0])], cls
    none = post.detect([boxes, np.array([[0.0]], np.float32), np.array([[0.9]], np.float32),
                        np.array([0.0], np.float32)], spec, (300, 300), None, conf=0.25)
    assert none == []  # a count of 0: the slot is padding


def test_ssd_torchvision_style_absolute_boxes_int_labels():
    boxes = np.array([[10, 20, 110, 220], [0, 0, 5, 5]], np.float32)
    labels = np.array([3, 1], np.int64)
    scores = np.array([0.9, 0.1], np.float32)
    spec = InputSpec(name="x", shape=[1, 3, 320, 320])
    dets = post.detect([boxes, labels, scores], spec, (320, 320), None)
    assert len(dets) == 1 and dets[0]["class"] == 3 and dets[0]["box"] == [10.0, 20.0, 110.0, 220.0]


def test_classify_softmax_and_probabilities():
    logits = np.array([[1.0, 3.0, -2.0]], np.float32)
    top = post.classify([logits], ["a", "b", "c"], k=2)
    assert [t["label"] for t in top] == ["b", "a"] and abs(top[0]["score"] - 0.8756) < 1e-3
    probs = np.array([[0.1, 0.2, 0.7]], np.float32)
    assert post.classify([probs], None, k=1)[0] == {"index": 2, "label": "2", "score": np.float32(0.7).item()}
    big = np.random.default_rng(0).standard_normal((1, 1000)).astype(np.float32)
    assert post.classify([big], None, k=3)[0]["index"] == int(big.argmax())


def test_embeddings_fit_in_256_bytes_and_keep_neighbours():
    rng = np.random.default_rng(0)
    for dim in (64, 256, 1280):
        feats = rng.standard_normal((200, dim)).astype(np.float32)
        feats[100:] = feats[:100] + 0.3 * rng.standard_normal((100, dim))  # near-duplicates of the first half
        res = [post.embed([f[None]]) for f in feats]
        assert all(r["bytes"] <= 256 and r["dims"] == min(dim, 256) for r in res)
        codes = np.stack([post.decode_embedding(r["int8_b64"]) for r in res])
        sim = codes[100:] @ codes[:100].T
        assert (sim.argmax(1) == np.arange(100)).all()  # every near-duplicate still finds its original
        if dim <= 256:
            exact = feats / np.linalg.norm(feats, axis=1, keepdims=True)
            assert np.abs((codes * exact).sum(1) - 1).max() < 1e-3


def test_a_large_output_embeds_through_a_sketch_without_a_dense_matrix():
    """Past DENSE_PROJECTION_MAX values (a 512x512 segmentation map, 196k features) the projection is a
    count sketch: O(dim) memory, where the dense matrix took 2 GB at 196k values. Near-duplicates still
    find their originals and cosines are kept roughly (a random projection to 256 values)."""
    import resource

    rng = np.random.default_rng(1)
    dim = 200_000
    base = rng.standard_normal((20, dim)).astype(np.float32)
    near = base + 0.3 * rng.standard_normal((20, dim)).astype(np.float32)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = [post.embed([f[None]]) for f in np.concatenate([base, near])]
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grew_mb < 100, grew_mb  # a dense 200k x 256 float64 matrix alone is 410 MB
    assert all(r["bytes"] == 256 for r in res)
    codes = np.stack([post.decode_embedding(r["int8_b64"]) for r in res])
    sim = codes[20:] @ codes[:20].T
    assert (sim.argmax(1) == np.arange(20)).all()
    exact = np.sum(base * near, 1) / np.linalg.norm(base, axis=1) / np.linalg.norm(near, axis=1)  # ~0.96
    assert np.abs(np.diag(sim) - exact).max() < 0.1
    assert post.embed([base[:1]]) == res[0]  # the same sketch every time (seeded): codes compare across devices
    assert res[0]["projection"] == "count-sketch"  # and says so: codes compare only with codes made the same way
    assert post.embed([base[:1, :1280]])["projection"] == "dense" and "projection" not in post.embed([base[:1, :64]])


def test_classify_ties_go_to_the_lowest_index_on_every_cpu():
    """An int8 softmax dequantizes to a few distinct values: 1000 classes tie. The top-k must not depend
    on argpartition's SIMD-dependent order among equals (arm64 and x86 gave different top-1s)."""
    rng = np.random.default_rng(0)
    for n in (10, 1000):
        f = np.full(n, 1 / 256, np.float32)
        hot = rng.choice(n, 3, replace=False)
        f[hot] = [5 / 256, 5 / 256, 9 / 256]
        f = f / f.sum()
        res = post.classify([f[None]], k=5)
        top = [r["index"] for r in res]
        hi, tied = hot[2], sorted(hot[:2])
        rest = [i for i in range(n) if i not in hot][:2]
        assert top == [int(hi), *map(int, tied), *rest]
        # a permutation of the equal values must not change which indices win
        assert [r["index"] for r in post.classify([f[None].copy()], k=5)] == top
