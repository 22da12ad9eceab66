"""`lepton-edge inspect`: what is inside a bundle or any ONNX file someone else made.

Why for foreign files too: the first question about a third-party model is its inputs (dynamic
dimensions, layout), opset and ops, before anyone tries to export or run it.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from lepton_edge.bundle import guess_layout
from lepton_edge.errors import BadInput, first_line
from lepton_edge.paths import check_onnx_file

# onnx's TensorProto.DataType numbers (a number not here is shown as it is)
_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
           9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64", 15: "complex128",
           16: "bfloat16", 17: "float8e4m3fn", 18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz",
           21: "uint4", 22: "int4", 23: "float4e2m1"}
MAX_SHOWN_VALUES = 4096  # a constant input's value is listed up to this many elements (datasets.MAX_CONSTANT_VALUES)


def _constant_names(inputs: list[str], inits: list[str], ir_version: int, baked: list[str] | None) -> list[str]:
    """The graph inputs that carry a default value (an initializer of the same name): the inputs a
    runtime may leave unfed. Our exporter names them in metadata; in a foreign file they are the
    inputs with an initializer, unless the file lists every weight as an input (IR version < 4, or
    an exporter's keep-initializers-as-inputs), where a default says nothing."""
    if baked is not None:
        return [n for n in inputs if n in baked]
    with_default = [n for n in inputs if n in set(inits)]
    if ir_version < 4 or len(with_default) == len(inits):
        return []
    return with_default


def _constant_input(v: dict, array) -> dict:
    """An input with its default: name, dtype, shape and, when small, the value flat in row-major order."""
    small = array is not None and array.size <= MAX_SHOWN_VALUES
    flat = (array.ravel().astype("int64" if array.dtype.kind in "iub" else "float64").tolist() if small else None)
    return {"name": v["name"], "dtype": v["dtype"], "shape": v["shape"], "value": flat}


def _precision(ops: Counter, weight_types: Counter) -> str:
    """int8 when the graph quantizes (QDQ, QLinear or dynamic-quantization ops: ConvInteger, MatMulInteger),
    fp16 when most weights are half, else fp32."""
    from lepton_edge.model_source import QUANTIZED_OPS

    if any(ops.get(op) for op in QUANTIZED_OPS):
        return "int8"
    if weight_types and weight_types.most_common(1)[0][0] == "float16":
        return "fp16"
    return "fp32"


def inspect_onnx(path: Path) -> dict:
    check_onnx_file(path)
    try:
        import onnx
    except ImportError:  # a device: only the [device] extra (onnxruntime), no onnx package
        return inspect_onnx_wire(path)
    try:
        m = onnx.load(str(path), load_external_data=False)  # (weights beside it are not read: sizes suffice)
    except Exception as e:
        raise BadInput(f"{path}: not a readable ONNX model ({first_line(e, 160)})") from None
    if not m.ir_version or not m.HasField("graph"):  # protobuf parses many byte strings as an empty model
        raise BadInput(f"{path}: not a readable ONNX model (no IR version or graph)")
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    from lepton_edge.compress.quantize import DEFAULTS_KEY

    baked = next((p.value.split(",") for p in m.metadata_props if p.key == DEFAULTS_KEY), None)
    constants = _constant_names([v.name for v in g.input], list(inits), m.ir_version, baked)

    def value(v):
        t = v.type.tensor_type
        dims = ([d.dim_value if d.dim_value > 0 else (d.dim_param or "?") for d in t.shape.dim]
                if t.HasField("shape") else None)
        return _value_info(v.name, _DTYPES.get(t.elem_type, str(t.elem_type)), dims)

    nodes = list(_all_nodes(g))
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in nodes)
    params, weight_types = _weights((i.dims, i.data_type) for i in g.initializer)
    precision = _precision(ops, weight_types)
    std = {"", "ai.onnx"}
    used_domains = {n.domain for n in nodes if n.domain not in std}
    return {
        "file": str(path), "format": "onnx", "bytes": path.stat().st_size,
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "opset": next((o.version for o in m.opset_import if o.domain in std), None),
        "domains": {o.domain: o.version for o in m.opset_import if o.domain in used_domains},
        "inputs": [value(v) for v in g.input if v.name not in inits],
        "constant_inputs": [_constant_input(value(v), _onnx_array(inits[v.name])) for v in g.input
                            if v.name in constants],
        "outputs": [value(v) for v in g.output],
        "nodes": len(nodes), "ops": dict(ops.most_common()),
        "custom_ops": sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in std}),
        "parameters": params, "precision": precision,
    }


