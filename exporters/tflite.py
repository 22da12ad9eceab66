"""TFLite exporter: PyTorch -> TFLite with litert-torch (no TensorFlow), validated in LiteRT.

fp32: litert_torch.convert (TorchScript first becomes an ExportedProgram through torch's
TS2EPConverter: torch.export, which litert-torch traces with, cannot read it). int8: NNCF's
post-training quantization on its PT2E path (`nncf-default`), plain PT2E static quantization (int8,
per-channel weights, calibrated on the export's calibration data) and the LiteRT quantizer
(ai-edge-quantizer), keeping the one that validates best; the int8 body gets a float
input/output (QUANTIZE/DEQUANTIZE ops), or with int8_io keeps integer-only I/O whose scale/zero-point
go into the manifest. fp16: fp16 weights via ai-edge-quantizer's float casting, float compute and I/O.
Validation runs the artifact in `ai_edge_litert` (XNNPACK), the interpreter the device runs.
The flatbuffer edits (float I/O, compaction) are in exporters/tflite_flatbuffer.py.
"""
from __future__ import annotations

import re
import shutil
import weakref
from collections import Counter
from pathlib import Path

import numpy as np

from lepton_edge import ui
from lepton_edge.compress.quantize import QuantResult
from lepton_edge.errors import BadInput
from lepton_edge.exporters.context import ExportContext
from lepton_edge.exporters.exporter import Exporter
from lepton_edge.exporters.tflite_flatbuffer import compact, float_io
from lepton_edge.runtime.litert_loader import load_interpreter


def _quiet():
    """litert-torch, its MLIR passes and the C++ converter print progress lines (the C++ side
    straight to file descriptor 2)."""
    return ui.libraries_silenced("torch.export", "torch._dynamo", "torch.onnx", "absl", "", native=True)


def _lowering_error(e: Exception, module, example) -> str:
    """The converter's first meaningful line; for an op it cannot lower, the op and the layer
    (module path) it came from, found in the exported graph's module stack."""
    text = str(e) or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    key = next((ln for ln in lines if "lower" in ln.lower() or "not supported" in ln.lower()
                or "unsupported" in ln.lower() or "aten." in ln), lines[0] if lines else type(e).__name__)
    op = re.search(r"(aten\.[\w.]+)", key)
    if op:
        key = f"no TFLite lowering for {op.group(1)}{_layer_of(op.group(1), module, example)}"
    return key[:300]


def _layer_of(op: str, module, example) -> str:
    import torch

    try:
        with _quiet():
            graph = torch.export.export(module, example).run_decompositions().graph
        for node in graph.nodes:
            if str(node.target) == op or str(node.target).startswith(op.rsplit(".", 1)[0] + "."):
                stack = node.meta.get("nn_module_stack") or {}
                if stack:
                    path, (_, cls) = list(stack.items())[-1][0], list(stack.values())[-1]
                    name = getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1].strip("'>"))
                    layer = list(stack.values())[-1][0] or path
                    if type(module).__name__ == "ChannelsLastInput":  # our NHWC wrapper: the user's names
                        layer = layer.removeprefix("inner.")
                    return f" in layer '{layer}' ({name})"
                return " (called in the model's forward, outside any submodule)"
    except Exception:  # finding the layer is a courtesy; the op name alone is still the answer
        pass
    return ""


def _require_litert_torch():
    try:
        with _quiet():  # importing torchao/litert-torch logs about optional CUDA kernels and oneDNN
            import litert_torch  # noqa: F401
            import torchao.quantization.pt2e  # noqa: F401
    except ImportError:
        raise BadInput("TFLite export needs the [tflite] extra: pip install 'lepton-edge[tflite]'") from None


def _example(ctx: ExportContext) -> tuple:
    """The example input litert-torch traces with: the input spec's shape, dynamic dims at 1."""
    import torch

    return (torch.zeros([d if isinstance(d, int) else 1 for d in ctx.source.input_spec.shape]),)


