"""Hostile inputs to the device side and the CLI (issue #10): a manifest never loads native code,
budgets are checked before the work, and bad input is one line (exit 2), never a traceback."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from lepton_edge.errors import BadInput

EVIL_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void evil(void) {
  FILE *f = fopen(getenv("EVIL_MARKER") ? getenv("EVIL_MARKER") : "/nonexistent", "w");
  if (f) { fputs("native code ran\n", f); fclose(f); }
}
"""


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def evil_so(tmp_path_factory) -> Path:
    """A real shared library whose constructor writes $EVIL_MARKER when anything dlopens it."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("evil")
    (d / "evil.c").write_text(EVIL_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(d / "libevil.so"), str(d / "evil.c")], check=True)
    return d / "libevil.so"


def _with_manifest(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _cli(marker: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    import os
    import sys

    exe = Path(sys.executable).parent / "lepton-edge"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "160", "EVIL_MARKER": str(marker)})


# ---- 1. native code from a manifest ----------------------------------------------------------------

def test_a_manifest_delegate_path_is_never_loaded_by_run(tmp_path, rpi4_bundle, fashion_video, evil_so):
    marker = tmp_path / "marker"
    b = _with_manifest(rpi4_bundle.bundle.path, tmp_path / "b",
                       lambda m: m["target"].update(delegates=[str(evil_so), "../libevil.so", "XNNPACK"]))
    r = _cli(marker, "run", str(b), "-s", str(fashion_video[0]), "-n", "5", "--no-show")
    assert not marker.exists(), "a library named by the manifest was loaded"
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    if r.returncode == 0:  # ignored with a warning (a manifest schema may refuse it instead: exit 2)
        assert "not a symbolic name" in r.stderr
    else:
        _one_line_error(r)


def test_a_delegate_name_loads_only_the_library_local_configuration_allows(tmp_path, rpi4_bundle, fashion_video,
                                                                           evil_so):
    """The allow-list is what is loaded: the same manifest naming 'accel' loads nothing without a
    local entry and the configured library with one (this one is no delegate: one line, exit 2)."""
    marker = tmp_path / "marker"
    b = _with_manifest(rpi4_bundle.bundle.path, tmp_path / "b", lambda m: m["target"].update(delegates=["accel"]))
    r = _cli(marker, "run", str(b), "-s", str(fashion_video[0]), "-n", "3", "--no-show")
    assert r.returncode == 0, r.stderr[-1500:]
    assert "does not list" in r.stderr and not marker.exists()
    r = _cli(marker, "run", str(b), "-s", str(fashion_video[0]), "-n", "3", "--no-show",
             "--delegate", f"accel={evil_so}")
    assert marker.exists()
    _one_line_error(r, "delegate library")
    _one_line_error(_cli(marker, "run", str(b), "-s", "x", "--delegate", "accel=relative/lib.so"), "absolute")


def test_a_manifest_delegate_path_is_never_loaded_by_the_agent(tmp_path, mosquitto, rpi4_bundle, fashion_video,
                                                               evil_so):
    import os
    import signal
    import sys

    from mqtt_helpers import Recorder

    marker = tmp_path / "marker"
    b = _with_manifest(rpi4_bundle.bundle.path, tmp_path / "b",
                       lambda m: m["target"].update(delegates=[str(evil_so)]))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'broker = "{mosquitto.url}"\nfleet = "f1"\ndevice_id = "dev1"\nbundle = "{b}"\n'
                   f'source = "{fashion_video[0]}"\nloop = true\nwindow_s = 0.2\nstate_dir = "{tmp_path / "state"}"\n'
                   '[delegates]\nedgetpu = "/usr/lib/libedgetpu.so.1"\n')
    rec = Recorder(mosquitto.port)
    exe = Path(sys.executable).parent / "lepton-edge"
    agent = subprocess.Popen([str(exe), "agent", "--config", str(cfg)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "EVIL_MARKER": str(marker)})
    try:
        rec.wait_for(lambda r: len(r.of("/telemetry")) >= 2 or agent.poll() is not None, timeout=60)
        if agent.poll() is not None:  # refused at start (a manifest schema may refuse a path): one line
            err = agent.stderr.read()
            assert agent.returncode == 2 and "Traceback" not in err, err[-1500:]
        else:  # ignored: the agent runs on the CPU and says so
            assert len(rec.of("/telemetry")) >= 2
        assert not marker.exists(), "the agent loaded a library named by the manifest"
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
        rec.close()


def test_onnx_execution_providers_from_a_manifest_are_names_this_build_has(tmp_path, int8_bundle):
    from lepton_edge.runtime import Runtime

    b = _with_manifest(int8_bundle.bundle.path, tmp_path / "b", lambda m: m["target"].update(
        execution_providers=["/abs/libcustom_ops.so", "NoSuchExecutionProvider", "CPUExecutionProvider"]))
    rt = Runtime.load(b)
    assert rt.backend.session.get_providers() == ["CPUExecutionProvider"]
    assert rt.predict(np.zeros((28, 28), np.uint8))


# ---- 2. threads -------------------------------------------------------------------------------------

def test_threads_are_capped_at_64(int8_bundle, fashion_video):
    from lepton_edge.runtime import Runtime

    for bad in (0, 65, 100_000, True, 2.5):
        with pytest.raises(BadInput, match="1 to 64"):
            Runtime.load(int8_bundle.bundle.path, threads=bad)
    t0 = time.monotonic()
    _one_line_error(run_cli("run", str(int8_bundle.bundle.path), "-s", str(fashion_video[0]), "--threads", "100000"),
                    "1 to 64")
    assert time.monotonic() - t0 < 30


# ---- 3. the manifest's input against the model's ----------------------------------------------------

@pytest.mark.parametrize("shape,dtype,needle", [([1, 1, 32, 32], "float32", "does not match the model"),
                                                ([1, 3, 28, 28], "float32", "does not match the model"),
                                                ([1, 1, 28, 28], "uint8", "dtype"),
                                                ([1, 1, 20000, 20000], "float32", "too large|over the limit")])
def test_a_manifest_input_that_does_not_fit_the_model_is_refused_at_load(tmp_path, int8_bundle, shape, dtype,
                                                                         needle):
    import resource

    from lepton_edge.runtime import Runtime

    def edit(m):
        m["inputs"][0].update(shape=shape, dtype=dtype)
    b = _with_manifest(int8_bundle.bundle.path, tmp_path / "b", edit)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadInput, match=needle):
        Runtime.load(b)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KB: nothing sized by it


def test_an_input_spec_size_past_the_budget_is_refused_before_allocation(int8_bundle):
    from lepton_edge.runtime import Runtime

    with pytest.raises(BadInput, match="does not match|too large|8192"):
        Runtime.load(int8_bundle.bundle.path, input_spec="size=20000x20000")


# ---- 4. one line, not a traceback ---------------------------------------------------------------------

@pytest.mark.parametrize("spec", ['{"size":[1,2,3]}', "scale=1/0", "scale=nan", "mean=1,x", "std=0",
                                  '{"mean": {"a": 1}}', '{"nope": 1}', "[" * 30_000, '["layout"]', "size=0x3",
                                  "dtype=complex1024", '{"scale": true}', '{"size": "big"}'])
def test_a_malformed_input_spec_is_one_bad_input(spec):
    from lepton_edge.runtime.spec import parse_overrides

    with pytest.raises(BadInput, match="--input-spec"):
        parse_overrides(spec)


def test_a_malformed_input_spec_is_one_line_in_run(int8_bundle, fashion_video):
    _one_line_error(run_cli("run", str(int8_bundle.bundle.path), "-s", str(fashion_video[0]), "--input-spec",
                            '{"size":[1,2,3]}'), "--input-spec")
    _one_line_error(run_cli("run", str(int8_bundle.bundle.path), "-s", str(fashion_video[0]), "--input-spec",
                            "scale=1/0"), "--input-spec")


@pytest.mark.parametrize("content,needle", [(b"broker = \"\xff\xfe\"\n", "UTF-8"),
                                            (b"x = " + b"[" * 50_000 + b"]" * 50_000 + b"\n", "nested"),
                                            (b"a = 1\n" * 300_000, "larger")])
def test_a_bad_agent_config_or_profile_file_is_one_line(tmp_path, content, needle):
    from lepton_edge import targets
    from lepton_edge.agent.config import load

    f = tmp_path / "x.toml"
    f.write_bytes(content)
    with pytest.raises(BadInput, match=needle):
        load(f, {})
    with pytest.raises(BadInput, match=needle):
        targets.load(f)
    _one_line_error(run_cli("agent", "--config", str(f)), needle)


def test_the_agent_config_delegates_table_is_checked(tmp_path):
    from lepton_edge.agent.config import load

    f = tmp_path / "agent.toml"
    f.write_text('[agent]\nbundle = "b"\n[delegates]\nedgetpu = "/usr/lib/libedgetpu.so.1"\n')
    assert load(f, {}).delegates == {"edgetpu": "/usr/lib/libedgetpu.so.1"}
    f.write_text('[delegates]\nedgetpu = "libedgetpu.so.1"\n')
    with pytest.raises(BadInput, match="absolute"):
        load(f, {})


@pytest.mark.parametrize("text,needle", [
    ('source = "cam"\n[agent]\nbundle = "b"\n', "'source' is outside the [agent] table"),
    ('[agent]\nbundle = "b"\n[other]\nx = 1\n', "'other' is outside the [agent] table"),
    ("health_timeout_s = inf\n", "health_timeout_s"), ("window_s = nan\n", "window_s"),
    ("outbox_max = 99999999999999999999999\n", "outbox_max"), ("max_bundle_bytes = 1e30\n", "max_bundle_bytes"),
])
def test_agent_config_fields_are_never_dropped_or_unbounded(tmp_path, text, needle):
    """Top-level fields beside an [agent] table were dropped without a word, an unknown table beside it
    accepted; `health_timeout_s = inf` (a deploy's health check waiting forever) and numbers without
    an upper bound were accepted."""
    from lepton_edge.agent.config import load

    f = tmp_path / "agent.toml"
    f.write_text(text)
    with pytest.raises(BadInput, match=re.escape(needle)):
        load(f, {})


def _profile(tmp_path, **fields) -> Path:
    from lepton_edge import targets

    text = (targets._builtin_dir() / "x86-cpu.toml").read_text()
    lines = [ln for ln in text.splitlines() if ln.split("=")[0].strip() not in fields]
    head = [f"{k} = {v}" for k, v in fields.items()]
    f = tmp_path / "p.toml"
    f.write_text("\n".join(head + lines) + "\n")
    return f


@pytest.mark.parametrize("field,value", [("latency_budget_ms", "inf"), ("latency_budget_ms", "nan"),
                                         ("latency_budget_ms", "-5.0"), ("max_opset", "99"), ("max_opset", "3"),
                                         ("threads", "100000"), ("max_model_bytes", "0")])
def test_a_profile_with_an_unbounded_number_is_refused(tmp_path, field, value):
    from lepton_edge import targets

    with pytest.raises(BadInput, match=field):
        targets.load(_profile(tmp_path, **{field: value}))


def test_the_builtin_profiles_still_load():
    from lepton_edge import targets

    assert len(targets.all_profiles()) >= 5


def test_odd_output_directories_are_one_line_before_any_work(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    _one_line_error(run_cli("keys", "new", "--out", "/proc/keys"), "--out")
    _one_line_error(run_cli("keys", "new", "--out", str(f)), "not a directory")
    for out in (str(f), "/proc", "/proc/x", str(f / "sub")):
        t0 = time.monotonic()
        _one_line_error(run_cli("export", "zoo:fashion-cnn", "-o", out), "--out")
        assert time.monotonic() - t0 < 8, "checked after the export's work"


@pytest.mark.parametrize("kw,needle", [({"prune": "abc"}, "prune"), ({"out": 3.14}, "out"),
                                       ({"prune": 1.5}, "prune"), ({"finetune_epochs": -1}, "finetune_epochs"),
                                       ({"labels": "abc"}, "labels")])
def test_the_python_api_checks_its_arguments_first(tmp_path, kw, needle):
    import lepton_edge

    kw = {"out": tmp_path, **kw}
    t0 = time.monotonic()
    with pytest.raises(BadInput, match=needle):
        lepton_edge.export("zoo:fashion-cnn", **kw)
    assert time.monotonic() - t0 < 5


def test_a_binary_or_missing_labels_file_is_one_line(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_bytes(b"\xff\xd8\xff\x00\x10JFIF" * 100)
    _one_line_error(run_cli("export", "zoo:fashion-cnn", "-o", str(tmp_path / "o"), "--labels", str(f)), "labels")
    _one_line_error(run_cli("export", "zoo:fashion-cnn", "-o", str(tmp_path / "o"), "--labels",
                            str(tmp_path / "nope.txt")), "labels file not found")


def test_inspect_an_empty_onnx_file_is_exit_2(tmp_path):
    f = tmp_path / "empty.onnx"
    f.write_bytes(b"")
    _one_line_error(run_cli("inspect", str(f)), "empty")
    f.write_bytes(b"\x00\x00\x00")
    _one_line_error(run_cli("inspect", str(f)), "ONNX")


# ---- 6, 7. live sources that send garbage, or stall ------------------------------------------------

def _frames():
    return [np.full((56, 56, 3), 20 * i, np.uint8) for i in range(5)]


def test_a_stream_of_garbage_ends_run_with_one_line(int8_bundle):
    from mjpeg_server import MjpegServer

    srv = MjpegServer(_frames(), mode="garbage").start()
    try:
        t0 = time.monotonic()
        r = run_cli("run", str(int8_bundle.bundle.path), "-s", srv.url, "--max-reconnects", "2", "--no-show",
                    timeout=90)
        _one_line_error(r, "no decodable frame", "reconnect")
        assert time.monotonic() - t0 < 60
        assert "corrupt/skipped 0," not in r.stderr  # the connections that decoded nothing are counted
    finally:
        srv.stop()


def test_a_service_source_keeps_retrying_garbage_and_shows_it_in_its_status():
    from lepton_edge.capture import open_source
    from mjpeg_server import MjpegServer

    srv = MjpegServer(_frames(), mode="garbage").start()
    try:
        src = open_source(srv.url, max_backoff=1.0)  # max_reconnects None: the agent's choice
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not (src.corrupt >= 2 and src.reconnects >= 2):
            assert src.read(timeout=0.5) is None
        st = src.status()
        assert st["corrupt"] >= 2 and st["reconnects"] >= 2 and not src.closed, st
        assert set(st) == {"kind", "live", "captured", "dropped", "corrupt", "reconnects", "connected"}
        src.close()
    finally:
        srv.stop()


def test_a_stalled_camera_is_noticed_and_reopened():
    from lepton_edge.capture import open_source
    from mjpeg_server import MjpegServer

    srv = MjpegServer(_frames(), mode="stall", stall_after=5).start()
    try:
        src = open_source(srv.url, max_backoff=1.0, stall_s=1.0)
        got, deadline = 0, time.monotonic() + 30
        while time.monotonic() < deadline and got < 20:
            got += src.read(timeout=0.5) is not None
        assert got >= 20 and src.reconnects >= 1 and srv.connections >= 2, (got, src.status())
        src.close()
    finally:
        srv.stop()