def _onnx_array(t):
    """An initializer's value when small enough to list (else None, unread)."""
    from onnx import numpy_helper

    n = 1
    for d in t.dims:
        n *= d
    if t.data_location == t.EXTERNAL:  # in a file beside the model, not read (a sparse 4 GB one was, whole)
        return None
    return numpy_helper.to_array(t) if n <= MAX_SHOWN_VALUES else None


# ---- ONNX without the onnx package --------------------------------------------------------------
# Why a protobuf reader of our own: a device has onnxruntime but not `onnx` (nor, reliably, a
# `protobuf` of a compatible version), and onnxruntime's session exposes neither the opset nor the
# ops, and refuses models with custom ops, the very ones people inspect first. The ONNX schema is
# stable wire format; the few fields `inspect` reports are read here, every length checked against
# the buffer, so a hostile file is one BadInput line. Field numbers: onnx/onnx.proto.
_MODEL_IR, _MODEL_PRODUCER, _MODEL_PRODUCER_VERSION, _MODEL_GRAPH, _MODEL_OPSET, _MODEL_METADATA = 1, 2, 3, 7, 8, 14
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_INPUT, _GRAPH_OUTPUT = 1, 5, 11, 12


class _Corrupt(ValueError):
    pass


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise _Corrupt("truncated varint")
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, i
        shift += 7


def _fields(buf: memoryview):
    """(field number, value) for each field of one message: an int (varint, fixed) or a memoryview
    (length-delimited: bytes, strings, sub-messages, packed arrays)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        v: int | memoryview
        if wire == 0:
            v, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            if n > len(buf) - i:
                raise _Corrupt("length past the end")
            v, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if i + size > len(buf):
                raise _Corrupt("truncated fixed field")
            v, i = int.from_bytes(buf[i:i + size], "little"), i + size
        else:
            raise _Corrupt(f"wire type {wire}")
        if num == 0:
            raise _Corrupt("field 0")
        yield num, v


def _str(v) -> str:
    return bytes(v).decode("utf-8", "replace") if isinstance(v, memoryview) else ""


def _ints(v) -> list[int]:
    """A repeated int64 field's one occurrence: a varint, or a packed run of them."""
    if isinstance(v, int):
        return [v]
    out, i = [], 0
    while i < len(v):
        x, i = _varint(v, i)
        out.append(x)
    return out


def _sub(buf: memoryview, num: int) -> Iterator[memoryview]:
    """Each occurrence of the sub-message field `num` in one message."""
    for n, v in _fields(buf):
        if n == num and isinstance(v, memoryview):
            yield v


def _wire_dim(buf: memoryview) -> int | str:
    """TensorShapeProto.Dimension: its size, or its symbolic name ('?' when it has neither)."""
    value, param = 0, ""
    for xn, xv in _fields(buf):  # Dimension: 1 = dim_value, 2 = dim_param
        if xn == 1 and isinstance(xv, int):
            value = xv
        elif xn == 2:
            param = _str(xv)
    # a negative dim_value (Paddle writes -1 for dynamic) is a huge unsigned varint
    return value if 0 < value < (1 << 62) else (param or "?")


def _wire_tensor_type(buf: memoryview) -> tuple[int | None, list[int | str] | None]:
    """TypeProto.Tensor: (elem_type if given, dims; None when it has no shape: rank unknown)."""
    elem, dims = None, None
    for en, ev in _fields(buf):  # Tensor: 1 = elem_type, 2 = shape
        if en == 1 and isinstance(ev, int):
            elem = ev
        elif en == 2 and isinstance(ev, memoryview):
            dims = (dims or []) + [_wire_dim(d) for d in _sub(ev, 1)]  # TensorShapeProto: 1 = dim
    return elem, dims


def _wire_value(buf: memoryview) -> dict:
    """ValueInfoProto -> the same dict inspect_onnx makes."""
    name, elem, dims = "", 0, None
    for num, v in _fields(buf):
        if num == 1:
            name = _str(v)
        elif num == 2 and isinstance(v, memoryview):
            for tensor_type in _sub(v, 1):  # TypeProto: 1 = tensor_type
                e, d = _wire_tensor_type(tensor_type)
                elem = elem if e is None else e
                dims = dims if d is None else (dims or []) + d
    return _value_info(name, _DTYPES.get(elem, str(elem)), dims)


