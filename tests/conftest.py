"""Shared fixtures: real Fashion-MNIST images written as files, and one exported bundle to reuse."""
from __future__ import annotations

import functools
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed `lepton-edge` entry point as a user would."""
    exe = Path(sys.executable).parent / "lepton-edge"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "COLUMNS": "160"})


def _cli_cmdline(proc) -> str | None:
    """The command line of a `lepton-edge` process; None for any other (or one already gone)."""
    try:
        args = proc.cmdline()
    except Exception:  # (gone, or a zombie)
        return None
    return " ".join(args) if any(a.endswith(("lepton-edge", "lepton_edge", "lepton_edge.cli")) for a in args) else None


@pytest.fixture(autouse=True)
def _no_cli_child_outlives_its_test():
    """Kill, with its own children, any `lepton-edge` process a test started and left running.

    Why: a test that starts an agent or a monitor in a child and fails (or times out) before it stops
    it leaves the child running for the rest of the session: an agent hung at 90 % of a core slowed a
    whole CI run by minutes. Processes started by a wider fixture (set up before this one) are theirs
    to stop; a leftover is also named as a warning, so the test that leaked it can be found."""
    import warnings

    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    for p in me.children(recursive=True):
        cmd = _cli_cmdline(p) if p.pid not in before else None
        if cmd is None:
            continue
        try:
            family = [*p.children(recursive=True), p]
        except psutil.Error:
            continue
        warnings.warn(f"killed a lepton-edge process the test left running: {cmd[:200]}", stacklevel=1)
        for q in family:
            try:
                q.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(family, timeout=10)


@pytest.fixture(scope="session")
def fashion():
    from lepton_edge.datasets import fashion_mnist

    return fashion_mnist("test")


@pytest.fixture(scope="session")
def fashion_folders(tmp_path_factory, fashion):
    """Real test images as PNGs: calib/ (flat, 120 images) and eval/<class>/ (600 images)."""
    import cv2

    from lepton_edge.datasets import FASHION_LABELS

    x, y = fashion
    root = tmp_path_factory.mktemp("fashion")
    calib, ev = root / "calib", root / "eval"
    calib.mkdir()
    for i in range(120):
        cv2.imwrite(str(calib / f"{i:04d}.png"), x[5000 + i])
    for i in range(600):
        d = ev / FASHION_LABELS[y[i]].replace("/", "-")
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"{i:04d}.png"), x[i])
    return calib, ev


@pytest.fixture(scope="session")
def int8_bundle(tmp_path_factory):
    """zoo:fashion-cnn exported int8 for x86-cpu, evaluated on 3000 test images."""
    import lepton_edge

    out = tmp_path_factory.mktemp("out")
    return lepton_edge.export("zoo:fashion-cnn", target="x86-cpu", out=out, eval_limit=3000)


@pytest.fixture(scope="session")
def rpi4_bundle(tmp_path_factory):
    """zoo:fashion-cnn for rpi4: full-int8 TFLite, NHWC."""
    import lepton_edge

    return lepton_edge.export("zoo:fashion-cnn", target="rpi4", out=tmp_path_factory.mktemp("tfl"), eval_limit=3000)


@pytest.fixture(scope="session")
def tflite_nchw_bundle(tmp_path_factory):
    """TFLite fp32 with an NCHW input (the layout the ARM profiles do not choose)."""
    import lepton_edge

    return lepton_edge.export("zoo:fashion-cnn", target="x86-cpu", format="tflite", precision="fp32",
                              out=tmp_path_factory.mktemp("tfl-nchw"), eval_limit=3000)


@pytest.fixture(scope="session")
def onnx_nhwc_bundle(tmp_path_factory):
    """ONNX fp32 with an NHWC input."""
    import lepton_edge

    return lepton_edge.export("zoo:fashion-cnn", target="x86-cpu", precision="fp32", layout="NHWC",
                              out=tmp_path_factory.mktemp("onnx-nhwc"), eval_limit=3000)


@pytest.fixture(scope="session")
def fashion_video(tmp_path_factory, fashion):
    """The first 3000 Fashion-MNIST test images as a lossless video (FFV1), upscaled 2x like a camera would
    see them; (path, labels)."""
    import cv2

    x, y = fashion
    n = 3000
    path = tmp_path_factory.mktemp("video") / "fashion.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 30, (56, 56), False)
    assert w.isOpened()
    for i in range(n):
        w.write(cv2.resize(x[i], (56, 56), interpolation=cv2.INTER_NEAREST))
    w.release()
    return path, y[:n]


@pytest.fixture
def mosquitto(tmp_path):
    """A real mosquitto on a free loopback port with a fresh persistence directory, stopped afterwards."""
    from mqtt_broker import Mosquitto

    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def prometheus(tmp_path):
    """Start a real Prometheus scraping the given targets ("host:port") every second: prometheus([...]).
    Stopped afterwards."""
    from prometheus_server import PROMETHEUS, Prometheus

    if not os.path.exists(PROMETHEUS):
        pytest.skip("Prometheus is not installed (apt-get install prometheus)")
    started: list = []

    def start(targets: list[str], metrics_path: str = "/metrics"):
        p = Prometheus(tmp_path / f"prometheus{len(started)}", targets, metrics_path).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL (Debian's initdb/pg_ctl) on a free loopback port for the session."""
    from postgres_server import Postgres, pg_bin

    if not pg_bin("initdb"):
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    pg = Postgres().start()
    yield pg
    pg.cleanup()


