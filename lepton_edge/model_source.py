"""What the user asked to export, loaded into one shape: a torch module or an ONNX file.

Accepts a `torch.nn.Module`, `.pt` (TorchScript), `.pt2` (torch.export), `.onnx`, or `zoo:<name>`.
The input shape comes from the model file, the `--input-shape` flag, or the target profile.
Every way a file can be wrong ends in BadInput with one line, never a traceback.
"""
from __future__ import annotations

import abc
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ValidationError

from lepton_edge import frame_input
from lepton_edge.bundle import DTYPES, InputSpec, first_error, guess_layout
from lepton_edge.errors import BadInput, first_line
from lepton_edge.paths import check_onnx_file
from lepton_edge.plugins import Registry


@dataclass
class ModelSource:
    name: str
    kind: str  # "torch" | "onnx"
    input_spec: InputSpec
    module: Any = None  # torch.nn.Module when kind == "torch"
    onnx_path: Path | None = None
    labels: list[str] | None = None
    task: str = "classify"
    zoo: Any = None  # ZooModel when from the zoo
    trained: bool = True  # False: random weights (zoo:mobilenetv2 without --weights)
    batch: int | None = None  # the only batch size the model accepts (a .pt2 traced at batch 1), None = any
    notes: list[str] = field(default_factory=list)
    extra_inputs: list[InputSpec] = field(default_factory=list)  # non-image inputs with their constant `value`
    constant_rules: dict[str, str] = field(default_factory=dict)  # extra input -> how its value was chosen
    quantized_ops: dict[str, int] = field(default_factory=dict)  # an already quantized ONNX file's int8 ops
    float_weight_ops: int = 0  # of those, how many Conv/MatMul/Gemm still have float weights (float_weight_ops)
    fp16_weights: float = 0.0  # an ONNX file's share of float weights stored as fp16
    frame_from: list | None = None  # a 3-D input's own dims, now fed the frame's 4-D tensor (frame_input.py)


def parse_shape(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise BadInput(f"--input-shape must look like 1,3,224,224, got {text!r}") from None
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise BadInput(f"--input-shape must have positive dimensions, got {text!r}")
    return dims


def default_spec(shape: list, name: str = "input", layout: str | None = None, color: str | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None) -> InputSpec:
    if len(shape) < 2:  # a scalar or a vector: no channel dimension a frame could fill
        raise BadInput(f"input {name!r} has shape {list(shape)}: not an image (want a batch, channels and "
                       "height/width, e.g. [1,3,224,224]); give --input-shape if its dimensions are not fixed")
    layout = layout or (guess_layout(shape) or "NCHW")
    c = shape[1] if layout == "NCHW" else shape[-1]
    if color and c in (1, 3) and c != (1 if color == "GRAY" else 3):  # a bundle the device could never feed
        raise BadInput(f"--color {color} gives {1 if color == 'GRAY' else 3} channel(s), but input {name!r} "
                       f"{list(shape)} ({layout}) has {c}; give --color {'GRAY' if c == 1 else 'RGB or BGR'}")
    color = color or ("GRAY" if c == 1 else "RGB")
    n = 1 if color == "GRAY" else 3
    try:
        return InputSpec(name=name, shape=list(shape), layout=layout, color=color,
                         mean=mean or [0.0] * n, std=std or [1.0] * n)
    except ValidationError as e:  # a shape over the input size limit (--input-shape 1,3,100000,100000)
        raise BadInput(f"input {name!r}: {first_error(e)}") from None


def _typed(spec: InputSpec, elem_type: int) -> InputSpec:
    """`spec` fed in the input's own element type: float16/float64 as such, and a uint8 or int8 input (an
    image model that normalises inside its graph) the raw pixels, as `run` feeds it (runtime/spec.py); so are
    wider integers (token ids, counts: values scaled by 1/255 were fractions, refused with advice to feed
    0..255 pixels, which then changed every id)."""
    import numpy as np
    import onnx

    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return spec
    if dtype == "float32" or dtype not in DTYPES:
        return spec
    return spec.model_copy(update={"dtype": dtype, **({"scale": 1.0} if np.issubdtype(np.dtype(dtype), np.integer)
                                                      else {})})


def _external_data_fits(path: Path) -> None:
    """The weights an .onnx keeps in files beside it, added up before onnx.load reads them all: over the
    memory this machine has available they are one line. Why: a 200-byte .onnx naming a 4 GB (sparse)
    weights file beside it was read whole. (Where those files may be, onnx.load checks: inside the
    model's folder.)"""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from lepton_edge.compress.calibration import available_bytes

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise BadInput(f"{path}: not a readable ONNX model ({first_line(e, 300)})") from None
    total, files = 0, {}
    for t in _tensors(m.graph):
        if not uses_external_data(t):
            continue
        try:
            info = ExternalDataInfo(t)
            length = int(info.length) if info.length else None
        except (ValueError, TypeError) as e:  # a length or offset of "-1" or "abc"
            raise BadInput(f"{path}: tensor {t.name[:64]!r}: bad external data entry ({first_line(e, 160)})") from None
        f = path.parent / info.location
        try:
            files.setdefault(info.location, f.stat().st_size if f.is_file() else 0)
        except OSError:
            continue  # (onnx.load says what is wrong with it)
        total += length if length is not None else files[info.location]
    avail = available_bytes()
    if avail is not None and total > avail:
        raise BadInput(f"{path}: its external weights are {total:,} bytes, more than this machine has available "
                       f"({avail:,})")


def _tensors(g):
    """Every tensor of graph `g` and its subgraphs: initializers and node attributes (Constant's value)."""
    yield from g.initializer
    for n in g.node:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(sub)


def _need_file(path: Path, what: str) -> None:
    if not path.exists():
        raise BadInput(f"{what} not found: {path}")
    if not path.is_file():
        raise BadInput(f"{what} is not a file: {path}")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}") from None


