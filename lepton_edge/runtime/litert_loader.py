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


PROBE_S = 60.0  # the test load's time limit: the exporter's models load in well under a second, on a Pi too
# what the test load runs, in a fresh interpreter: this module from its file (argv[2]; not through the package,
# whose __init__ imports the whole runtime: 0.45 s a load instead of 0.12 s), then _probe_child(argv[1], ...).
# Not `sys.path.insert`: `python -c` puts the working directory ('') first on sys.path, ahead of the standard
# library, and the child ran a ctypes.py it found there (`lepton-edge run` itself never reads the directory)
PROBE_CODE = ("import importlib.util, sys\nsys.path[:] = [sys.argv[3]] + [p for p in sys.path if p]\n"
              "spec = importlib.util.spec_from_file_location('_lepton_litert_probe', sys.argv[2])\n"
              "m = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(m)\n"
              "m._probe_child(sys.argv[1], int(sys.argv[4]), sys.argv[5] == '1',\n"
              "               [int(v) for v in sys.argv[6].split(',')] if sys.argv[6] else None)\n")
PROBE_REFUSED = 3  # the child's exit status when LiteRT refused the file (its line on stdout)
_probed: set[tuple] = set()


def dynamic_input(it) -> bool:
    """Whether an input's signature leaves a dimension open (-1): its stored shape is only a default."""
    return any(-1 in [int(v) for v in d.get("shape_signature", [])] for d in it.get_input_details())


def _allocate(it, shape: list[int] | None) -> bool:
    """allocate_tensors (at `shape` for input 0 when given); False, left unallocated, when the file's
    default shape of an input whose signature leaves dimensions open cannot be allocated. Why: TensorFlow
    writes such an input's shape as 1s ([1,1,1,3]); a strided convolution cannot take 1x1, and the file was
    refused ("XNNPack delegate failed to reshape") though it runs at the size `run` then gives it."""
    if shape is not None:
        it.resize_tensor_input(it.get_input_details()[0]["index"], list(shape), strict=True)
    try:
        it.allocate_tensors()
        return True
    except (ValueError, RuntimeError):
        if shape is None and dynamic_input(it):
            return False
        raise


def _probe_child(path: str, threads: int, allocate: bool, shape: list[int] | None = None) -> None:
    """The child's load, as load_interpreter's (the bytes, the threads, check_io before allocate_tensors),
    without external delegates (local configuration, not the file). A refusal is its one line on stdout
    and exit status PROBE_REFUSED; anything else is left to the load in the parent."""
    import sys

    p = Path(path)
    try:
        it = interpreter_class()(model_content=p.read_bytes(), num_threads=threads)
        check_io(it, p)
        if allocate:
            _allocate(it, shape)
    except (ValueError, RuntimeError, BadInput) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        line = (str(e) if isinstance(e, BadInput) else str(_load_error(p, e)) if shape is None else
                f"{p}: LiteRT cannot resize input to {shape}: {first}")
        sys.stdout.write(line.replace("\n", " ") + "\n")
        sys.stdout.flush()
        import os

        os._exit(PROBE_REFUSED)  # (now: the interpreter's destructor is where a corrupted heap may crash)
    except Exception:
        pass


