"""TFLite exporter: PyTorch -> TFLite with litert-torch (no TensorFlow), validated in LiteRT.

fp32: litert_torch.convert. int8: PT2E static quantization (int8, per-channel weights, calibrated
on the export's calibration data) and the LiteRT quantizer (ai-edge-quantizer) both, keeping the
one that validates better; the int8 body gets a float input/output (QUANTIZE/DEQUANTIZE ops), or
with int8_io keeps integer-only I/O whose scale/zero-point go into the manifest. fp16: fp16
weights via ai-edge-quantizer's float casting, float compute and I/O.
Validation runs the artifact in `ai_edge_litert` (XNNPACK), the interpreter the device runs.
"""
from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from lepton_edge import ui
from lepton_edge.compress.quantize import QuantResult
from lepton_edge.errors import BadInput
from lepton_edge.exporters.base import Exporter, register
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


@register
class TfliteExporter(Exporter):
    format = "tflite"
    suffix = ".tflite"
    precisions = ("fp32", "fp16", "int8")
    sources = ("torch",)
    # s8-minmax: PT2E with litert-torch's observers (histogram for activations, min/max per channel for
    # weights); s8-minmax-litert: the LiteRT quantizer (ai-edge-quantizer, static a8w8) on the fp32 file.
    recipe_examples = ("s8-minmax", "s8-minmax-litert")
    compare_first = 2  # both are tried; the one that validates better is kept

    def supports_recipe(self, name: str) -> bool:
        return name in self.recipe_examples

    def __init__(self, int8_io: bool = False):
        self.module = None
        self.example = None
        self.int8_io = int8_io  # keep the integer-only interface (integer-only accelerators)

    def to_fp32(self, source, path: Path, opset: int) -> Path:
        _require_litert_torch()
        import torch

        self.module = source.module
        self.example = (torch.zeros([d if isinstance(d, int) else 1 for d in source.input_spec.shape]),)
        self._convert(self.module, path)
        compact(path)
        return path

    def _convert(self, module, path: Path, quant_config=None) -> None:
        import litert_torch

        try:
            with _quiet():
                litert_torch.convert(module, self.example, quant_config=quant_config).export(str(path))
        except Exception as e:
            raise BadInput(f"litert-torch cannot convert this model: {_lowering_error(e, module, self.example)}"
                           ) from None

    def convert(self, fp32_path: Path, out_path: Path, precision: str) -> Path:
        if precision == "fp32":
            shutil.copyfile(fp32_path, out_path)  # already compacted
        elif precision == "fp16":
            _fp16_weights(fp32_path, out_path)
            compact(out_path)
        else:
            raise ValueError("int8 goes through quantize_int8")
        return out_path

    def prepare_int8(self, fp32_path: Path, workdir: Path) -> Path:
        return fp32_path  # PT2E works on the PyTorch module itself

    def quantize_int8(self, prepared: Path, out_path: Path, calib: np.ndarray, recipe, per_channel: bool,
                      exclude: list[str] | None = None) -> QuantResult:
        if recipe.litert:
            _litert_quantizer_int8(prepared, out_path, calib)
            self._finish_int8(out_path)
            return QuantResult(out_path, recipe)
        import torch
        from litert_torch.quantize import pt2e_quantizer as pq
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import quantize_pt2e

        quantizer = pq.PT2EQuantizer().set_global(pq.get_symmetric_quantization_config(is_per_channel=per_channel))
        with _quiet():
            graph = torch.export.export(self.module, self.example).module()
            prepared_module = quantize_pt2e.prepare_pt2e(graph, quantizer)
        batch = self.example[0].shape[0]
        with ui.progress("calibrating", len(calib)) as advance, torch.no_grad():
            for i in range(0, len(calib) - batch + 1, batch):
                prepared_module(torch.from_numpy(np.ascontiguousarray(calib[i:i + batch], dtype=np.float32)))
                advance(batch)
        with _quiet():
            converted = quantize_pt2e.convert_pt2e(prepared_module, fold_quantize=False)
        self._convert(converted, out_path, QuantConfig(pt2e_quantizer=quantizer))
        self._finish_int8(out_path)
        return QuantResult(out_path, recipe)

    def int8_method(self, recipe) -> str:
        """What quantized the model, for the manifest (never onnxruntime's quantize_static here)."""
        from lepton_edge.compress.quantize import _version

        if recipe.litert:
            return (f"LiteRT quantizer (ai-edge-quantizer {_version('ai-edge-quantizer')}, static a8w8) on the fp32 "
                    "TFLite model, weights int8 per-channel")
        return (f"PT2E (torchao prepare/convert_pt2e with litert-torch {_version('litert-torch')}'s symmetric "
                "quantizer, histogram observers), weights int8 per-channel")

    def _finish_int8(self, path: Path) -> None:
        if not self.int8_io:
            float_io(path)
        compact(path)

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


def _read_model(data: bytes):
    """The flatbuffer as objects, with buffers stored after the flatbuffer (offset/size, as
    ai-edge-quantizer writes them) pulled inline so that writing the objects back keeps them."""
    from ai_edge_litert.tools import flatbuffer_utils as fu

    model = fu.convert_bytearray_to_object(bytearray(data))
    for b in model.buffers:
        if getattr(b, "offset", 0) > 1:
            b.data = np.frombuffer(data, np.uint8, count=b.size, offset=b.offset).copy()
            b.offset, b.size = 0, 0
    return model