# operator domains onnxruntime's CPU build has kernels for; anything else needs a custom-op library, and
# a model never names native code for us to load
ORT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc",
                         "com.microsoft.experimental"})


def _no_custom_ops(path: Path, model) -> None:
    """Refuse, at load, a model with operators of another domain (a custom op), naming them: later the
    same model failed only when onnxruntime loaded the export's working copy, named as that copy."""
    functions = {(f.domain, f.name) for f in model.functions}  # a model-local function is defined in the file
    custom = sorted({f"{n.domain}:{n.op_type}" for n in _nodes([model.graph, *model.functions])
                     if n.domain not in ORT_DOMAINS and (n.domain, n.op_type) not in functions})
    if custom:
        raise BadInput(f"{path}: custom operators {', '.join(custom[:5])} have no kernels in onnxruntime, and "
                       "lepton-edge loads no custom-op library: export the model with standard ONNX operators")


def _nodes(graphs: list) -> Iterator:
    """Every node of `graphs` (graphs or model-local functions) and of the subgraphs inside them (If
    branches, Loop and Scan bodies): a custom operator inside a branch fails to load as surely as one
    at the top."""
    import onnx

    stack = list(graphs)
    while stack:
        g = stack.pop()
        for n in g.node:  # (a GraphProto or a FunctionProto)
            yield n
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    stack.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(a.graphs)


def _image_shape(path: Path, name: str, dims: list, input_shape: list[int] | None, hw: tuple[int, int]) -> list:
    """The image input's static shape: --input-shape (which must fit the model's fixed dims), else the
    model's, its dynamic spatial dims at the target's input size and a dynamic batch at 1. A fixed batch
    other than 1 is refused: the device feeds one frame a run."""
    if input_shape:
        if len(input_shape) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, input_shape)):
            raise BadInput(f"--input-shape {input_shape} does not fit the model's input {name} {dims}")
        shape: list = list(input_shape)
    else:
        shape = list(dims)
        layout = guess_layout([d if isinstance(d, int) else 0 for d in dims]) or "NCHW"
        spatial = (2, 3) if layout == "NCHW" else (1, 2)
        for i, v in zip(spatial, hw):
            if i < len(shape) and not isinstance(shape[i], int):
                shape[i] = v  # dynamic spatial dims take the target's input size
        if shape and not isinstance(shape[0], int):
            shape[0] = 1
        if any(not isinstance(d, int) for d in shape):
            raise BadInput(f"{path}: input {name} has dynamic dimensions {dims}: pass --input-shape")
    if len(shape) == 4 and shape[0] != 1:  # (--input-shape's batch is checked by `load`, for every source)
        raise BadInput(f"{path}: input {name} {dims}: the model takes a fixed batch of {shape[0]}, and the device "
                       "feeds one camera frame a run: use batch 1 or a dynamic batch")
    return shape