# module -> {example shape: the module with its TorchScript converted}: one conversion per export
# (fp32 and each PT2E recipe trace the same module), forgotten with the module.
_CONVERTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _exportable(module, example: tuple):
    """`module` as torch.export can read it: TorchScript (a .pt from torch.jit, whole or wrapped, as
    our NHWC wrapper wraps it) converted to an ExportedProgram's module by torch's own
    TorchScript -> torch.export converter; any other module as it is.

    Why: litert-torch converts through torch.export, which cannot trace TorchScript; without this a
    scripted or traced model (the form many projects ship) could not become TFLite at all."""
    import torch

    if not any(isinstance(m, torch.jit.ScriptModule) for m in module.modules()):
        return module
    key = tuple(int(d) for d in example[0].shape)
    cache = _CONVERTED.setdefault(module, {})
    if key not in cache:
        cache[key] = _replace_torchscript(module, example)
    return cache[key]


def _replace_torchscript(module, example: tuple):
    """The module with each outermost TorchScript part replaced by its torch.export conversion,
    converted with the inputs that part receives when `module` runs on `example`."""
    import copy

    import torch

    if isinstance(module, torch.jit.ScriptModule):
        return _ts_to_export(module, example)

    class Recorder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.args = inner, ()

        def forward(self, *args):
            self.args = args
            return self.inner(*args)

    def swapped(parent):  # a shallow copy of the tree down to the TorchScript parts (the user's model is untouched)
        clone = copy.copy(parent)
        clone._modules = dict(parent._modules)
        for name, child in parent.named_children():
            if isinstance(child, torch.jit.ScriptModule):
                clone._modules[name] = Recorder(child)
            elif any(isinstance(m, torch.jit.ScriptModule) for m in child.modules()):
                clone._modules[name] = swapped(child)
        return clone

    clone = swapped(module)
    with torch.no_grad():
        clone(*example)
    for path, rec in [(p, m) for p, m in clone.named_modules() if isinstance(m, Recorder)]:
        parent, _, name = path.rpartition(".")
        setattr(clone.get_submodule(parent), name, _ts_to_export(rec.inner, rec.args))
    return clone


def _ts_to_export(scripted, args: tuple):
    import torch

    try:
        from torch._export.converter import TS2EPConverter

        with _quiet(), torch.no_grad():
            return TS2EPConverter(scripted, tuple(args)).convert().module()
    except Exception as e:
        why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]
        raise BadInput("litert-torch converts through torch.export, which cannot read TorchScript (a .pt from "
                       f"torch.jit), and torch's TorchScript converter failed on this one ({why}): give the "
                       "nn.Module or a .pt2 (torch.export.save), or use --format onnx") from None


def _convert(module, example: tuple, path: Path, quant_config=None) -> None:
    import litert_torch

    module = _exportable(module, example)
    try:
        with _quiet():
            litert_torch.convert(module, example, quant_config=quant_config).export(str(path))
    except Exception as e:
        raise BadInput(f"litert-torch cannot convert this model: {_lowering_error(e, module, example)}") from None


