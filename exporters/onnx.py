"""ONNX exporter: torch -> ONNX (the torch.export-based exporter), then fp16 or int8 QDQ.

The artifact is run by onnxruntime for validation with the target's thread count, the same
runtime the device uses, so what was validated is what will run.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from lepton_edge import ui
from lepton_edge.compress import quantize
from lepton_edge.errors import BadInput
from lepton_edge.exporters.context import ExportContext
from lepton_edge.exporters.exporter import Exporter
from lepton_edge.manifest_sections import Fp16Section


def _silenced():
    """torch.export logs errors it then recovers from, and the exporter prints its progress."""
    return ui.libraries_silenced("torch.onnx", "torch.export", "torch._dynamo", "torch._export")


def _first_line(e: BaseException) -> str:
    """The error's first line, and its root cause's when it has one: torch.onnx wraps the real reason
    ("State dict entry ... is not a Parameter") in "Failed to export ... Next steps:", which said nothing."""
    def first(x: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(x))
        return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(x).__name__)

    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    line = first(e) if root is e else f"{first(e)[:120]}: {type(root).__name__}: {first(root)}"
    return line[:400]


def _self_contained(path: Path) -> bool:
    """Whether the ONNX file holds all its weights (no tensor stored in a file beside it)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for a in node.attribute:
                yield from ([a.t] if a.HasField("t") else []) + list(a.tensors)
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from tensors(g)

    return not any(uses_external_data(t) for t in tensors(onnx.load(str(path), load_external_data=False).graph))


def _inline_external_data(src: Path, dst: Path) -> None:
    """`src` with its external weights read in, written as one file at `dst`: the export works on (and the
    bundle ships) a single model file. onnx.load reads only files inside the model's own folder (a
    location such as ../../etc/passwd was refused when the model was loaded, model_source._load_onnx);
    one file holds at most 2 GB, far past any edge target's size budget."""
    import onnx

    model = onnx.load(str(src))
    try:
        onnx.save(model, str(dst))
    except ValueError as e:  # protobuf's 2 GB limit
        raise BadInput(f"{src}: the model with its external weights is too large for one ONNX file "
                       f"({_first_line(e)}); no edge target takes a model that size") from None