def _load_onnx(path: Path, input_shape: list[int] | None, hw: tuple[int, int],
               input_values: dict[str, list[float]] | None = None, **spec_kw) -> ModelSource:
    import onnx

    _need_file(path, "model file")
    check_onnx_file(path)
    _external_data_fits(path)
    try:
        m = onnx.load(str(path))
    except Exception as e:
        raise BadInput(f"{path}: not a readable ONNX model ({first_line(e, 300)})") from None
    try:  # (it reads, but breaks the format's rules: an output without a shape field, say, which runtimes take)
        onnx.checker.check_model(m)
    except Exception as e:
        raise BadInput(f"{path}: the ONNX checker refuses this model, so it cannot be exported as it is "
                       f"({first_line(e, 300)})") from None
    _no_custom_ops(path, m)
    _numeric_outputs(path, m)
    _drop_defaults(m, set(input_values or {}))
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]

    from lepton_edge.bundle import onnx_dims as dims_of

    # Several inputs: the camera frame feeds the one image input (4-D float, 1/3/4 channels); every
    # other input gets one constant (--input-value's, else datasets.constant_value's rule), baked into
    # the graph as that input's default, so calibration, validation and the device all feed the same value.
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    images = [i for i in inputs if i.type.tensor_type.elem_type in floats and len(dims_of(i)) == 4
              and guess_layout([d if isinstance(d, int) else 0 for d in dims_of(i)])] if len(inputs) > 1 else inputs
    if len(images) != 1:
        what = "none looks like an image (4-D float, 1 or 3 channels)" if not images else \
            f"{len(images)} look like images ({', '.join(i.name for i in images)}); a camera frame feeds one"
        raise BadInput(f"{path}: the model has {len(inputs)} inputs and {what}")
    inp = images[0]
    others = [i for i in inputs if i is not inp]
    dims = dims_of(inp)
    if others and any(not isinstance(dims_of(o)[0], int) for o in others if dims_of(o)):
        dims[0] = 1  # per-image constants ([N,2] im_shape): the values are one frame's, so batch 1
    dims3 = dims if not others and len(dims) == 3 else None
    if dims3:  # [N,H,W] gray, [C,H,W], [H,W,C]: the model takes the 4-D frame tensor (frame_input.py)
        dims = frame_input.frame_dims(dims3)
        if input_shape and len(input_shape) == 3:  # (the model's own rank: the frame's added dim is 1)
            axis = frame_input.added_axis(dims3)
            if any(isinstance(d, int) and d != s for d, s in zip(dims3, input_shape)):
                raise BadInput(f"--input-shape {input_shape} does not fit the model's input {inp.name} {dims3}")
            if axis == 1 and input_shape[0] != 1:
                raise BadInput(f"--input-shape {input_shape} asks for a batch of {input_shape[0]}, and the device "
                               "feeds one camera frame a run: use batch 1")
            input_shape = list(input_shape)
            input_shape.insert(axis, 1)
    shape = _image_shape(path, inp.name, dims, input_shape, hw)
    spec = _typed(default_spec(shape, name=inp.name, **spec_kw), inp.type.tensor_type.elem_type)
    src = ModelSource(name=path.stem, kind="onnx", input_spec=spec, onnx_path=path, task="raw",
                      quantized_ops=quantized_ops(m), float_weight_ops=float_weight_ops(m), fp16_weights=_fp16_share(m))
    if input_shape is None and any(not isinstance(d, int) for d in dims[1:]):
        src.notes = [*src.notes, f"input {inp.name} {dims}: its open dims taken as {shape} (the target's input size; "
                                 "--input-shape sets others)"]
    if dims3:
        frame_input.as_frame_input(m, inp.name, dims3)
        _use_copy(src, m, path)
        src.frame_from = dims3
        src.notes = [*src.notes, f"input {inp.name} {dims3} takes the frame's tensor {shape}, as `run` feeds "
                                 "a model file of that shape (a Squeeze in front of the graph)"]
    if not others:
        return src
    from lepton_edge.compress import quantize

    _check_value_names(input_values or {}, inp.name, [o.name for o in others])
    values, specs, notes, rules = {}, [], [], {}
    hw = spec.hw()
    inp.type.tensor_type.shape.dim[0].dim_value = shape[0]
    for o in others:
        odims = dims_of(o)
        if odims and not isinstance(odims[0], int):
            odims[0] = 1
            o.type.tensor_type.shape.dim[0].dim_value = 1
        if any(not isinstance(d, int) for d in odims):
            raise BadInput(f"{path}: input {o.name} {dims_of(o)} is not an image and has dynamic dimensions "
                           "past the batch: export cannot give it a value")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type)
        values[o.name], rule = _constant_for(o.name, odims, dtype, hw, input_values or {})
        rules[o.name] = rule
        specs.append(InputSpec(name=o.name, shape=odims, dtype=str(values[o.name].dtype),
                               value=values[o.name].ravel().tolist()))
        notes.append(f"input {o.name} {odims}: {rule}")
    _use_copy(src, quantize.with_defaults(m, values), path)
    src.extra_inputs, src.notes, src.constant_rules = specs, [*src.notes, *notes], rules
    return src


# the ops of a graph quantized already: QDQ pairs, onnxruntime's QOperator and dynamic-quantization forms
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                           "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul",
                           "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
                           "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"})


def _fp16_share(m) -> float:
    """The share of float weight elements stored as fp16; 0 for a model with no float weight at all (which
    fp16.fp16_weight_fraction counts as all fp16: nothing is left to convert there)."""
    import onnx

    from lepton_edge.compress.fp16 import fp16_weight_fraction

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    weights = list(m.graph.initializer) + [a.t for n in m.graph.node if n.op_type == "Constant"
                                           for a in n.attribute if a.name == "value"]
    return fp16_weight_fraction(m) if any(t.data_type in floats for t in weights) else 0.0


def quantized_ops(m) -> dict[str, int]:
    """How many of each quantized op the graph holds (main graph; {} for a float model)."""
    counts: dict[str, int] = {}
    for n in m.graph.node:
        if n.op_type in QUANTIZED_OPS:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")  # float ops whose second input is a weight