class TfliteExporter(Exporter):
    format = "tflite"
    suffix = ".tflite"
    precisions = ("fp32", "fp16", "int8")
    sources = ("torch",)
    # nncf-default: NNCF's PTQ (its range estimation and fast bias correction) through its PT2E path,
    # placing the quantizers litert-torch's symmetric PT2E quantizer asks for, so litert-torch converts
    # the result as it converts s8-minmax's; s8-minmax: PT2E with litert-torch's observers (histogram for
    # activations, min/max per channel for weights); s8-minmax-litert: the LiteRT quantizer
    # (ai-edge-quantizer, static a8w8) on the fp32 file. All are tried; the one that validates best is kept.
    # A recipe names the algorithm, the format its backend: nncf-default is NNCF's ONNX backend on ONNX.
    recipe_examples = ("nncf-default", "s8-minmax", "s8-minmax-litert")

    def supports_recipe(self, name: str) -> bool:
        return name in self.recipe_examples

    def to_fp32(self, ctx: ExportContext, path: Path) -> Path:
        _require_litert_torch()
        _convert(ctx.source.module, _example(ctx), path)
        compact(path)
        return path

    def convert(self, ctx: ExportContext, fp32_path: Path, out_path: Path, precision: str) -> Path:
        if precision == "fp32":
            shutil.copyfile(fp32_path, out_path)  # already compacted
        elif precision == "fp16":
            _fp16_weights(fp32_path, out_path)
            compact(out_path)
        else:
            raise ValueError("int8 goes through quantize_int8")
        return out_path

    def prepare_int8(self, ctx: ExportContext, fp32_path: Path) -> Path:
        return fp32_path  # PT2E works on the PyTorch module itself (ctx.source.module)

    def quantize_int8(self, ctx: ExportContext, prepared: Path, out_path: Path, recipe,
                      exclude: list[str] | None = None, check=None, limit: int | None = None) -> QuantResult:
        calib = ctx.data.calib_x  # (`limit` unused: the PyTorch quantizers here are checked between batches)
        if recipe.litert:
            _litert_quantizer_int8(prepared, out_path, calib)
        elif recipe.engine == "nncf":
            _nncf_pt2e_int8(ctx, out_path, calib, check or _no_check)
        else:
            _pt2e_int8(ctx, out_path, calib, check)
        if not ctx.options.int8_io:  # --int8-io keeps the integer-only interface (integer-only accelerators)
            float_io(out_path)
        compact(out_path)
        return QuantResult(out_path, recipe)

    def int8_method(self, recipe) -> str:
        """What quantized the model, for the manifest (never onnxruntime's quantize_static here)."""
        from lepton_edge.compress.quantize import _version

        if recipe.litert:
            return (f"LiteRT quantizer (ai-edge-quantizer {_version('ai-edge-quantizer')}, static a8w8) on the fp32 "
                    "TFLite model, weights int8 per-channel")
        if recipe.engine == "nncf":
            return (f"NNCF {_version('nncf')} post-training quantization (PT2E path: quantize_pt2e with litert-torch "
                    f"{_version('litert-torch')}'s symmetric quantizer, fast bias correction), weights int8 "
                    "per-channel")
        return (f"PT2E (torchao prepare/convert_pt2e with litert-torch {_version('litert-torch')}'s symmetric "
                "quantizer, histogram observers), weights int8 per-channel")

    def describe(self, path: Path) -> dict:
        it = load_interpreter(path, 1)

        def spec(d):
            scale, zp = d["quantization"]
            out = {"name": d["name"], "shape": [int(v) for v in d["shape"]], "dtype": np.dtype(d["dtype"]).name}
            if scale:
                out["quantization"] = {"scale": float(scale), "zero_point": int(zp)}
            return out

        return {"opset": None, "inputs": [spec(d) for d in it.get_input_details()],
                "outputs": [spec(d) for d in it.get_output_details()],
                "ops": dict(Counter(o["op_name"] for o in it._get_ops_details()))}


def _no_check() -> None:
    return None


def _pt2e_graph(ctx: ExportContext, example: tuple):
    """(litert-torch's symmetric PT2E quantizer, the module as the exported graph PT2E annotates)."""
    import torch
    from litert_torch.quantize import pt2e_quantizer as pq

    quantizer = pq.PT2EQuantizer().set_global(pq.get_symmetric_quantization_config(is_per_channel=ctx.per_channel))
    with _quiet():
        graph = torch.export.export(_exportable(ctx.source.module, example), example).module()
    return quantizer, graph


def _pt2e_int8(ctx: ExportContext, out_path: Path, calib: np.ndarray, check=None) -> None:
    """Static int8 through PT2E (torchao prepare/convert) with litert-torch's symmetric quantizer,
    calibrated by running the prepared PyTorch module on the calibration inputs."""
    import torch
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import quantize_pt2e

    example = _example(ctx)
    quantizer, graph = _pt2e_graph(ctx, example)
    with _quiet():
        prepared_module = quantize_pt2e.prepare_pt2e(graph, quantizer)
    batch = example[0].shape[0]
    with ctx.progress.bar("calibrating", len(calib)) as advance, torch.no_grad():
        for i in range(0, len(calib) - batch + 1, batch):
            prepared_module(torch.from_numpy(np.ascontiguousarray(calib[i:i + batch], dtype=np.float32)))
            advance(batch)
            if check is not None:
                check()  # the memory budget (--max-memory)
    with _quiet():
        converted = quantize_pt2e.convert_pt2e(prepared_module, fold_quantize=False)
    _convert(converted, example, out_path, QuantConfig(pt2e_quantizer=quantizer))