class OnnxExporter(Exporter):
    format = "onnx"
    suffix = ".onnx"
    precisions = ("fp32", "fp16", "int8")
    recipe_examples = ("nncf-default", "u8-minmax", "s8-minmax-ends")

    def supports_recipe(self, name: str) -> bool:
        return quantize.Recipe.parse(name).engine in ("ort", "nncf")

    def to_fp32(self, ctx: ExportContext, path: Path) -> Path:
        """Write the fp32 ONNX graph (batch as in the input spec, 1 by default) and return its path."""
        source, opset = ctx.source, ctx.profile.max_opset
        if source.kind == "onnx":
            if not _self_contained(source.onnx_path):
                _inline_external_data(source.onnx_path, path)
            else:
                shutil.copyfile(source.onnx_path, path)
            return path
        import torch

        spec = source.input_spec
        shape = [int(d) for d in spec.shape[1:]]
        names = dict(input_names=[spec.name], output_names=["logits"] if source.task == "classify" else None)
        # A fixed batch (1 for edge devices): twice as fast to export as a dynamic one, and what TFLite
        # and most accelerators need. torch.export-based exporter first; the TorchScript exporter for
        # ScriptModules, old opsets, and as a fallback.
        batch = spec.shape[0] if isinstance(spec.shape[0], int) else 1
        dynamo = [dict(dynamo=True, opset_version=18, verbose=False, optimize=True)]
        legacy = [dict(dynamo=False, opset_version=min(opset, 17))]
        module = source.module
        if not isinstance(module, torch.jit.ScriptModule) and \
                any(isinstance(m, torch.jit.ScriptModule) for m in module.modules()):
            # a Python module around a TorchScript one (the NHWC entrance on a .pt): neither exporter takes
            # it ("not part of the active trace"), its trace does (the inner module is called, not re-traced)
            try:
                with torch.no_grad(), _silenced():
                    module = torch.jit.trace(module, torch.zeros([batch] + shape))
            except Exception as e:
                raise BadInput(f"torch -> ONNX export failed: {_first_line(e)}") from None
        scripted = isinstance(module, torch.jit.ScriptModule)
        attempts = legacy if scripted or opset < 18 else dynamo + legacy
        errors = []
        for kw in attempts:
            x = torch.zeros([batch] + shape)
            try:
                with _silenced():
                    if kw["dynamo"]:
                        torch.onnx.export(module, (x,), None, **names, **kw).save(str(path))
                    else:
                        torch.onnx.export(module, (x,), str(path), **names, **kw)
                quantize.compact_names(path)
                return path
            except Exception as e:
                errors.append(_first_line(e))
        raise BadInput(f"torch -> ONNX export failed: {errors[0]}")

    def convert(self, ctx: ExportContext, fp32_path: Path, out_path: Path, precision: str) -> Path:
        """fp32 or fp16 artifact, names compacted (the file validated is the file shipped)."""
        if precision == "fp32":
            shutil.copyfile(fp32_path, out_path)  # as to_fp32 wrote it (names compacted for torch sources)
        elif precision == "fp16":
            self._fp16(ctx, fp32_path, out_path)
        else:
            raise ValueError("int8 goes through quantize_int8 with a recipe")
        return out_path

    def _fp16(self, ctx: ExportContext, fp32_path: Path, out_path: Path) -> None:
        """fp16 with the nodes fp16 cannot hold kept in fp32. Activation ranges come from the
        calibration inputs; with no --calib, from the validation inputs (better than no data: they
        only ever widen what stays fp32, and the manifest says which were used)."""
        data = ctx.data
        if data is not None and data.calib_x is not None:
            x, source = data.calib_x, f"calibration data ({data.calib_info.get('source') or 'given'})"
        elif data is not None:
            x, source = data.check_x, f"validation inputs ({data.check_kind}; no --calib)"
        else:
            x, source = None, "weights only (no data)"
        res = quantize.convert_fp16(fp32_path, out_path, x)
        quantize.compact_names(out_path)
        ctx.report.compression.fp16 = Fp16Section(**res.record(source))
        if res.float_nodes:
            shown = ", ".join(res.float_nodes[:5]) + (" ..." if len(res.float_nodes) > 5 else "")
            ctx.progress.info(f"[dim]fp16: {len(res.float_nodes)} node(s) kept in fp32, their values "
                              f"leave fp16's range: {shown}[/]")

    def prepare_int8(self, ctx: ExportContext, fp32_path: Path) -> Path:
        return quantize.prepare(fp32_path, ctx.workdir / "prepared.onnx")

    def quantize_int8(self, ctx: ExportContext, prepared: Path, out_path: Path, recipe,
                      exclude: list[str] | None = None, check=None, limit: int | None = None) -> quantize.QuantResult:
        """One candidate, checked (onnx.checker, loads and runs a batch in onnxruntime): a broken
        graph raises quantize.BrokenGraph, and the search skips it with that reason."""
        res = quantize.quantize_int8(prepared, out_path, ctx.data.calib_x, recipe, ctx.per_channel, exclude,
                                     check or quantize._no_check, ranges=prepared.parent,
                                     share=ctx.planned_calibrations >= {"minmax", "percentile"}, limit=limit)
        res.names = quantize.compact_names(res.path)
        return res

    def describe(self, path: Path) -> dict:
        import onnx

        m = onnx.load(str(path), load_external_data=False)

        from lepton_edge.bundle import onnx_dims as dims

        def out(v):
            d = {"name": v.name, "shape": dims(v)}
            elem = v.type.tensor_type.elem_type
            if elem:  # (an int64 argmax is no float32: the manifest and the checks say what it is)
                d["dtype"] = onnx.helper.tensor_dtype_to_np_dtype(elem).name
            return d

        inits = {i.name for i in m.graph.initializer}
        labels = label_outputs(m)
        return {
            "opset": max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0),
            "inputs": [{"name": i.name, "shape": dims(i)} for i in m.graph.input if i.name not in inits],
            "outputs": [{**out(o), "labels": o.name in labels} for o in m.graph.output],
        }


# ops that pass labels through unchanged in meaning (a class id cast, reshaped, or picked out is still one)
_LABEL_KEEPING = frozenset({"Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Transpose", "Expand",
                            "Slice", "Gather", "Add", "Sub"})


def label_outputs(model) -> set[str]:
    """The graph outputs that hold labels: made by ArgMax or ArgMin, or TopK's indices, through ops that keep
    them labels (_LABEL_KEEPING: a reshape, ids + 1, a table looked up by them), or boolean. Why from the
    graph: validation judges labels by whether they are equal (task_metrics.label_iou), and an integer output
    that is a measure (a Cast of a pixel value or a coordinate) by how close it is; its type alone does not
    tell the two apart."""
    made = {o: (n, k) for n in model.graph.node for k, o in enumerate(n.output)}
    fixed = {i.name for i in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                         for o in n.output}
    found = set()
    for out in model.graph.output:
        name, seen = out.name, set()
        while name in made and name not in seen:
            seen.add(name)
            node, k = made[name]
            if node.op_type in ("ArgMax", "ArgMin") or (node.op_type == "TopK" and k == 1):
                found.add(out.name)
                break
            if node.op_type not in _LABEL_KEEPING or not node.input:
                break
            # (the input that is not a constant: ids + 1, a table looked up by the ids, or the ids sliced)
            name = next((i for i in node.input[:2] if i and i not in fixed), node.input[0]) \
                if node.op_type in ("Add", "Sub", "Gather") else node.input[0]
        if out.type.tensor_type.elem_type == 9:  # (onnx.TensorProto.BOOL)
            found.add(out.name)
    return found
