"""Load a .tflite file in LiteRT (`ai-edge-litert`), falling back to `tflite_runtime` on old devices.

Why a loader of its own: a .tflite someone else made may be truncated, or use a custom op the
interpreter lacks; both must end as one clear line naming the problem (and the op), not a
traceback from the interpreter's C++ core.
"""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

from lepton_edge.errors import BadInput


def _module():
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        try:
            from tflite_runtime import interpreter  # old devices: tflite-runtime 2.14
        except ImportError:
            raise BadInput("running .tflite needs ai-edge-litert (pip install ai-edge-litert)") from None
    return interpreter


def interpreter_class():
    return _module().Interpreter


MAX_TFLITE_OBJECTS = 200_000  # tensors and operators over all subgraphs, counted as the flatbuffer links them


def read_model_bytes(p: Path) -> bytes:
    """A .tflite file's bytes, after what can be checked without reading them: at most MAX_BUNDLE_BYTES
    (the limit of a bundle, and of any file the device reads whole), the TFL3 identifier, at least one
    subgraph, not more linked objects or bytes than a model could hold, and quantization scales LiteRT
    can take (_check_links). Why on a map of the file: a 1 GB sparse file named .tflite cost 1.1 GB of
    memory before LiteRT refused it (2.2 GB under `inspect`)."""
    import mmap

    from lepton_edge.bundle import MAX_BUNDLE_BYTES

    size = p.stat().st_size
    if size > MAX_BUNDLE_BYTES:
        raise BadInput(f"{p}: {size:,} bytes, over the {MAX_BUNDLE_BYTES:,} this runtime reads")
    if size < 8:
        raise BadInput(f"{p}: not a TFLite model (no TFL3 identifier; truncated or another format)")
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[4:8] != b"TFL3":
            raise BadInput(f"{p}: not a TFLite model (no TFL3 identifier; truncated or another format)")
        _check_links(mm, p)
        return mm[:]