def _probe(p: Path, threads: int, allocate: bool, shape: list[int] | None = None) -> None:
    """Load (and allocate) the file once in a short-lived child process before this process does.

    Why: a mutated .tflite of 3 KB corrupted LiteRT's heap while loading, and `run` (sometimes `inspect`)
    died by SIGSEGV with no message at all; no check of the flatbuffer catches every such file. A child
    that dies by a signal is one line here instead; and a file the child's LiteRT refused is refused here
    with its line, never loaded in this process: that file read memory out of bounds, a clean "Tensor at
    index 1 was optional" error in a bare process but a SIGSEGV in `run`'s, whose heap differs.
    Why a fresh interpreter (`python -c`, as a spawn context's child; not fork): a forked copy of a
    process with threads (capture, the agent's server) can deadlock, and the child imports only numpy
    and LiteRT (no torch, no tensorflow): about 0.12 s for a small model on an idle desktop, 0.2-0.3 s
    on a busy 2-core one. Once per file (path, size, mtime) and process: `resize_input`, and an agent
    loading the same bundle again, pay nothing. `shape`: input 0 resized to it before allocating (a
    dynamic input's default shape could not be allocated: the size `run` gives it is probed too)."""
    import signal
    import subprocess
    import sys

    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, tuple(shape or ()))
    if key in _probed:
        return
    here = Path(__file__).resolve()
    sized = ",".join(str(int(v)) for v in shape or ())
    try:
        child = subprocess.Popen([sys.executable, "-c", PROBE_CODE, str(p), str(here), str(here.parents[2]),
                                  str(threads), "1" if allocate else "0", sized], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError:  # no interpreter to start (a frozen build): nothing to learn; the load that follows checks
        return
    from lepton_edge.runtime import hard_stop

    r = _watched(child, p, PROBE_S, PROBE_BASE_BYTES + hard_stop.growth_budget(p))
    if r.returncode < 0:
        try:
            sig = signal.Signals(-r.returncode).name
        except ValueError:
            sig = f"signal {-r.returncode}"
        raise BadInput(f"{p}: LiteRT crashed loading this model ({sig} in a test load); a malformed or hostile "
                       "model file")
    if r.returncode == PROBE_REFUSED:
        lines = r.stdout.decode("utf-8", "replace").strip().splitlines()
        if lines:
            raise BadInput(lines[-1][:400])
    _probed.add(key)


PROBE_BASE_BYTES = 256 << 20  # the test load's interpreter, numpy and LiteRT, before the model's own memory


def _watched(child, p: Path, seconds: float, max_rss: int):
    """The child's result (returncode, stdout), within `seconds` and `max_rss` resident bytes, else BadInput
    (the child killed). Why the memory: a 3.5 KB .tflite whose input claims [1,20000,20000,3] took the test
    load to 7 GB (13 GB in `inspect`) before XNNPACK refused it; LiteRT allocates holding the GIL, so this
    process's own watcher (hard_stop) could not stop it either, and on a 4 GB board it is the device."""
    import threading
    import time
    from types import SimpleNamespace

    from lepton_edge.memory import rss_bytes

    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(child.stdout.read()), daemon=True)
    reader.start()
    deadline, peak = time.monotonic() + seconds, 0
    try:
        while child.poll() is None:
            peak = max(peak, rss_bytes(child.pid))
            if peak > max_rss:
                raise BadInput(f"{p}: LiteRT's test load of this model took over {max_rss / 2**30:.1f} GiB of memory; "
                               "a malformed or hostile model file, or one too large for this device")
            if time.monotonic() > deadline:
                raise BadInput(f"{p}: LiteRT did not finish loading this model in a test load within {seconds:g} s; "
                               "a malformed or hostile model file")
            time.sleep(0.02)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    reader.join(5)
    return SimpleNamespace(returncode=child.returncode, stdout=out[0] if out else b"")


def load_interpreter(path: str | Path, threads: int = 1, allocate: bool = True, delegates: list[str] | None = None,
                     probe: bool = True, defer_dynamic: bool = False):
    """An interpreter for the file; `delegates` are external delegate libraries (.so) to load. `probe`:
    first load it in a child process (_probe). `defer_dynamic`: an input with open dimensions whose
    default shape cannot be allocated leaves the interpreter unallocated (`allocate_at` then sizes it)
    instead of refusing the file."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"not found: {p}")
    data = read_model_bytes(p)  # (the TFL3 identifier checked there)
    if probe:
        _probe(p, threads, allocate)
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
            if allocate and not _allocate(it, None) and not defer_dynamic:
                it.allocate_tensors()  # (the default shape's own error)
    except (ValueError, RuntimeError) as e:
        raise _load_error(p, e) from None
    return it


def allocate_at(it, path: str | Path, threads: int, shape: list[int]) -> None:
    """Input 0 resized to `shape` and the tensors allocated, tried first in a child process (_probe) as
    every first load is: the in-process allocation at a size the load never probed is where a hostile
    file would crash the process."""
    p = Path(path)
    _probe(p, threads, True, [int(v) for v in shape])
    try:
        _allocate(it, [int(v) for v in shape])
    except (ValueError, RuntimeError) as e:
        raise BadInput(f"LiteRT cannot resize input to {list(shape)}: {str(e).splitlines()[0][:200]}") from None


def _load_error(p: Path, e: Exception) -> BadInput:
    """LiteRT's refusal as one line: the custom op it lacks, or the first line of its message."""
    msg = str(e)
    custom = re.search(r"Encountered unresolved custom op: ([\w/-]+(?:\.[\w/-]+)*)", msg)
    if custom:
        # LiteRT stops at the first op it lacks: a MediaPipe face mesh needs three, and the user who
        # registered the one named met the next only then. The file lists them all.
        others = [c for c in _custom_ops(p) if c != custom.group(1)]
        also = f" (the file also uses custom op{'s' if len(others) > 1 else ''} {', '.join(others)})" if others else ""
        return BadInput(f"{p}: uses custom op '{custom.group(1)}', which this LiteRT interpreter lacks{also}")
    first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), type(e).__name__)
    return BadInput(f"{p}: LiteRT cannot load it ({first[:200]})")


def _custom_ops(p: Path, limit: int = 8) -> list[str]:
    """The custom op names the file's operator codes list (at most `limit`, printable), or [] when it
    cannot be read (tflite_runtime has no schema module; a corrupt file)."""
    try:
        from ai_edge_litert import schema_py_generated as schema

        m = schema.Model.GetRootAs(read_model_bytes(p), 0)
        names = []
        for i in range(m.OperatorCodesLength()):
            code = m.OperatorCodes(i)
            if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) == schema.BuiltinOperator.CUSTOM:
                name = (code.CustomCode() or b"").decode("utf-8", "replace")[:64]
                if name.isprintable() and name and name not in names:
                    names.append(name)
        return names[:limit]
    except Exception:
        return []