def float_weight_ops(m) -> int:
    """How many Conv/ConvTranspose/MatMul/Gemm nodes of the main graph take a float weight: an
    initializer or Constant of a float type as their second input (an int8 QDQ graph's come from a
    DequantizeLinear; its integer ops, QLinearConv and MatMulInteger, are not counted, nor is a MatMul
    of two activations). Why: a file with a quantized op or two (one Q/DQ pair at its input) is a float
    model to quantize; one with no float weight left is int8 as it is (exporters/base._as_given)."""
    import onnx

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    weights = {i.name for i in m.graph.initializer if i.data_type in floats}
    weights |= {o for n in m.graph.node if n.op_type == "Constant" for a in n.attribute
                if a.name == "value" and a.t.data_type in floats for o in n.output}
    return sum(1 for n in m.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in weights)


def _numeric_outputs(path: Path, m) -> None:
    """One line for a tensor output of a type no bundle can carry (a string label, complex numbers): it
    passed every step to the manifest, where it ended the export with a traceback."""
    import numpy as np
    import onnx

    for o in m.graph.output:
        if o.type.WhichOneof("value") != "tensor_type":
            continue  # (sequences and maps: refused where the outputs are read)
        elem = o.type.tensor_type.elem_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).name
        except (KeyError, TypeError, ValueError):
            dtype = ""
        if dtype not in DTYPES:
            kind = onnx.TensorProto.DataType.Name(elem).lower() if elem in onnx.TensorProto.DataType.values() \
                else f"type {elem}"
            raise BadInput(f"{path}: output {o.name!r} is a tensor of {kind}, which no bundle can carry (numbers "
                           "and bool only): export the model without it, or cast it to a number in the graph")


def _use_copy(src: ModelSource, m, path: Path) -> None:
    """`src` exports the changed model `m` (of the file at `path`), saved to a temporary copy that lives
    as long as `src` does."""
    import os
    import tempfile
    import weakref

    import onnx

    fd, tmp = tempfile.mkstemp(prefix=f"{path.stem}-", suffix=".onnx")
    os.close(fd)
    try:
        onnx.save(m, tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    src.onnx_path = Path(tmp)
    weakref.finalize(src, os.unlink, tmp)


def _drop_defaults(m, names: set[str]) -> None:
    """The defaults the file itself gives the inputs in `names` (an initializer of the input's name),
    removed: --input-value replaces them, so those inputs are given their value like any other
    constant input."""
    have = names & {i.name for i in m.graph.input}
    if have:
        keep = [t for t in m.graph.initializer if t.name not in have]
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)


def _check_value_names(given: dict[str, list[float]], image: str, constants: list[str]) -> None:
    """--input-value names one of the model's constant inputs, or one BadInput line."""
    for name in given:
        if name not in constants:
            why = (f"{name!r} is the image input (the camera frame feeds it)" if name == image
                   else f"the model has no input {name!r}")
            raise BadInput(f"--input-value: {why}; its constant inputs: {', '.join(constants)}")


def _constant_for(name: str, shape: list[int], dtype, hw: tuple[int, int], given: dict[str, list[float]]):
    """(value, how it was chosen) for the non-image input `name`: --input-value's, else the rule by
    name (datasets.constant_value)."""
    from lepton_edge.exporters import datasets

    if name in given:
        return _given_value(name, given[name], shape, dtype), "set by --input-value"
    return datasets.constant_value(name, shape, dtype, hw)


def _given_value(name: str, values: list[float], shape: list[int], dtype):
    """--input-value's numbers as the input's array: as many as the shape holds, whole numbers for
    an integer input."""
    import numpy as np

    from lepton_edge.exporters.datasets import MAX_CONSTANT_VALUES

    n = int(np.prod(shape)) if shape else 1
    if n > MAX_CONSTANT_VALUES:
        raise BadInput(f"--input-value {name}: the input {shape} holds {n} values, more than a constant can "
                       f"(at most {MAX_CONSTANT_VALUES})")
    if len(values) != n:
        raise BadInput(f"--input-value {name}: {len(values)} value(s) given, the input {shape} takes {n}")
    arr = np.asarray(values, dtype=np.float64)
    dt = np.dtype(dtype)
    if dt.kind in "iub":
        if not np.all(arr == np.round(arr)):
            raise BadInput(f"--input-value {name}: the input is {dt.name}; give whole numbers, got {values}")
        lo, hi = (0, 1) if dt.kind == "b" else (np.iinfo(dt).min, np.iinfo(dt).max)  # (bool: 2 was read as True)
        if arr.min() < lo or arr.max() > hi:
            raise BadInput(f"--input-value {name}: values out of {dt.name}'s range ({lo} to {hi}), "
                           f"got {values}")
    elif dt.kind == "f" and np.any(np.abs(arr) > np.finfo(dt).max):
        raise BadInput(f"--input-value {name}: values out of {dt.name}'s range, got {values}")
    return arr.reshape(shape).astype(dt, order="C")  # (not np.ascontiguousarray: a 0-d value would become (1,))