def _check_links(buf, p: Path) -> None:
    """Walk the FlatBuffer's tensors on the lazy reader (it copies nothing but what it is asked for).

    Why: offsets can be shared, so a few KB can describe much more than they hold. An 8 KB file listing
    one subgraph 1,000 times, each listing one tensor 1,000 times, unpacked into a million objects
    under `inspect` (24 s, 860 MB); 1,000 tensors sharing one 100 KB name cost 100 MB when LiteRT
    listed them. So: at most MAX_TFLITE_OBJECTS tensors and operators, and the bytes their names,
    shapes and quantization would take at most a few times the file's. And a quantized tensor's scales
    must be finite and not negative, above 0 for one computed at run time: a zero scale on an input
    segfaulted LiteRT's allocate_tensors, on an inner activation its first invoke (a pruned, all-zero
    weight channel may have scale 0: that is how TFLite's per-channel quantizer writes it)."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # tflite_runtime has no schema module: LiteRT's own verifier is what is left
        return
    import numpy as np

    cap = (16 << 20) + 4 * len(buf)
    try:
        m = schema.Model.GetRootAs(buf, 0)
        n, nbuf = m.SubgraphsLength(), m.BuffersLength()
        if n < 1:
            raise BadInput(f"{p}: not a usable TFLite model (no subgraph)")
        objects = held = 0
        for i in range(n):
            g = m.Subgraphs(i)
            objects += g.TensorsLength() + g.OperatorsLength()
            if objects > MAX_TFLITE_OBJECTS:
                raise BadInput(f"{p}: links over {MAX_TFLITE_OBJECTS:,} tensors and operators; not a model this "
                               "tool reads")
            for j in range(g.TensorsLength()):
                t = g.Tensors(j)
                name_at = t._tab.Offset(10)  # (Tensor.name: its length, without copying the string)
                held += (t._tab.VectorLen(name_at) if name_at else 0) + 4 * (t.ShapeLength() + t.ShapeSignatureLength())
                q = t.Quantization()
                ns = q.ScaleLength() if q is not None else 0
                if q is not None:
                    held += 12 * ns + 8 * q.ZeroPointLength() + 4 * (q.MinLength() + q.MaxLength())
                if held > cap:
                    raise BadInput(f"{p}: its tensors' names, shapes and quantization would take over {cap:,} bytes, "
                                   "more than the file holds; not a model this tool reads")
                if ns:
                    scales = np.array(q.ScaleAsNumpy(), np.float64)  # (a copy: a view would pin the map open)
                    constant = _constant(m, t.Buffer(), nbuf)
                    if (bad := _bad_scale(scales, constant)) is not None:
                        _refuse_scale(p, (t.Name() or b"?")[:64].decode("utf-8", "replace"), bad, constant)
    except BadInput:
        raise
    except Exception as e:  # offsets past the end (struct.error), and the like
        raise BadInput(f"{p}: not a readable TFLite model ({str(e).splitlines()[0][:120] if str(e) else 'corrupt'})"
                       ) from None


def _constant(m, index: int, nbuf: int) -> bool:
    if not 0 < index < nbuf:
        return False
    b = m.Buffers(index)
    return b.DataLength() > 0 or (hasattr(b, "Size") and b.Size() > 0)


def _bad_scale(scales, constant: bool) -> float | None:
    """The first scale LiteRT cannot take, or None: every one finite, and above 0 (0 allowed for a
    constant: a pruned all-zero channel)."""
    import numpy as np

    scales = np.asarray(scales, np.float64)
    ok = np.isfinite(scales) & ((scales >= 0) if constant else (scales > 0))
    return None if ok.all() else float(scales[~ok][0])


def _refuse_scale(p: Path, name: str, bad: float, constant: bool) -> None:
    raise BadInput(f"{p}: tensor '{name[:64]}' has quantization scale {bad!r}; a scale must be a finite number "
                   f"{'of 0 or more' if constant else 'above 0'}")


def check_io(it, p: Path) -> None:
    """At least one input and one output, and their scales finite and above 0. Where _check_links could
    not look (tflite_runtime has no schema module), every tensor's scales too, told apart as _check_links
    does: a tensor no operator writes and that is no input is a constant (it may have scale 0)."""

    ins, outs = it.get_input_details(), it.get_output_details()
    if not ins or not outs:
        raise BadInput(f"{p}: the model has no {'inputs' if not ins else 'outputs'}; this runtime feeds camera "
                       "frames to a model and reads its results")
    details, written = [*ins, *outs], set()
    if not _has_schema():
        details = [*details, *it.get_tensor_details()]
        written = {int(i) for op in it._get_ops_details() for i in op.get("outputs", [])}
        written |= {int(d["index"]) for d in ins}
    for d in details:
        constant = bool(written) and int(d["index"]) not in written and d not in ins and d not in outs
        bad = _bad_scale(d.get("quantization_parameters", {}).get("scales", []), constant)
        if bad is not None:
            _refuse_scale(p, str(d.get("name")), bad, constant)


def _has_schema() -> bool:
    try:
        from ai_edge_litert import schema_py_generated  # noqa: F401
    except ImportError:
        return False
    return True


def load_interpreter(path: str | Path, threads: int = 1, allocate: bool = True, delegates: list[str] | None = None):
    """An interpreter for the file; `delegates` are external delegate libraries (.so) to load."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"not found: {p}")
    data = read_model_bytes(p)  # (the TFL3 identifier checked there)
    Interpreter = interpreter_class()
    from lepton_edge.ui import native_stderr_silenced

    try:
        with native_stderr_silenced():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on every load
            extra = []
            for lib in delegates or []:
                try:
                    # a library without the plugin entry points makes LiteRT's Delegate.__del__ raise
                    # after the fact; ask first (the path came from local configuration)
                    ctypes.CDLL(lib).tflite_plugin_create_delegate  # noqa: B018
                    extra.append(_module().load_delegate(lib))
                except (OSError, AttributeError, ValueError) as e:  # missing file, not a delegate library
                    raise BadInput(f"delegate library {lib}: cannot be loaded ({str(e).splitlines()[0][:160]})") \
                        from None
            it = Interpreter(model_content=data, num_threads=threads, experimental_delegates=extra or None)
            check_io(it, p)  # before allocate_tensors: a zero scale on an input crashed it (SIGSEGV)
            if allocate:
                it.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        msg = str(e)
        custom = re.search(r"Encountered unresolved custom op: ([\w/-]+(?:\.[\w/-]+)*)", msg)
        if custom:
            raise BadInput(f"{p}: uses custom op '{custom.group(1)}', which this LiteRT interpreter lacks") from None
        first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), type(e).__name__)
        raise BadInput(f"{p}: LiteRT cannot load it ({first[:200]})") from None
    return it
