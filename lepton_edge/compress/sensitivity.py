"""Per-layer sensitivity of an int8 model: which layers the `-sensitive` recipes keep in float.

Runs the float and the quantized model side by side on the same inputs, reads every quantizable
layer's output, and charges each layer with SQNR(input) - SQNR(output): the noise that layer itself
adds (exporters/recipes.py keeps the worst 1, 2, 4, ... in float).

Why batch by batch: the signal and noise energies are sums, so each batch's layer outputs are added
in and dropped; holding every layer's output for all inputs took 32 x the model's activations (over
30 GB for an 800x608 detector).

Why a budget: a batch's layer outputs of both models are held at once, in native code that no check
can stop. Under `--max-memory 450MB` PP-OCR's recogniser (~0.2 GB of layer outputs an input) took
911 MB in batches of 4 before the check after the pass saw it. So a batch holds what half the budget
leaves at one input's cost: the larger of its outputs plus every activation of the model (shape
inference) and the peak RSS its first run reached (sampled during the runs: their buffers are freed by
the time they return); when one input's outputs (or the model's fixed batch) do not fit,
MemoryExceeded before any run.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from lepton_edge.compress.quantize import QUANTIZABLE, _float_tensor_bytes, _input_name, _no_check

BATCH = 4  # inputs a batch holds at most (every layer's output of both models)
CLEAN_DB = 60.0  # the SQNR of a tensor without noise (a graph input, or one not quantized)


def batch_size(per_input: int, headroom: int | None) -> int:
    """Inputs per batch (a model without a fixed batch): up to BATCH, and no more than half of `headroom`
    bytes hold at `per_input` bytes an input. Why half: a batch of 4 of PP-OCR's recogniser grew RSS by
    1.5x four times one input's (the runs' buffers, and freed blocks the allocator keeps), and a batch of 1
    costs only ~10 % more time."""
    if headroom is None or per_input <= 0:
        return BATCH
    return max(1, min(BATCH, headroom // (2 * per_input)))


def sensitivity(fp32_path: Path, qdq_path: Path, x: np.ndarray, names: dict[str, str] | None = None,
                check: Callable[[], None] = _no_check, budget: int | None = None) -> list[tuple[str, float]]:
    """(layer name, dB of SQNR it loses), worst first. `names` maps float tensor names to the quantized
    file's (after quantize.compact_names); `budget`: this process's RSS ceiling (None: none); `check` runs
    before every batch (the export's memory watch and deadline)."""
    import onnx

    from lepton_edge.compress import calibration as cal

    names = names or {}
    m = onnx.load(str(fp32_path), load_external_data=False)
    q = onnx.load(str(qdq_path), load_external_data=False)
    nodes = [n for n in m.graph.node if n.op_type in QUANTIZABLE]
    made, outs = _compared(m, q, nodes, names)
    name, q_name = _input_name(m), _input_name(q)
    tensors = _float_tensor_bytes(m, {name: x[:1]})  # (a tensor of unknown shape counts 0: lower bounds)
    read = set(outs)
    sizes = [b for t, b in tensors.items() if t in read]
    # both models' outputs, then per tensor its float64 error, and the squares of it and of the reference
    per_input = 2 * sum(sizes) + 3 * 2 * max(sizes, default=0)
    # what a batch is sized by: the outputs, and a run's working set, at most every activation of the model
    per_run = max(per_input, sum(sizes) + sum(tensors.values()) + 3 * 2 * max(sizes, default=0))
    dims = next(i for i in m.graph.input if i.name == name).type.tensor_type.shape.dim
    fixed = dims[0].dim_value if dims and dims[0].dim_value > 0 else None
    step = fixed or 1  # one input first: what its outputs really take sizes the batches after it
    del m, q
    _fits(per_input * step, step, budget)  # before the sessions too: a pass that cannot fit opens nothing
    f, qs = _session(fp32_path, outs), _session(qdq_path, [names.get(o, o) for o in outs])
    _fits(per_input * step, step, budget)  # (the two sessions' weights now in)
    energy: dict[str, list[float]] = {}  # tensor: [signal, noise], summed over the batches
    f_names, q_names = [o.name for o in f.get_outputs()], [o.name for o in qs.get_outputs()]
    i, before = 0, cal.rss_bytes()
    while i < len(x):
        check()
        xb, i = x[i:i + step], i + step
        first = not fixed and i == 1
        with cal.MemoryWatch(None, interval=0.002) if first else nullcontext() as watch:
            fa = dict(zip(f_names, f.run(None, {name: xb})))
            qa = dict(zip(q_names, qs.run(None, {q_name: xb})))
        if watch is not None:  # one input's real cost sizes the batches after it
            got = [a.nbytes for a in (*fa.values(), *qa.values())]
            # (shape inference misses tensors of unknown shape; the peak RSS has the runs' own buffers, which
            # are freed by the time a run returns)
            per_run = max(per_run, sum(got) + 3 * 2 * max(got, default=0), watch.peak - before)
            step = batch_size(per_run, None if budget is None else budget - before)
        _add_energies(energy, fa, qa, names)
        del fa, qa

    def sqnr(t: str) -> float:
        if t not in energy:
            return CLEAN_DB
        s, e = energy[t]
        return CLEAN_DB if e == 0 else min(CLEAN_DB, 10 * math.log10(max(s, 1e-12) / e))

    lost = [(n.name, sqnr(n.input[0]) - sqnr(t)) for n, t in zip(nodes, made) if t is not None]
    return sorted(lost, key=lambda t: -t[1])


def _fits(need: int, inputs: int, budget: int | None) -> None:
    """Raise MemoryExceeded when `need` bytes (the layer outputs of `inputs` input(s) of both models) do
    not fit what `budget` (this process's RSS ceiling; None: no budget) leaves now."""
    from lepton_edge.compress import calibration as cal

    if budget is None:
        return
    headroom = budget - cal.rss_bytes()
    if need > headroom:
        from lepton_edge.ui import human

        left = (f"the {human(headroom)} the export's memory budget leaves" if headroom > 0 else
                f"the export's memory budget, which its {human(budget - headroom)} already fill")
        raise cal.MemoryExceeded(f"the sensitivity pass needs about {human(need)} for the layer outputs of {inputs} "
                                 f"input(s) of both models, over {left} ({human(budget)}, --max-memory)")


def _add_energies(energy: dict[str, list[float]], fa: dict, qa: dict, names: dict[str, str]) -> None:
    for t, ref in fa.items():
        qt = names.get(t, t)
        if qt in qa:
            err = (ref - qa[qt]).astype(np.float64)
            acc = energy.setdefault(t, [0.0, 0.0])
            acc[0] += float(np.sum(ref.astype(np.float64) ** 2))
            acc[1] += float(np.sum(err**2))


def _compared(m, q, nodes: list, names: dict[str, str]) -> tuple[list[str | None], list[str]]:
    """(each layer's output tensor where both graphs compute it, else None; every tensor to read).

    Each layer's input is read too, where both graphs compute it: after an activation that is not a layer
    (Relu, HardSwish as Add/Clip/Mul/Div) it is no layer's output, and taking it as clean charged that
    layer with all the noise upstream (every such layer "lost" ~57 dB on a PicoDet detector).

    (A layer whose Relu onnxruntime folded into its output quantization has no output tensor in the
    quantized graph, and is not ranked. Ranking those too, by the dB each loses, put a first convolution
    first on the zoo's fashion-cnn, whose clean input makes any noise look large, and its float fallback
    then no longer passed where keeping the last layer did: ranking them needs a measure of the noise a
    layer adds that is fair to the first one.)"""
    q_tensors = {o for n in q.graph.node for o in n.output}

    def in_q(t: str) -> bool:  # (`names`: the float graph's names -> the quantized file's)
        return names.get(t, t) in q_tensors

    made = [n.output[0] if in_q(n.output[0]) else None for n in nodes]
    outs = [t for t in made if t is not None]
    done = set(outs)
    for n, out in zip(nodes, made):
        t = n.input[0]
        if out is not None and t not in done and in_q(t):
            outs.append(t)
            done.add(t)
    return made, outs


def _session(path: Path, outputs: list[str]):
    """An onnxruntime session of the model at `path` with `outputs` added as graph outputs: unoptimised (the
    tensors must be the graph's own), no arena and no memory pattern (two short-lived sessions: nothing to
    reuse, memory back at once; the pattern plans one block for a run's every tensor)."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(path))
    have = {o.name for o in m.graph.output}
    for n in outputs:
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