def _pack(model) -> bytes:
    """The model object as .tflite bytes, each small numeric vector written once and shared by
    every table that holds the same content (flatbuffers allows it: the file is read-only).

    Why: the TFLite schema stores an int64 zero point per output channel for every per-channel
    weight and bias, and the interpreter requires as many zero points as scales. Symmetric int8 makes
    them all 0, so tensors with the same channel count can share one vector: MobileNetV2 int8 loses
    0.29 MB (7 %) of 3.98 MB this way, outputs bit-identical. Vectors over 64 KiB (weights) are
    written as they are.
    """
    import flatbuffers

    class SharingBuilder(flatbuffers.Builder):
        def __init__(self):
            super().__init__(1024)
            self.seen: dict[tuple[str, bytes], int] = {}

        def CreateNumpyVector(self, x):  # noqa: N802 (flatbuffers' name)
            if x.nbytes > 65536:
                return super().CreateNumpyVector(x)
            key = (x.dtype.str, x.tobytes())
            if key not in self.seen:
                self.seen[key] = super().CreateNumpyVector(x)
            return self.seen[key]

    builder = SharingBuilder()
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def compact(path: Path) -> None:
    """Shorten tensor names and store repeated quantization vectors once, in place; the signature's
    inputs and outputs keep their names.

    litert-torch names every tensor by its full module path (~400 bytes a tensor: 8 % of a small
    int8 model), and every per-channel tensor carries its own all-zero int64 zero points (see
    _pack). The result is checked against the original on random inputs and kept only
    when every output is bit-identical.
    """
    from lepton_edge.runtime.litert_loader import load_interpreter

    original = path.read_bytes()
    model = _read_model(original)
    for sg in model.subgraphs:
        keep = set(sg.inputs) | set(sg.outputs)
        for i, t in enumerate(sg.tensors):
            if i not in keep:
                t.name = f"t{i:x}"
    shrunk = _pack(model)

    def outputs(data: bytes) -> list[np.ndarray]:
        tmp = path.with_suffix(".check.tflite")
        tmp.write_bytes(data)
        try:
            it = load_interpreter(tmp, 1)
        finally:
            tmp.unlink(missing_ok=True)
        d = it.get_input_details()[0]
        rng = np.random.default_rng(0)
        res = []
        for _ in range(2):
            x = rng.standard_normal(d["shape"]).astype(np.float32)
            if np.issubdtype(d["dtype"], np.integer):
                x = np.clip(x * 40, -128, 127).astype(d["dtype"])
            it.set_tensor(d["index"], x)
            it.invoke()
            res.append(it.get_tensor(it.get_output_details()[0]["index"]).copy())
        return res

    want = outputs(original)
    try:
        got = outputs(shrunk)
    except BadInput:  # e.g. weights stored after the flatbuffer (buffer offsets), lost in the round trip
        return
    if all(np.array_equal(a, b) for a, b in zip(want, got)):
        path.write_bytes(shrunk)


def float_io(path: Path) -> None:
    """Give a full-int8 .tflite float input and output, in place: a QUANTIZE op in front of each int8
    input and a DEQUANTIZE op behind each int8 output (the body stays int8).

    Why: a third party feeds float frames, as to any other model; `--int8-io` keeps the integer-only
    interface that integer-only accelerators need.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fu

    model = _read_model(path.read_bytes())
    sg = model.subgraphs[0]
    integer = (schema.TensorType.INT8, schema.TensorType.UINT8)

    def opcode(builtin: int) -> int:
        for i, c in enumerate(model.operatorCodes):
            if max(c.builtinCode, c.deprecatedBuiltinCode) == builtin:
                return i
        code = schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
        model.operatorCodes.append(code)
        return len(model.operatorCodes) - 1

    def float_twin(idx: int) -> int:
        old = sg.tensors[idx]
        new = schema.TensorT()
        new.name, old.name = old.name, (old.name or b"") + b"_int8"
        new.shape, new.shapeSignature, new.type, new.buffer = old.shape, old.shapeSignature, schema.TensorType.FLOAT32, 0
        sg.tensors.append(new)
        return len(sg.tensors) - 1

    moved: dict[int, int] = {}
    for pos, idx in enumerate(list(sg.inputs)):
        if sg.tensors[idx].type in integer:
            twin = float_twin(idx)
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = opcode(schema.BuiltinOperator.QUANTIZE), [twin], [idx]
            sg.operators.insert(0, op)
            sg.inputs[pos] = moved[idx] = twin
    for pos, idx in enumerate(list(sg.outputs)):
        if sg.tensors[idx].type in integer:
            twin = float_twin(idx)
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = opcode(schema.BuiltinOperator.DEQUANTIZE), [idx], [twin]
            sg.operators.append(op)
            sg.outputs[pos] = moved[idx] = twin
    for sig in model.signatureDefs or []:
        for tm in list(sig.inputs or []) + list(sig.outputs or []):
            tm.tensorIndex = moved.get(tm.tensorIndex, tm.tensorIndex)
    path.write_bytes(bytes(fu.convert_object_to_bytearray(model)))


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