def _example_shape(input_shape, example_input, profile_hw) -> tuple[list[int], str | None]:
    """The input shape and, when it is only the target's default guess, a hint for the error."""
    if example_input is not None:
        return list(example_input.shape), None
    if input_shape:
        return list(input_shape), None
    shape = [1, 3, *profile_hw]
    return shape, f" (the target's default input {shape}; pass --input-shape / example_input=)"


LOADERS: Registry[type[ModelLoader]] = Registry("lepton_edge.model_loaders", "model loader", {
    "zoo": "lepton_edge.model_source:ZooLoader",
    "torch-module": "lepton_edge.model_source:TorchModuleLoader",
    "onnx": "lepton_edge.model_source:OnnxLoader",
    "torch-file": "lepton_edge.model_source:TorchFileLoader",
})


class ModelLoader(abc.ABC):
    """Turns one kind of model description into a ModelSource.

    Why a registry (like runtime backends): a new kind of model is one class; defining a subclass
    with a `name` registers it, and another package adds one through the `lepton_edge.model_loaders`
    entry point group. `load()` asks each loader in registration order (built-ins first) whether it
    `accepts` the model: by default a str/Path starting with one of `prefixes` or ending with one of
    `suffixes`."""

    name: ClassVar[str]
    prefixes: ClassVar[tuple[str, ...]] = ()
    suffixes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            LOADERS.add(cls.name, cls)

    @classmethod
    def accepts(cls, model: Any) -> bool:
        if not isinstance(model, (str, Path)):
            return False
        text = str(model)
        return text.startswith(cls.prefixes) if cls.prefixes else Path(text).suffix.lower() in cls.suffixes

    @abc.abstractmethod
    def load(self, model: Any, *, profile_hw: tuple[int, int], input_shape: list[int] | None = None,
             example_input: Any = None, weights: str | None = None, labels: list[str] | None = None,
             name: str | None = None, **spec_kw) -> ModelSource:
        """The ModelSource, or BadInput with one line. `input_values` (--input-value) is passed only
        when the user gave it; a loader of single-input models may leave it out of its signature."""


class ZooLoader(ModelLoader):
    name = "zoo"
    prefixes = ("zoo:",)

    def load(self, model, *, profile_hw, input_shape=None, example_input=None, weights=None, labels=None,
             name=None, **spec_kw) -> ModelSource:
        from lepton_edge import zoo

        entry = zoo.get(str(model))
        module = entry.load(weights)
        hw = entry.input_hw
        if input_shape:
            if len(input_shape) != 4:
                raise BadInput(f"--input-shape for zoo:{entry.name} must be N,C,H,W")
            hw = (input_shape[2], input_shape[3])
        spec = entry.input_spec(hw)
        _check_runs(module, spec if not input_shape else default_spec(input_shape))
        return ModelSource(
            name=name or entry.name, kind="torch", input_spec=spec, module=module, labels=labels or entry.labels,
            task=entry.task, zoo=entry, trained=bool(entry.weights or weights),
        )


class TorchModuleLoader(ModelLoader):
    """A Python object of torch's (checked by its class's module, so nothing imports torch to ask)."""

    name = "torch-module"

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return any(c.__module__.split(".")[0] == "torch" for c in type(model).__mro__)

    def load(self, model, *, profile_hw, input_shape=None, example_input=None, weights=None, labels=None,
             name=None, **spec_kw) -> ModelSource:
        import torch

        if not isinstance(model, torch.nn.Module):
            raise BadInput(f"cannot export a {type(model).__name__}: give a torch.nn.Module, a file path or zoo:<name>")
        shape, hint = _example_shape(input_shape, example_input, profile_hw)
        return _torch_source(model.eval(), shape, name or type(model).__name__.lower(), labels, hint, **spec_kw)


class OnnxLoader(ModelLoader):
    name = "onnx"
    suffixes = (".onnx",)

    def load(self, model, *, profile_hw, input_shape=None, example_input=None, weights=None, labels=None,
             name=None, input_values=None, **spec_kw) -> ModelSource:
        path = Path(model)
        src = _load_onnx(path, input_shape, profile_hw, input_values, **spec_kw)
        src.name = name or src.name
        src.labels = labels
        src.task = "classify" if labels else "raw"
        return src


class TorchFileLoader(ModelLoader):
    name = "torch-file"
    suffixes = (".pt", ".pth", ".pt2", ".ts", ".jit", ".torchscript")  # (silero-vad ships TorchScript as .jit)

    def load(self, model, *, profile_hw, input_shape=None, example_input=None, weights=None, labels=None,
             name=None, **spec_kw) -> ModelSource:
        path = Path(model)
        _need_file(path, "model file")
        module, recorded = _load_torch_file(path)
        open_dims = recorded is not None and any(d is None for d in recorded[1:])  # (past a dynamic batch)
        recorded, dynamic = _symbolic_shape(recorded, profile_hw)
        shape, hint = _example_shape(input_shape or recorded, None, profile_hw)
        hint = None if input_shape else dynamic or hint
        src = _torch_source(module, shape, name or path.stem, labels, hint, from_file=True, **spec_kw)
        if not input_shape and (recorded is None or open_dims):  # (a guess: said, as an ONNX file's open dims are)
            src.notes = [*src.notes, f"input {src.input_spec.name} taken as {shape} ("
                                     + ("its dynamic dims at the target's input size" if recorded else
                                        "the file records no input shape: the target's input size")
                                     + "; --input-shape sets another)"]
        return src