def _value_info(name: str, dtype: str, dims: list[int | str] | None) -> dict:
    """An input or output as inspect reports it. `dims` None is a tensor of unknown rank (no shape in the
    file, which onnxruntime runs): its shape is reported as None, not [], which is a scalar's."""
    return {"name": name, "dtype": dtype, "shape": dims,
            "dynamic": [i for i, d in enumerate(dims or []) if not isinstance(d, int)],
            "layout": guess_layout(dims) if dims is not None else None}


def _wire_model(data: memoryview) -> dict:
    """ModelProto's top-level fields that inspect reports, and the graph still as bytes."""
    m: dict = {"ir": 0, "producer": "", "producer_version": "", "graph": None, "opsets": [], "metadata": {}}
    for num, v in _fields(data):
        if num == _MODEL_IR and isinstance(v, int):
            m["ir"] = v
        elif num == _MODEL_PRODUCER:
            m["producer"] = _str(v)
        elif num == _MODEL_PRODUCER_VERSION:
            m["producer_version"] = _str(v)
        elif num == _MODEL_GRAPH and isinstance(v, memoryview):
            m["graph"] = v
        elif num == _MODEL_OPSET and isinstance(v, memoryview):
            o = dict(_fields(v))  # OperatorSetIdProto: 1 = domain, 2 = version
            m["opsets"].append((_str(o.get(1)), o.get(2) if isinstance(o.get(2), int) else 0))
        elif num == _MODEL_METADATA and isinstance(v, memoryview):
            e = dict(_fields(v))  # StringStringEntryProto: 1 = key, 2 = value
            m["metadata"][_str(e.get(1))] = _str(e.get(2))
    return m


def _wire_initializer(buf: memoryview) -> tuple[str, list[int], int]:
    """TensorProto: (name, dims, data_type); the data itself is not read."""
    dims, dtype, name = [], 0, ""
    for n, x in _fields(buf):  # TensorProto: 1 = dims, 2 = data_type, 8 = name
        if n == 1:
            dims += _ints(x)
        elif n == 2 and isinstance(x, int):
            dtype = x
        elif n == 8:
            name = _str(x)
    return name, dims, dtype


# TensorProto's typed data fields: 4 float_data (packed fixed32), 5 int32_data (varints, also the
# 8/16-bit and float16 types), 7 int64_data (varints), 10 double_data (packed fixed64); 9 raw_data.
_NP = {1: "<f4", 2: "u1", 3: "i1", 5: "<i2", 6: "<i4", 7: "<i8", 9: "?", 10: "<f2", 11: "<f8"}


def _wire_array(buf: memoryview, dims: list[int], dtype: int):
    """A small initializer's value as numpy (onnx's numpy_helper.to_array, for the types a
    constant input has), or None when it is large, external or of another type."""
    import numpy as np

    n = 1
    for d in dims:
        n *= d
    if n > MAX_SHOWN_VALUES or dtype not in _NP:
        return None
    raw, ints, floats, doubles = None, [], [], []
    for num, x in _fields(buf):
        if num == 9 and isinstance(x, memoryview):
            raw = bytes(x)
        elif num == 4:
            floats += [x] if isinstance(x, int) else list(np.frombuffer(bytes(x), "<u4"))
        elif num in (5, 7):
            ints += _ints(x)
        elif num == 10:
            doubles += [x] if isinstance(x, int) else list(np.frombuffer(bytes(x), "<u8"))
        elif num == 13:  # data_location EXTERNAL
            return None
    if raw is not None:
        a = np.frombuffer(raw, _NP[dtype])
    elif dtype == 1:
        a = np.asarray(floats, dtype="<u4").view("<f4")
    elif dtype == 11:
        a = np.asarray(doubles, dtype="<u8").view("<f8")
    elif dtype == 10:
        a = np.asarray(ints, dtype="<u2").view("<f2")
    elif dtype == 7:
        a = np.asarray(ints, dtype=np.uint64).view(np.int64)
    else:
        a = np.asarray(ints, dtype=np.uint64).view(np.int64).astype(_NP[dtype])
    return a.reshape(dims) if a.size == n else None


