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
    (a FlatBuffer cannot be larger), the TFL3 identifier, at least one subgraph, and not more linked
    objects than a model could hold. Why on a map of the file: a 1 GB sparse file named .tflite cost
    1.1 GB of memory before LiteRT refused it (2.2 GB under `inspect`). Why the count: offsets can be
    shared, so an 8 KB file listing one subgraph 1,000 times, each listing one tensor 1,000 times,
    unpacked into a million objects under `inspect` (24 s, 860 MB; 8 GB for 24 KB)."""
    import mmap

    from lepton_edge.bundle import MAX_BUNDLE_BYTES

    size = p.stat().st_size
    if size > MAX_BUNDLE_BYTES:
        raise BadInput(f"{p}: {size:,} bytes, over the {MAX_BUNDLE_BYTES:,} a TFLite model can be")
    if size < 8:
        raise BadInput(f"{p}: not a TFLite model (no TFL3 identifier; truncated or another format)")
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[4:8] != b"TFL3":
            raise BadInput(f"{p}: not a TFLite model (no TFL3 identifier; truncated or another format)")
        _check_links(mm, p)
        return mm[:]


def _check_links(buf, p: Path) -> None:
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # tflite_runtime has no schema module: LiteRT's own verifier is what is left
        return
    try:
        m = schema.Model.GetRootAs(buf, 0)
        total, n = 0, m.SubgraphsLength()
        if n < 1:
            raise BadInput(f"{p}: not a usable TFLite model (no subgraph)")
        for i in range(n):
            g = m.Subgraphs(i)
            total += g.TensorsLength() + g.OperatorsLength()
            if total > MAX_TFLITE_OBJECTS:
                raise BadInput(f"{p}: links over {MAX_TFLITE_OBJECTS:,} tensors and operators; not a model this "
                               "tool reads")
    except BadInput:
        raise
    except Exception as e:  # offsets past the end (struct.error), and the like
        raise BadInput(f"{p}: not a readable TFLite model ({str(e).splitlines()[0][:120] if str(e) else 'corrupt'})"
                       ) from None


def check_io(it, p: Path) -> None:
    """What LiteRT itself does not check before it allocates: at least one input and one output, and every
    quantized tensor's scales finite and positive (a uint8 input of scale 0, NaN, Inf or below 0 crashed
    the interpreter's allocate_tensors with SIGSEGV, an inner tensor's zero scale its first invoke: either
    took the process along, an agent included)."""
    import numpy as np

    ins, outs = it.get_input_details(), it.get_output_details()
    if not ins or not outs:
        raise BadInput(f"{p}: the model has no {'inputs' if not ins else 'outputs'}; this runtime feeds camera "
                       "frames to a model and reads its results")
    for d in [*ins, *outs, *it.get_tensor_details()]:  # (an inner tensor's zero scale crashed it as well)
        scales = np.asarray(d.get("quantization_parameters", {}).get("scales", []), np.float64)
        if scales.size and not (np.isfinite(scales).all() and (scales > 0).all()):
            raise BadInput(f"{p}: tensor '{str(d.get('name'))[:64]}' has quantization scale "
                           f"{float(scales.flat[0])!r}; a scale must be a finite number above 0")


def load_interpreter(path: str | Path, threads: int = 1, allocate: bool = True, delegates: list[str] | None = None):
    """An interpreter for the file; `delegates` are external delegate libraries (.so) to load."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"not found: {p}")
    data = read_model_bytes(p)
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise BadInput(f"{p}: not a TFLite model (no TFL3 identifier; truncated or another format)")
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
