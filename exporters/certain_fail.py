"""Stop validating a candidate once the inputs judged so far fail it, whatever the others would give.

Why: the int8 search validates every candidate on all its validation inputs, and most candidates that
fail, fail by far (PP-OCR's recogniser on x86: onnxruntime's two at SQNR 8.1 and 9.0 dB against the 12
dB its gate asks), yet each ran to the last input: 1.4 s of a 24 s export, twice.

Only where the end is certain, and only for `raw` models, whose gate holds every float output that is
not labels to SQNR and cosine (`task_metrics._closeness_gate`) whatever its values: a `segment` model's
outputs are judged by mask IoU or by SQNR as their values make them probability maps or not, and its
masks need evidence on enough inputs, so judged on the inputs seen they could be judged otherwise. An
output held to SQNR and cosine fails when:
- SQNR: fp32's power over *every* input is known (the reference ran first), and the error can only grow
  with more inputs, so 10 log10(power of all / error so far) bounds the final SQNR from above;
- cosine: the gate reads the mean of per-input cosines, and an input not yet seen adds at most 1, so
  (sum so far + inputs left) / all bounds the final mean from above.
When either bound is below its threshold the candidate fails on all inputs as surely as on these. Its
verdict is then judged on the inputs seen, which fail by the same metric (each bound is above that
subset's own value), and says how many they were; should it pass there after all, it is validated again
on every input (Validator._certain_fail). An output that is not finite stops it too: the gate's structure
check fails that on any input. Other tasks' gates (top-1 agreement against a ceiling, box F1, mask IoU)
are judged on every input, as before.
"""
from __future__ import annotations

import math

import numpy as np

# (float64 sums in another order than task_metrics.moments': a bound this close to the line decides nothing)
SQNR_MARGIN_DB = 0.01
COSINE_MARGIN = 1e-6
TASKS = ("raw",)


def closeness_gated(task: str, ref_outputs: list[np.ndarray], specs: list[dict], inputs: int) -> list[int]:
    """The outputs that `task_metrics.dense` holds to SQNR and cosine for `task` (none for other tasks):
    float outputs that are not labels (as the graph declares them, not as their values look), with one
    row an input (`inputs`: the validation inputs; an output without a batch axis has other rows)."""
    from lepton_edge.exporters import task_metrics as tm

    if task not in TASKS:
        return []
    gated = []
    for k, r in enumerate(ref_outputs):
        rs = specs[k] if k < len(specs) else {}
        row = {"dtype": rs.get("dtype", "float32"), **({"labels": bool(rs["labels"])} if "labels" in rs else {})}
        if not r.size or r.ndim == 0 or len(r) != inputs or tm.is_labels(r, row):
            continue
        gated.append(k)
    return gated


class Watch:
    """Fed each batch of a candidate's outputs in order (`seen`); says why it has certainly failed, or None."""

    def __init__(self, ref_outputs: list[np.ndarray], specs: list[dict], gated: list[int], power: dict[int, float],
                 min_sqnr: float, min_cosine: float, inputs: int):
        self.ref, self.specs, self.gated, self.power = ref_outputs, specs, gated, power
        self.min_sqnr, self.min_cosine = min_sqnr, min_cosine
        self.n = inputs
        self.noise = dict.fromkeys(gated, 0.0)
        self.cosines = dict.fromkeys(gated, 0.0)

    def seen(self, outputs: list[np.ndarray], start: int, end: int) -> str | None:
        """Rows start..end of each output are the candidate's latest; why the candidate fails whatever the
        rows after `end` hold (None: it may still pass)."""
        from lepton_edge.exporters import task_metrics as tm

        if len(outputs) != len(self.ref):
            return None  # (the structure check fails it, on every input)
        for k in self.gated:
            r, a = self.ref[k][start:end], outputs[k][start:end]
            if r.shape != a.shape:
                return None
            d = r.astype(np.float64) - a.astype(np.float64)
            name = self.specs[k].get("name", f"output{k}") if k < len(self.specs) else f"output{k}"
            if not np.isfinite(a).all():  # (the gate's structure check fails it, on every input)
                return f"output {name} held NaN or infinite values"
            self.noise[k] += float(np.dot(d.ravel(), d.ravel()))
            self.cosines[k] += float(tm.cosine(r, a).sum())
            if self.noise[k] > 0 and self.power[k] > 0 and math.isfinite(self.noise[k]):
                best = 10 * math.log10(self.power[k] / self.noise[k])
                if best < self.min_sqnr - SQNR_MARGIN_DB:
                    return f"output {name}'s SQNR over all {self.n} could reach {best:.1f} dB at most"
            best_cos = (self.cosines[k] + (self.n - end)) / self.n if self.n else 1.0
            if best_cos < self.min_cosine - COSINE_MARGIN:
                return f"output {name}'s cosine over all {self.n} could reach {best_cos:.4f} at most"
        return None


def powers(ref_outputs: list[np.ndarray], gated: list[int]) -> dict[int, float]:
    """fp32's power (sum of squares, float64) of each gated output over every validation input."""
    out = {}
    for k in gated:
        r, total = ref_outputs[k], 0.0
        step = max(1, (16 << 20) // max(1, r[:1].nbytes))  # (a float64 copy of 16 MB at a time)
        for i in range(0, len(r), step):
            x = r[i:i + step].astype(np.float64).ravel()
            total += float(np.dot(x, x))
        out[k] = total
    return out