MAX_SUBGRAPH_DEPTH = 64  # If/Loop/Scan bodies within bodies; the onnx package's parser stops at 100 messages deep


def _all_nodes(g, depth: int = 0):
    """Every node of the graph and of the subgraphs its nodes carry (If branches, Loop and Scan bodies):
    a model whose work sits in an If's branches listed 'Equal 1, If 1', and a custom op inside one was missed."""
    for n in g.node:
        yield n
        if depth < MAX_SUBGRAPH_DEPTH:
            for a in n.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from _all_nodes(sub, depth + 1)


def _wire_nodes(v: memoryview, depth: int, out: list) -> None:
    """NodeProto -> (op_type, domain) appended to `out`, then those of its subgraphs (as _all_nodes)."""
    f = {n: x for n, x in _fields(v) if n in (4, 7)}  # NodeProto: 4 = op_type, 7 = domain
    out.append((_str(f.get(4)), _str(f.get(7))))
    if depth >= MAX_SUBGRAPH_DEPTH:
        return
    for attr in _sub(v, 5):  # NodeProto: 5 = attribute
        for an, av in _fields(attr):
            if an in (6, 11) and isinstance(av, memoryview):  # AttributeProto: 6 = g, 11 = graphs
                for node in _sub(av, _GRAPH_NODE):
                    _wire_nodes(node, depth + 1, out)


def _wire_graph(graph: memoryview) -> dict:
    """GraphProto: nodes as (op_type, domain) (its subgraphs' too), initializers, inputs and outputs."""
    g: dict = {"nodes": [], "inits": [], "inputs": [], "outputs": [], "init_bufs": {}}
    for num, v in _fields(graph):
        if not isinstance(v, memoryview):
            continue
        if num == _GRAPH_NODE:
            _wire_nodes(v, 0, g["nodes"])
        elif num == _GRAPH_INIT:
            name, dims, dtype = _wire_initializer(v)
            g["inits"].append((name, dims, dtype))
            g["init_bufs"][name] = v
        elif num == _GRAPH_INPUT:
            g["inputs"].append(_wire_value(v))
        elif num == _GRAPH_OUTPUT:
            g["outputs"].append(_wire_value(v))
    return g


def _weights(tensors) -> tuple[int, Counter[str]]:
    """(parameter count, elements per dtype name) over (dims, ONNX data type) pairs."""
    params, weight_types = 0, Counter[str]()
    for dims, dtype in tensors:
        n = 1
        for d in dims:
            n *= d
        params += n
        weight_types[_DTYPES.get(dtype, str(dtype))] += n
    return params, weight_types


def inspect_onnx_wire(path: Path) -> dict:
    """inspect_onnx's answer (same keys, same values) read from the protobuf wire format."""
    try:
        m = _wire_model(memoryview(path.read_bytes()))
        if not m["ir"] or m["graph"] is None:
            raise BadInput(f"{path}: not a readable ONNX model (no IR version or graph)")
        g = _wire_graph(m["graph"])
    except _Corrupt as e:
        raise BadInput(f"{path}: not a readable ONNX model ({e})") from None
    std = {"", "ai.onnx"}
    nodes, opsets = g["nodes"], m["opsets"]
    ops = Counter(op if dom in std else f"{dom}::{op}" for op, dom in nodes)
    params, weight_types = _weights((dims, dtype) for _, dims, dtype in g["inits"])
    used_domains = {dom for _, dom in nodes if dom not in std}
    init_names = {name for name, _, _ in g["inits"]}
    from lepton_edge.compress.quantize import DEFAULTS_KEY

    baked = m["metadata"][DEFAULTS_KEY].split(",") if DEFAULTS_KEY in m["metadata"] else None
    constants = _constant_names([i["name"] for i in g["inputs"]], [n for n, _, _ in g["inits"]], m["ir"], baked)
    init_of = {name: (dims, dtype) for name, dims, dtype in g["inits"]}
    return {
        "file": str(path), "format": "onnx", "bytes": path.stat().st_size,
        "producer": f"{m['producer']} {m['producer_version']}".strip(),
        "opset": next((ver for dom, ver in opsets if dom in std), None),
        "domains": {dom: ver for dom, ver in opsets if dom in used_domains},
        "inputs": [i for i in g["inputs"] if i["name"] not in init_names],
        "constant_inputs": [_constant_input(i, _wire_array(g["init_bufs"][i["name"]], *init_of[i["name"]]))
                            for i in g["inputs"] if i["name"] in constants],
        "outputs": g["outputs"],
        "nodes": len(nodes), "ops": dict(ops.most_common()),
        "custom_ops": sorted({f"{dom}::{op}" for op, dom in nodes if dom not in std}),
        "parameters": params, "precision": _precision(ops, weight_types),
    }


