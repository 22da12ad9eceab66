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


def load_interpreter(path: str | Path, threads: int = 1, allocate: bool = True, delegates: list[str] | None = None):
    """An interpreter for the file; `delegates` are external delegate libraries (.so) to load."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"not found: {p}")
    data = p.read_bytes()
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