@pytest.fixture
def postgres(postgres_server):
    """A fresh, empty database on the session's PostgreSQL: its postgresql:// URL."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return postgres_server.url.rsplit("/", 1)[0] + f"/{name}"


# ---- test tiers: `make test-fast` runs -m "not slow and not network"; `make test` runs everything --------
# Marked here by what a test uses, not by hand in each file, so a new test that takes an exported bundle or
# starts a broker lands in the right tier without anyone remembering to mark it. Figures: README, "Tests".
# slow: the fixture exports, converts or trains a model, reads the real data set, or builds a venv or a kit
SLOW_FIXTURES = frozenset({"fashion", "fashion_folders", "fashion_video", "int8_bundle", "rpi4_bundle",
                           "tflite_nchw_bundle", "onnx_nhwc_bundle", "device_venv", "rpi4_kit"})
# network: the fixture starts a service on a loopback port (broker, database, scraper, HTTP server)
NETWORK_FIXTURES = frozenset({"mosquitto", "postgres_server", "postgres", "prometheus", "server", "redirect_server",
                              "webhook"})
# files that are end to end throughout (each test exports, converts, trains, or runs a CLI verb or an agent
# on a model) whatever fixtures they use, and single slow tests in otherwise quick files (--durations=0)
SLOW_FILES = frozenset({
    "test_agent.py", "test_device_extra.py", "test_device_service.py", "test_export.py", "test_faults.py",
    "test_features.py", "test_hostile_torch_files.py", "test_kit.py", "test_packaging.py",
    "test_quantize_robustness.py", "test_quickstart.py",
    "test_runtime.py", "test_tflite.py", "test_third_party_corpus.py", "test_third_party_models.py",
})
SLOW_TESTS = frozenset({
    "test_zoo.py::test_training_is_reproducible", "test_zoo.py::test_mobilenetv2_fashion_int8_under_1mb",
    "test_cli_errors.py::test_non_model_pt", "test_cli_errors.py::test_empty_calibration_folder",
    "test_cli_errors.py::test_wrong_input_shape", "test_cli_errors.py::test_weights_that_do_not_match",
    "test_export_options.py::test_an_exporter_added_from_outside_through_an_entry_point",
    "test_fleet_operator.py::test_once_with_an_unreachable_broker_fails_instead_of_printing_a_stale_fleet",
    "test_fleet_tui.py::test_fleet_show_history_alerts", "test_plugins.py::test_a_model_loader_from_another_package",
    "test_input_hardening.py::test_odd_output_directories_are_one_line_before_any_work",
    "test_postprocess.py::test_embeddings_fit_in_256_bytes_and_keep_neighbours",
    # over a second each without a child process (measured: `pytest -m "not slow and not network" --durations=0`)
    "test_outbox.py::test_corrupt_file_moved_aside_fresh_start_reported_once",
    "test_fleet_tui.py::test_reading_commands_never_write_to_a_file_that_is_not_a_fleet_store",
    "test_fleet_tui.py::test_what_a_device_sends_is_shown_as_text_never_as_markup",
    "test_fleet_tui.py::test_ambiguous_device_and_missing_store",
    "test_detect_heads.py::test_inferred_detect_and_gate_both_sides",
    "test_detect_heads.py::test_picodet_gfl_finds_the_page_regions_as_rapid_layout_does",
    "test_export_options.py::test_resize_reaches_the_manifest_the_device_reads",
    "test_torchscript_tflite.py::test_torchscript_the_converter_cannot_read_is_one_line",
    "test_export_data_budgets.py::test_finetune_stops_at_its_time_budget",
    "test_export_data_budgets.py::test_an_npz_is_read_from_its_header_only_the_rows_used",
    "test_plain_model_inputs.py::test_integer_inputs_take_pixel_codes_as_tflite_files_expect",
    "test_logging.py::test_log_json_is_one_json_object_per_line",
    "test_export_footprint.py::test_search_keeps_no_session_and_only_the_best_file",
    "test_fleet_alerts.py::test_one_devices_event_flood_never_hides_anothers_rollback",
    "test_validation_by_task.py::test_detector_good_passes_damaged_fails",
    "test_hostile_onnx_files.py::test_a_run_that_never_ends_is_stopped_at_its_time_limit",
})
# slow too: a test that runs a CLI verb or an agent in a child process in its own body. Each child is an interpreter
# start and mostly a model loaded, one to twenty seconds: 116 such tests were 80% of the fast tier's time.
_RUNS_A_CHILD = re.compile(r"\b(?:run_cli|cli|_interrupt_when|subprocess\.(?:run|Popen|check_output|check_call))\(")
# network, for a test that starts a server in its own body rather than through a fixture
_STARTS_A_SERVER = re.compile(
    r"\b(?:Mosquitto|MjpegServer|RtspServer|Postgres|Prometheus|WebServer|\w*HTTPServer|serve_directory)\(")


def _fixtures_used(item) -> set[str]:
    """The fixtures a test uses, with those it asks for by a parameter's value (`which` in
    ("int8_bundle", "rpi4_bundle") passed to request.getfixturevalue, a store backend "postgres")."""
    names = set(getattr(item, "fixturenames", ()))
    spec = getattr(item, "callspec", None)
    if spec is not None:
        names |= {v for v in spec.params.values() if isinstance(v, str)}
    return names


@functools.cache
def _source_matches(fn, pattern: re.Pattern) -> bool:
    try:
        return bool(pattern.search(inspect.getsource(fn)))
    except (OSError, TypeError):
        return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        used, file = _fixtures_used(item), item.path.name
        fn = getattr(item, "function", None)
        if used & SLOW_FIXTURES or file in SLOW_FILES or f"{file}::{item.originalname}" in SLOW_TESTS or (
                fn is not None and _source_matches(fn, _RUNS_A_CHILD)):
            item.add_marker(pytest.mark.slow)
        if used & NETWORK_FIXTURES or (fn is not None and _source_matches(fn, _STARTS_A_SERVER)):
            item.add_marker(pytest.mark.network)