def inspect(path: str | Path) -> dict:
    """A dict describing a bundle directory or a model file."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"not found: {p}")
    if p.is_dir():
        from lepton_edge.bundle import Bundle

        b = Bundle.load(p)
        info = inspect_file(b.model_path)
        m = b.manifest
        info["bundle"] = {
            "path": str(p), "name": m.name, "target": m.target.get("id"), "format": m.format,
            "precision": m.precision, "task": m.task, "input_spec": m.inputs[0].model_dump(),
            "validation": m.validation, "compression": {k: v for k, v in m.compression.items() if k != "quantization"},
            "quantization": {k: v for k, v in m.compression.get("quantization", {}).items() if k != "attempts"},
            "latency": m.latency, "checksums": "ok",
            "constant_inputs": _bundle_constants(m),
        }
        return info
    if not p.is_file():  # a FIFO or a device: reading it could wait forever, or never end
        raise BadInput(f"{p}: not a regular file")
    return inspect_file(p)


def _bundle_constants(m) -> list[dict]:
    """The constants the bundle's model is fed beside the frame (manifest inputs[1:]), with how each
    was chosen (compression.constant_inputs: --input-value or a rule by name)."""
    rules = {c.get("name"): c.get("rule") for c in m.compression.get("constant_inputs") or []}
    return [{"name": i.name, "dtype": i.dtype, "shape": i.shape, "value": i.value, "rule": rules.get(i.name)}
            for i in m.inputs[1:]]


def inspect_file(p: Path) -> dict:
    """By suffix, or for a file named otherwise (a cache entry, `model.bin`) by the TFLite FlatBuffer
    identifier, as `run` finds it (runtime.backend.format_of)."""
    if p.suffix.lower() == ".onnx":
        return inspect_onnx(p)
    if p.suffix.lower() == ".tflite":
        return inspect_tflite(p)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise BadInput(f"{p}: cannot read it ({e.strerror or e})") from None
    if head[4:8] == b"TFL3":
        return inspect_tflite(p)
    kind = f"'{p.suffix}' files" if p.suffix else "a file without a suffix"
    raise BadInput(f"{p}: cannot inspect {kind} (want a bundle directory, .onnx or .tflite)")


def inspect_tflite(path: Path) -> dict:
    """Read the flatbuffer itself (works for custom ops the interpreter lacks), then ask LiteRT
    which nodes XNNPACK takes."""
    data, model, schema = _read_tflite(path)
    try:  # the flatbuffer parsed, but nothing says its indices point anywhere: a bad one is one line
        names = _TfliteNames(model, schema)
        sg = model.subgraphs[0]
        if any(not 0 <= i < len(sg.tensors) for i in [*sg.inputs, *sg.outputs]):
            raise IndexError("an input or output names no tensor")
        ops = Counter(names.op(o) for o in sg.operators or [])
        params, weight_types = _tflite_weights(model, sg, names)
        inputs = [_tflite_tensor(sg.tensors[i], names) for i in sg.inputs]
        outputs = [_tflite_tensor(sg.tensors[i], names) for i in sg.outputs]
    except (IndexError, TypeError, AttributeError, ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: not a usable TFLite model ({type(e).__name__}: {str(e)[:120]})") from None
    return {"file": str(path), "format": "tflite", "bytes": len(data), "producer": "", "opset": None,
            "inputs": inputs, "constant_inputs": [], "outputs": outputs,
            "nodes": len(sg.operators or []), "ops": dict(ops.most_common()),
            "custom_ops": sorted(k[8:] for k in ops if k.startswith("custom::")),
            "parameters": params, "precision": _tflite_precision(inputs, weight_types, params),
            "subgraphs": len(model.subgraphs), "xnnpack": _xnnpack(path)}


def _read_tflite(path: Path):
    """(bytes, the flatbuffer as objects, the schema module); one BadInput line for anything else."""
    from lepton_edge.runtime.litert_loader import read_model_bytes

    data = read_model_bytes(path)  # (the TFL3 identifier checked there)
    try:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils

        model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    except BadInput:
        raise
    except ImportError:
        raise BadInput("inspecting .tflite needs ai-edge-litert (pip install ai-edge-litert)") from None
    except Exception as e:
        raise BadInput(f"{path}: not a readable TFLite model ({str(e).splitlines()[0][:120] if str(e) else 'corrupt'})"
                       ) from None
    return data, model, schema


class _TfliteNames:
    """Names for the schema's numbers: operators (builtin or custom::NAME) and tensor types."""

    def __init__(self, model, schema):
        self.model, self.schema = model, schema
        self.ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        self.types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}

    def op(self, op) -> str:
        code = self.model.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        if builtin == self.schema.BuiltinOperator.CUSTOM:
            return f"custom::{code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode}"
        return self.ops.get(builtin, str(builtin))

    def dtype(self, t) -> str:
        return self.types.get(t.type, str(t.type))