def _nncf_pt2e_int8(ctx: ExportContext, out_path: Path, calib: np.ndarray, check) -> None:
    """Static int8 through NNCF's PT2E path (`quantize_pt2e`): NNCF's range estimation and fast bias
    correction, with quantizers where litert-torch's symmetric quantizer annotates them, so the result
    is the same kind of graph as `_pt2e_int8`'s and litert-torch converts it the same way.

    Why NNCF here: its PTQ is the reference the int8 export is held to (issue 14); on the ONNX route it
    is the ONNX backend, on this route the PT2E one. Calibration streams: NNCF takes batch start indices
    and builds each batch when it asks for it (with the memory/time check between batches)."""
    import logging

    import torch
    from litert_torch.quantize.quant_config import QuantConfig

    try:
        import nncf
        with _quiet():
            from nncf.experimental.torch.fx import quantize_pt2e
    except ImportError:
        raise ValueError("NNCF is not installed (pip install 'lepton-edge[export]')") from None

    example = _example(ctx)
    quantizer, graph = _pt2e_graph(ctx, example)
    _named_convolutions(graph)
    batch = example[0].shape[0]
    starts = list(range(0, len(calib) - batch + 1, batch))
    with ctx.progress.bar("calibrating (NNCF)", len(starts) * batch) as advance:
        def transform(i: int):
            check()  # the memory budget (--max-memory) and --search-time
            advance(batch)
            return torch.from_numpy(np.ascontiguousarray(calib[i:i + batch], dtype=np.float32))

        nncf.set_log_level(logging.ERROR)
        with _quiet(), ui.libraries_silenced("nncf", stderr=False), torch.no_grad():
            converted = quantize_pt2e(graph, quantizer, nncf.Dataset(starts, transform), subset_size=len(starts),
                                      fast_bias_correction=True, fold_quantize=False)
    _convert(converted, example, out_path, QuantConfig(pt2e_quantizer=quantizer))


def _named_convolutions(graph) -> None:
    """Rewrite the generic `aten.convolution` nodes of a 1-D/2-D forward convolution as `aten.conv1d` /
    `aten.conv2d`, in place. Why: torch's TorchScript converter (TS2EPConverter) emits the generic op,
    which NNCF's PT2E path does not know (it fails with "'UnknownMetatype' has no attribute
    'weight_port_ids'" on the quantizer's weight annotation, e.g. on MTCNN's O-Net); both ops compute
    the same, and litert-torch lowers either."""
    import torch

    aten = torch.ops.aten
    named = {3: aten.conv1d.default, 4: aten.conv2d.default}
    changed = False
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target != aten.convolution.default or len(node.args) != 9:
            continue
        x, w, b, stride, padding, dilation, transposed, _, groups = node.args
        val = getattr(w, "meta", {}).get("val")
        if transposed or val is None or val.dim() not in named:
            continue
        node.target, node.args = named[val.dim()], (x, w, b, stride, padding, dilation, groups)
        changed = True
    if changed:
        graph.recompile()


def _litert_quantizer_int8(fp32_path: Path, out_path: Path, calib: np.ndarray) -> None:
    """Static int8 (int8 activations, per-channel int8 weights) with ai-edge-quantizer, calibrated
    by running the fp32 .tflite itself on the calibration inputs."""
    from ai_edge_quantizer import quantizer, recipe

    from lepton_edge import ui
    from lepton_edge.runtime.litert_loader import load_interpreter

    signatures = load_interpreter(fp32_path, 1).get_signature_list()
    key = next(iter(signatures))
    name = signatures[key]["inputs"][0]
    q = quantizer.Quantizer(str(fp32_path))
    q.load_quantization_recipe(recipe.static_wi8_ai8())
    with ui.progress("calibrating (LiteRT quantizer)", len(calib)) as advance, _quiet():
        samples = [{name: calib[i:i + 1].astype(np.float32)} for i in range(len(calib))]
        result = q.calibrate({key: samples})
        advance(len(calib))
        q.quantize(result, serialize_to_path=str(out_path), enable_progress_report=False)


def _fp16_weights(fp32_path: Path, out_path: Path) -> None:
    """fp16 weights (half the file), float compute: ai-edge-quantizer's float casting."""
    from ai_edge_quantizer import qtyping, quantizer

    q = quantizer.Quantizer(str(fp32_path))
    q.update_quantization_recipe(
        regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
        algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING,
        op_config=qtyping.OpQuantizationConfig(
            weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
            compute_precision=qtyping.ComputePrecision.FLOAT, explicit_dequantize=True),
    )
    with _quiet():
        q.quantize(serialize_to_path=str(out_path), enable_progress_report=False)
