"""`lepton-edge bench`: per-stage latency, throughput and peak memory of bundles on this machine.

Why each configuration runs in a fresh process: peak RSS is a per-process high-water mark, and a
second model loaded into the same process would inherit the first one's. A fresh process also
keeps one engine's thread pool from slowing the next. Frames are camera-sized (640x480 BGR)
unless `--source` gives real ones, so preprocessing costs what it costs on a device.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge.errors import BadInput, LeptonError

CAMERA_HW = (480, 640)


def _frames(source: str | None, limit: int = 64) -> list[np.ndarray]:
    if source is None:
        rng = np.random.default_rng(0)
        base = rng.integers(0, 256, (CAMERA_HW[0] // 8, CAMERA_HW[1] // 8, 3), dtype=np.uint8)
        import cv2

        return [cv2.resize(base, CAMERA_HW[::-1], interpolation=cv2.INTER_LINEAR)]
    from lepton_edge.capture import open_source

    # a live source gives up after as many reconnects as `run`'s default (5) with no frame: a stream that never
    # yields a decodable frame kept `bench` waiting for ever
    with open_source(source, max_reconnects=5) as src:
        frames = []
        for f in src:
            frames.append(f.image)
            if len(frames) >= limit:
                break
    if not frames:
        from lepton_edge.capture.base import redacted

        raise BadInput(f"no frames in {redacted(source)!r}")
    return frames


class OverBudget(BadInput):
    """`bench` went past its time budget (--max-time): it ends there, with this one line; `rows`, the
    configurations measured before, are still shown (a long comparison on a slow board lost them all)."""

    def __init__(self, message: str, rows: list[dict] | None = None):
        super().__init__(message)
        self.rows = rows or []


def _over(model: str, threads: int | None, max_s: float | None, rows: list[dict]) -> OverBudget:
    return OverBudget(f"{model} ({threads or 'default'} thread(s)) was still being measured when bench's time "
                      f"budget of {max_s:g} s ran out (--max-time; fewer --runs, or a faster model)", rows)


def measure(model: str, threads: int | None, runs: int, warmup: int, source: str | None = None,
            input_spec: str | None = None, max_run_bytes: int | None = None,
            deadline: float | None = None) -> dict[str, Any]:
    """One model at one thread count, in this process; past `deadline` (time.monotonic()) between two runs,
    OverBudget (a run in progress is not stopped: `compare` ends an isolated one's process)."""
    import resource

    from lepton_edge.runtime import Runtime
    from lepton_edge.stats import StageTimes

    rt = Runtime.load(model, threads=threads, input_spec=input_spec, max_run_bytes=max_run_bytes)
    # (a model whose input is not an image gets zeros of its shape unless a .npy source is given)
    frames = _frames(source) if source or rt.takes_images else [rt.blank_input()]
    x = rt.preprocess(frames[0])
    for stage, step in (("inference", lambda: rt.infer(x)), ("postprocessing", lambda: rt.postprocess(rt.infer(x)))):
        try:  # once, before the timed runs: an input size or a task that does not fit is one line
            step()
        except Exception as e:
            raise BadInput(rt.failure(stage, e)) from None
    end = float("inf") if deadline is None else deadline
    for i in range(warmup):
        _check(end, model)
        rt.timed(frames[i % len(frames)])
    st = StageTimes(size=max(runs, 1))
    t0 = time.perf_counter()
    for i in range(runs):
        _check(end, model)
        r = rt.timed(frames[i % len(frames)], i)
        st.add(**r.ms)
    wall = time.perf_counter() - t0
    snap = st.snapshot()
    d = rt.describe()
    note = _kernels_note(rt)
    return {**({"note": note} if note else {}),
            "model": str(model), "name": rt.name, "format": d.get("format") or Path(str(model)).suffix.lstrip("."),
            "precision": d.get("precision"), "backend": d["backend"], "threads": d["threads"],
            "runs": runs, "warmup": warmup, "latency_ms": snap["latency_ms"],
            "throughput_fps": runs / wall if wall > 0 else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "frame": list(frames[0].shape),
            "source": source or ("synthetic 640x480 BGR" if rt.takes_images else "zeros of the input's shape")}


def _kernels_note(rt) -> str | None:
    """A line when an x86 int8 bundle was validated on a CPU whose onnxruntime int8 kernels differ from this
    one's (runtime/cpu_int8.py)."""
    from lepton_edge.runtime.cpu_int8 import cpu_int8, kernels_differ

    m = rt.bundle.manifest if rt.bundle else None
    if m is None or m.precision != "int8" or m.format != "onnx":
        return None
    recipe = str((m.compression.get("quantization") or {}).get("recipe") or "")
    if "w7" in recipe.split("-"):  # 7-bit weights cannot saturate (255 x 64 x 2 < 32,767)
        return None
    return kernels_differ(m.toolchain.get("cpu_int8"), cpu_int8())


def _check(deadline: float, model: str) -> None:
    if time.monotonic() > deadline:
        raise OverBudget(f"{model}: bench's time budget ran out")


def _child(args: tuple, deadline: float | None = None) -> dict:
    try:
        return measure(*args) if deadline is None else measure(*args, deadline=deadline)
    except OverBudget:
        raise
    except LeptonError as e:
        return {"model": args[0], "threads": args[1], "error": str(e)}
    except Exception as e:  # whatever else the engine raises on someone's model: one row, one line
        return {"model": args[0], "threads": args[1], "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                if str(e) else type(e).__name__}


def _send(conn, cfg: tuple) -> None:
    conn.send(_child(cfg))
    conn.close()


POLL_MAX_S = 3600.0


def _isolated(ctx, cfg: tuple, timeout: float | None = None) -> dict | None:
    """One measurement in a fresh process; None when it had not finished after `timeout` seconds (the
    process is killed: an engine cannot be asked to stop a run, and a slow model kept bench going for
    hours). Why a bare process, not a Pool: when the engine crashed the worker (a model that makes LiteRT
    segfault), Pool.apply waited forever for a worker it had quietly replaced; here its pipe closes."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_send, args=(send, cfg), daemon=True)
    from lepton_edge.runtime import hard_stop

    try:
        with _interrupts_deferred():
            proc.start()
        send.close()  # (the child's copy is the only one left: its death is the pipe's end)
        end = None if timeout is None else time.monotonic() + timeout
        while not recv.poll(None if end is None else min(POLL_MAX_S, max(0.0, end - time.monotonic()))):
            if end is None or time.monotonic() >= end:  # (poll's timeout is an int of ms: 24.8 days at most)
                return None
        try:
            return recv.recv()
        except EOFError:
            proc.join()
            if proc.exitcode == hard_stop.EXIT_CODE:  # hard_stop ended it, its one line above
                return {"model": cfg[0], "threads": cfg[1], "error": "a run went past its time or memory limit "
                        "(the line above)"}
            return {"model": cfg[0], "threads": cfg[1], "error": "the engine crashed on this model (its process "
                    "died); a malformed or hostile model file"}
    finally:
        send.close()
        if proc.pid is not None:  # (started)
            if proc.is_alive():
                proc.kill()
            proc.join()
        recv.close()


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block are delivered (to the handlers in place before it) when it
    ends. Why: `Process.start()` writes the spawned child its pickled work after the child exists; a Ctrl-C
    inside that write left the child half of it, and it printed an EOFError traceback under bench's
    'interrupted' line. Deferred, the start completes and the caller's cleanup kills a whole child."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in held}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if got:
            signal.raise_signal(got[0])  # (the handler in place now: KeyboardInterrupt, or the default's end)


def compare(models: list[str], threads: list[int | None], runs: int = 200, warmup: int = 20,
            source: str | None = None, input_spec: str | None = None, isolate: bool = True,
            progress=None, max_s: float | None = None, max_run_bytes: int | None = None) -> list[dict]:
    """Every model at every thread count; one row each (a row with "error" when it cannot run). `max_s`:
    the whole comparison's time budget; past it, OverBudget (one line, with the rows measured before).
    `max_run_bytes`: one run's memory budget (Runtime.load's; None: the runtime's default)."""
    for m in models:
        if not Path(m).exists():
            raise BadInput(f"not found: {m}")
    if max_s is not None and not (isinstance(max_s, (int, float)) and 0 < max_s < float("inf")):
        raise BadInput(f"--max-time must be a positive number of seconds, got {max_s!r}")
    configs = [(m, t, runs, warmup, source, input_spec, max_run_bytes) for m in models for t in threads]
    deadline = None if max_s is None else time.monotonic() + max_s
    rows = []
    ctx = mp.get_context("spawn")
    for cfg in configs:
        if isolate:
            row = _isolated(ctx, cfg, None if deadline is None else max(0.0, deadline - time.monotonic()))
            if row is None:
                raise _over(cfg[0], cfg[1], max_s, rows)
            rows.append(row)
        else:
            try:
                rows.append(_child(cfg, deadline))
            except OverBudget:
                raise _over(cfg[0], cfg[1], max_s, rows) from None
        if progress:
            progress()
    return rows


def parse_threads(text: str | None) -> list[int | None]:
    if not text:
        return [None]
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"--threads must be comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise BadInput(f"--threads must be positive integers, got {text!r}")
    if any(v > 64 for v in vals):  # as `run --threads` (it was quietly 4 x the cores here)
        raise BadInput(f"--threads must be 1..64, got {text!r}")
    return vals


def table(rows: list[dict], title: str):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from lepton_edge.ui import human, printable

    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("model", "format", "thr", "preprocess p50", "inference p50", "p95", "p99", "max",
                "postprocess p50", "throughput", "peak RSS"):
        t.add_column(col, no_wrap=True, justify="left" if col in ("model", "format") else "right")
    for r in rows:
        if "error" in r:
            t.add_row(Text(printable(r["model"])), "-", str(r["threads"] or "-"), "", "", "", "", "", "", "",
                      Text(printable(r["error"]), style="red"))
            continue
        lat = r["latency_ms"]
        inf = lat["inference"]
        t.add_row(Text(printable(Path(r["model"]).name)), f"{r['format']} {r['precision'] or ''}".strip(),
                  str(r["threads"]),
                  f"{lat['preprocess']['p50']:.3f}ms", f"{inf['p50']:.3f}ms", f"{inf['p95']:.3f}ms",
                  f"{inf['p99']:.3f}ms", f"{inf['max']:.3f}ms", f"{lat['postprocess']['p50']:.3f}ms",
                  f"{r['throughput_fps']:.0f} fps", human(r["peak_rss_bytes"], binary=True))
    return t