# A converted file given to export: what it can do as it is, and what export takes instead. Why: a user
# with a third-party .tflite (mediapipe's, say) read only the list of suffixes, and not that `run` and
# `inspect` take the file itself.
CONVERTED_HINT = {
    ".tflite": "; a .tflite is converted already: `lepton-edge inspect FILE` shows it and `lepton-edge run FILE "
               "--source ...` runs it as it is; export the .onnx or PyTorch model it came from for a bundle",
}


def load(model: Any, *, profile_hw: tuple[int, int], input_shape: list[int] | None = None,
         example_input: Any = None, weights: str | None = None, labels: list[str] | None = None,
         name: str | None = None, input_values: dict[str, list[float]] | None = None, **spec_kw) -> ModelSource:
    """Load any supported model description into a ModelSource, with the first registered loader
    that accepts it. `input_values`: the constants of a multi-input model's non-image inputs."""
    loaders = LOADERS.all().values()
    loader = next((cls for cls in loaders if cls.accepts(model)), None)
    if loader is None:
        if not isinstance(model, (str, Path)):
            raise BadInput(f"cannot export a {type(model).__name__}: give a torch.nn.Module, a file path or zoo:<name>")
        path = Path(model)
        want = [s for c in loaders for s in c.suffixes] + [f"{p}<name>" for c in loaders for p in c.prefixes]
        raise BadInput(f"{path}: unsupported model type '{path.suffix.lower() or path.name}' "
                       f"(want {', '.join(want[:-1])} or {want[-1]})" + CONVERTED_HINT.get(path.suffix.lower(), ""))
    if input_shape and len(input_shape) == 4 and input_shape[0] != 1:  # any source: the device feeds one frame
        raise BadInput(f"--input-shape {input_shape} asks for a batch of {input_shape[0]}, and the device feeds one "
                       "camera frame a run: use batch 1")
    if example_input is not None:
        shape = getattr(example_input, "shape", None)
        if shape is None or not all(isinstance(d, int) for d in shape):
            raise BadInput(f"example_input must be a tensor such as torch.zeros(1, 3, 224, 224), got a "
                           f"{type(example_input).__name__}")
        if len(shape) == 4 and shape[0] != 1:
            raise BadInput(f"example_input has a batch of {shape[0]}, and the device feeds one camera frame a run: "
                           "use batch 1")
    if input_values:  # passed only when given: a plug-in loader of single-input models need not know it
        if loader.__module__ == __name__ and loader is not OnnxLoader:  # the built-in PyTorch loaders: one input
            raise BadInput("--input-value sets the constant inputs of an ONNX model with several inputs; "
                           "a PyTorch model here has one input, the image")
        spec_kw["input_values"] = input_values
    src = loader().load(model, profile_hw=profile_hw, input_shape=input_shape, example_input=example_input,
                        weights=weights, labels=labels, name=name, **spec_kw)
    if input_values and not src.extra_inputs:
        raise BadInput(f"--input-value: {src.name} has one input ({src.input_spec.name}), fed by the camera; "
                       "--input-value sets the constant inputs of a model with several")
    return src


# Ops a model's graph may not hold: they read or write files (a TorchScript forward that ran
# `torch.from_file("/etc/passwd", ...)` put the file's bytes in the bundle, one that filled a file it mapped
# overwrote it, both while the export only checked that the model runs).
FILE_OPS = frozenset({"aten::from_file", "aten::save", "debugprims::load_tensor"})
FILE_OP_NAMESPACES = ("symm_mem::",)  # (shared memory across processes)
# the same ops as the archive's own text spells them: TorchScript's code/*.py (`torch.from_file(...)`, every
# method, `__setstate__` that jit.load runs, fork targets) and a .pt2's serialized graphs (`torch.ops.aten.
# from_file.default`, higher-order ops' branches included), read before anything in the file is loaded
FILE_OP_WORDS = re.compile(rb"\bfrom_file\b|\baten[.:]+save\b|\btorch\.save\b|\bload_tensor\b|\bsymm_mem\b")
SCANNED_BYTES = 64 << 20  # the archive text read for that scan at most (code and graphs, not weights)


