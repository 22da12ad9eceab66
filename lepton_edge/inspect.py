"""`lepton-edge inspect`: what is inside a bundle or any ONNX file someone else made.

Why for foreign files too: the first question about a third-party model is its inputs (dynamic
dimensions, layout), opset and ops, before anyone tries to export or run it.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from lepton_edge.errors import BadInput

_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
           11: "float64", 16: "bfloat16"}


def _layout(dims: list) -> str | None:
    if len(dims) != 4:
        return None
    c1, c3 = dims[1], dims[3]
    if c3 in (1, 3, 4) and c1 not in (1, 3, 4):
        return "NHWC"
    if c1 in (1, 3, 4):
        return "NCHW"
    return None


def inspect_onnx(path: Path) -> dict:
    import onnx

    try:
        m = onnx.load(str(path))
    except Exception as e:
        raise BadInput(f"{path}: not a readable ONNX model ({str(e).splitlines()[0][:160]})") from None
    g = m.graph
    inits = {i.name: i for i in g.initializer}

    def value(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.dim_value else (d.dim_param or "?") for d in t.shape.dim]
        return {"name": v.name, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type)), "shape": dims,
                "dynamic": [i for i, d in enumerate(dims) if not isinstance(d, int)], "layout": _layout(dims)}

    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in g.node)
    params = 0
    weight_types = Counter()
    for i in g.initializer:
        n = 1
        for d in i.dims:
            n *= d
        params += n
        weight_types[_DTYPES.get(i.data_type, str(i.data_type))] += n
    if ops.get("QuantizeLinear") or ops.get("DequantizeLinear") or ops.get("QLinearConv"):
        precision = "int8"
    elif weight_types and weight_types.most_common(1)[0][0] == "float16":
        precision = "fp16"
    else:
        precision = "fp32"
    std = {"", "ai.onnx"}
    used_domains = {n.domain for n in g.node if n.domain not in std}
    return {
        "file": str(path), "format": "onnx", "bytes": path.stat().st_size,
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "opset": next((o.version for o in m.opset_import if o.domain in std), None),
        "domains": {o.domain: o.version for o in m.opset_import if o.domain in used_domains},
        "inputs": [value(v) for v in g.input if v.name not in inits],
        "outputs": [value(v) for v in g.output],
        "nodes": len(g.node), "ops": dict(ops.most_common()),
        "custom_ops": sorted({f"{n.domain}::{n.op_type}" for n in g.node if n.domain not in std}),
        "parameters": params, "precision": precision,
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
        }
        return info
    return inspect_file(p)


def inspect_file(p: Path) -> dict:
    if p.suffix.lower() == ".onnx":
        return inspect_onnx(p)
    if p.suffix.lower() == ".tflite":
        raise BadInput(f"{p}: .tflite inspection comes with the TFLite exporter (not installed in this version)")
    raise BadInput(f"{p}: cannot inspect '{p.suffix}' files (want a bundle directory or .onnx)")