def _tflite_tensor(t, names: _TfliteNames) -> dict:
    """An input or output as inspect reports it: name, dtype, shape ('?' where dynamic), layout,
    and the quantization an integer tensor is read with."""
    shape = [int(d) for d in (t.shapeSignature if t.shapeSignature is not None else t.shape)]
    out = {"name": t.name.decode() if isinstance(t.name, bytes) else t.name, "dtype": names.dtype(t),
           "shape": [d if d >= 0 else "?" for d in shape], "dynamic": [k for k, d in enumerate(shape) if d < 0],
           "layout": guess_layout(shape)}
    q = t.quantization
    if q is not None and q.scale is not None and len(q.scale):
        zp = q.zeroPoint if q.zeroPoint is not None and len(q.zeroPoint) else [0]  # (optional in the schema)
        out["quantization"] = {"scale": float(q.scale[0]), "zero_point": int(zp[0])}
        if len(q.scale) > 1:  # per channel: the first scale alone read as the tensor's (one of 3 scales, 1/64 of 1/16)
            out["quantization"]["per_channel"] = {"axis": int(q.quantizedDimension or 0), "channels": len(q.scale),
                                                  "min_scale": float(min(q.scale)), "max_scale": float(max(q.scale))}
    return out


def _tflite_weights(model, sg, names: _TfliteNames) -> tuple[int, Counter[str]]:
    """(parameter count, elements per dtype) over the tensors that carry data: the weights."""
    params, weight_types = 0, Counter[str]()
    for t in sg.tensors:
        buf = model.buffers[t.buffer].data if t.buffer < len(model.buffers) else None
        if buf is not None and len(buf):
            n = 1
            for d in t.shape:
                n *= int(d)
            params += n
            weight_types[names.types.get(t.type, "?")] += n
    return params, weight_types


def _tflite_precision(inputs: list[dict], weight_types: Counter[str], params: int) -> str:
    """int8 for an integer input or mostly int8 weights, fp16 for mostly half weights, else fp32."""
    if any(i["dtype"] in ("int8", "uint8") for i in inputs) or weight_types.get("int8", 0) > params / 2:
        return "int8"
    if weight_types.get("float16", 0) > params / 2:
        return "fp16"
    return "fp32"


def _xnnpack(path: Path) -> dict:
    """Which part XNNPACK (LiteRT's default CPU delegate) takes over, or why the file cannot load."""
    from lepton_edge.runtime.litert_loader import load_interpreter

    try:
        it = load_interpreter(path, 1)
    except BadInput as e:
        try:  # loads unallocated: only the stored default shape of an input with open dimensions failed
            load_interpreter(path, 1, defer_dynamic=True)
        except BadInput:
            return {"error": str(e)}
        return {"note": "decided at the size the model is run at (its input's dimensions are open, and the "
                        "default shape stored in the file cannot be allocated)"}
    try:  # (LiteRT decodes the file's op names as UTF-8: a mutated one was a UnicodeDecodeError traceback)
        partitions = sum(1 for o in it._get_ops_details() if o["op_name"] == "DELEGATE")
    except Exception as e:
        return {"error": f"{path}: LiteRT cannot list its operators ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else 'no message'})"}
    return {"partitions": partitions, "applied": partitions > 0}