def _load_torch_file(path: Path):
    """(module, input shape recorded in the file or None; a dynamic dim is None there).

    Nothing in the file is unpickled as Python objects: a pickle names the code that builds it (a whole
    module's class, or os.system), and it ran on load, before any check. TorchScript and state_dict
    tensors have loaders that build tensors and TorchScript types only; a pickled whole module
    (torch.save(model)) is refused, since it cannot be loaded otherwise, and a .pt2 loads with torch.load
    held to tensors and no compiled (AOTInductor) code."""
    import torch

    _refuse_file_ops_in_archive(path)
    if path.suffix.lower() == ".pt2":
        ep = _load_exported_program(path)
        user = set(ep.graph_signature.user_inputs)
        shapes = [list(n.meta["val"].shape) for n in ep.graph.nodes
                  if n.op == "placeholder" and n.name in user and hasattr(n.meta.get("val"), "shape")]
        if len(shapes) != 1:
            raise BadInput(f"{path}: export supports models with one image input; this one has {len(shapes)}")
        _refuse_file_ops(path, (getattr(getattr(n.target, "_schema", None), "name", "") for n in ep.graph.nodes
                                if n.op == "call_function"))
        return ep.module(), [int(d) if str(d).isdigit() else None for d in shapes[0]]
    try:
        with _time_limited("loading the TorchScript file"):  # (jit.load runs the file's __setstate__ methods)
            module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:
        jit_err = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    else:
        _refuse_file_ops(path, _script_op_kinds(module))
        return module, None
    try:  # weights only: a state_dict's tensors load; any other object is refused before it is built
        with warnings.catch_warnings():  # (torch warns of a pickle protocol it may not read: it says so below)
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        _refuse_pickled(path, e)
        raise BadInput(f"{path}: not a TorchScript (.pt) file ({jit_err})") from None
    if isinstance(obj, dict):
        raise BadInput(f"{path}: holds a state_dict, not a model: use zoo:<arch> --weights {path.name}, "
                       "or save it with torch.jit.save / torch.export.save")
    raise BadInput(f"{path}: holds a {type(obj).__name__}, not a model")


def _refuse_pickled(path: Path, e: Exception) -> None:
    """BadInput when `e` is torch's weights-only refusal of a pickle, naming the class or function it
    names ("GLOBAL posix.system" in torch's message)."""
    import pickle

    if "weights only load failed" not in str(e).lower() and not isinstance(e, pickle.UnpicklingError):
        return
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    raise BadInput(f"{path}: holds a pickled Python object ({f'it names {m.group(1)}' if m else 'not tensors alone'})"
                   ", and unpickling it would run whatever code the file names, so it is not loaded: save the model "
                   "with torch.jit.save(torch.jit.trace(model, x)) or torch.export.save, or load it yourself and "
                   "pass the module to lepton_edge.export()") from None


def _load_exported_program(path: Path):
    """torch.export.load with no code from the file: a .pt2 with AOTInductor's compiled libraries (native
    code, loaded as they are read) is refused, and torch.load is held to tensors while the archive loads
    (torch reads weights flagged `use_pickle`, and an old archive's state dict, with weights_only=False)."""
    import zipfile

    import torch

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise BadInput(f"{path}: not a readable torch.export (.pt2) file ({first_line(e)})") from None
    # (torch's entries are <archive name>/data/aotinductor/...; the archive name is the saved file's stem)
    native = [n for n in names if "/data/aotinductor/" in f"/{n}" or n.lower().endswith((".so", ".dll", ".dylib"))]
    if native:
        raise BadInput(f"{path}: holds compiled code ({native[0]}), which export does not load: save the "
                       "model with torch.export.save alone (no AOTInductor package)")
    try:
        from torch.export.pt2_archive import _package
    except ImportError:  # (torch before 2.7: its .pt2 reader unpickles through torch.load alone)
        _package = None
    # one load at a time, each putting back what it found under the lock (found before it, another load's
    # patch would be put back for good)
    with _PATCHED, _time_limited("loading the .pt2 file"):
        real_load = torch.load

        def tensors_only(f, *args, **kwargs):
            kwargs["weights_only"] = True
            return real_load(f, *args, **kwargs)

        real_pickle = getattr(_package, "pickle", None)
        if _package is not None:
            _package.pickle = _NoPickle()
        torch.load = tensors_only
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.export.load(str(path))
        except Exception as e:
            _refuse_pickled(path, e)
            first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise BadInput(f"{path}: not a readable torch.export (.pt2) file ({first})") from None
        finally:
            torch.load = real_load
            if _package is not None:
                _package.pickle = real_pickle


_PATCHED = threading.Lock()  # torch.load and torch's .pt2 reader are the process's while a .pt2 loads


@contextmanager
def _time_limited(what: str, seconds: float | None = None):
    """Work on a model file within CHECK_RUN_S (or `seconds`), else the process ends with one line
    (runtime/hard_stop: torch's interpreter cannot be stopped, and releases the GIL, so its watcher runs)."""
    from lepton_edge.runtime import hard_stop

    limit = hard_stop.begin(what, seconds or CHECK_RUN_S)
    try:
        yield
    finally:
        hard_stop.end(limit)


def _refuse_file_ops_in_archive(path: Path) -> None:
    """One line for a TorchScript or .pt2 archive whose code or graphs name an op that reads or writes files
    (FILE_OP_WORDS), before torch loads anything of it. Why the text: jit.load runs a module's __setstate__
    (a `torch.from_file` there put a file's bytes in the model) and the graphs scanned after loading miss a
    fork's target and a higher-order op's branches. A file that is not a zip (a plain pickle) has no code."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            read = 0
            for info in z.infolist():
                name = info.filename
                if not (name.endswith(".json") or name.endswith(".py") and "/code/" in f"/{name}"):
                    continue
                read += info.file_size
                if read > SCANNED_BYTES:
                    raise BadInput(f"{path}: holds over {SCANNED_BYTES >> 20} MiB of code and graph text; "
                                   "not a model export reads")
                m = FILE_OP_WORDS.search(z.read(info))
                if m:
                    raise BadInput(f"{path}: the model's code calls {m.group().decode(errors='replace')} "
                                   f"({info.filename}), which reads or writes files: export does not load it")
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError):
        return  # (not a zip: torch's loaders say what it is)


class _NoPickle:
    """Stands in for the pickle module inside torch's .pt2 reader while it loads (its opaque constants are
    plain pickles)."""

    @staticmethod
    def loads(*_a, **_k):
        import pickle

        raise pickle.UnpicklingError("a pickled constant, which export does not load")


def _script_op_kinds(module) -> Iterator[str]:
    """Every op of a TorchScript module's forward, its submodules' calls and nested blocks included."""
    try:
        graph = module.inlined_graph
    except (AttributeError, RuntimeError):
        return
    todo = [graph.nodes()]
    while todo:
        for node in todo.pop():
            yield node.kind()
            todo.extend(b.nodes() for b in node.blocks())


def _refuse_file_ops(path: Path, kinds) -> None:
    for kind in kinds:
        if kind in FILE_OPS or kind.startswith(FILE_OP_NAMESPACES):
            raise BadInput(f"{path}: the model's graph calls {kind}, which reads or writes files: export does "
                           "not run it")


def _symbolic_shape(recorded: list | None, profile_hw: tuple[int, int]) -> tuple[list[int] | None, str | None]:
    """A .pt2's recorded input shape with its dynamic dims set (batch 1, height and width the target's), and
    the hint for an error. Why: they were all 1, and a model whose dims have a minimum (torch.export's
    Dim("h", min=16)) was refused at 1x1."""
    if recorded is None or all(d is not None for d in recorded):
        return recorded, None
    shape = list(recorded)
    if shape[0] is None:
        shape[0] = 1
    if len(shape) == 4:
        first = isinstance(shape[1], int) and shape[1] <= 4 or not (isinstance(shape[3], int) and shape[3] <= 4)
        spatial = (2, 3) if first else (1, 2)
        for axis, size in zip(spatial, profile_hw):
            if shape[axis] is None:
                shape[axis] = size
    shape = [1 if d is None else d for d in shape]
    return shape, f" (its dynamic dims set to {shape}; pass --input-shape / example_input=)"


def _torch_source(module, shape, name, labels, hint=None, from_file: bool = False, **spec_kw) -> ModelSource:
    spec = default_spec(list(shape), **spec_kw)
    batch = _check_runs(module, spec, hint or "", limited=from_file)
    return ModelSource(name=name, kind="torch", input_spec=spec, module=module, labels=labels,
                       task="classify" if labels else "raw", batch=batch)


def _check_runs(module, spec: InputSpec, hint: str = "", limited: bool = False) -> int | None:
    """Run the model once so a wrong input shape is a clear error now, not deep in the exporter.

    Returns the fixed batch size when the model refuses a batch of 2 (None when any batch works).
    `limited` (a model read from a file): within CHECK_RUN_S, else the process ends with one line
    (hard_stop): a TorchScript `while` that never ended held the export, and Ctrl-C and SIGTERM with it,
    for good. Not a module given from Python or the zoo's: ending the caller's process (a notebook's
    kernel) for a slow model of its own is not this check's to do.
    """
    if not limited:
        return _check_runs_once(module, spec, hint)
    with _time_limited("the model's check run (a zero input through it)"):
        return _check_runs_once(module, spec, hint)


CHECK_RUN_S = 120.0  # two runs of a zero input: seconds for a large model on a workstation


def _check_runs_once(module, spec: InputSpec, hint: str) -> int | None:
    import torch

    try:
        with torch.no_grad():
            module(torch.zeros([2] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]]))
        fixed = None
    except Exception:
        fixed = spec.shape[0] if isinstance(spec.shape[0], int) else 1
    try:
        with torch.no_grad():
            out = module(torch.zeros([d if isinstance(d, int) else 1 for d in spec.shape]))
    except Exception as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if "dtype" in msg.lower() and "float" in msg.lower():  # (a .pt2 whose input is uint8: "dtype mismatch")
            raise BadInput(f"the model does not take float32 input ({msg}): a PyTorch model is fed float32 here; "
                           "for one that takes integers (raw 0..255 pixels), export it to ONNX with its own input "
                           "type (torch.onnx.export) and export that file, whose uint8 input is fed as it is") from None
        raise BadInput(f"the model does not accept input of shape {spec.shape}{hint}: {msg}") from None
    if not isinstance(out, torch.Tensor):
        if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
            return fixed
        raise BadInput(f"the model returns {type(out).__name__}; export needs tensor outputs")
    return fixed
