"""What the adversarial re-check of issue 10 still found, each a test that failed on the tree as the
fixers left it: a traceback (or an endless wait) where one line was due.

- `run model.onnx --input-spec '{"size":[1]}'` (and `layout=NHWC`, `color=RGB` on a 1x28x28 model):
  the spec passed every field check, the engine raised at the first frame, a 50-line traceback;
- a deploy of a path that is not an archive: a reply of five lines (tarfile's one per method);
- a deploy URL urlsplit refuses (`http://[::1`): a bare "ValueError" instead of a deploy error;
  a redirect loop: a reply of three lines;
- a source naming a FIFO: `run` blocked for ever in OpenCV's open.

The model is a real ONNX file made here (Flatten of a 1x1x28x28 input), so no export is needed.
"""
from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import pytest

from lepton_edge.agent.deploy import BundleStore, DeployError
from lepton_edge.errors import BadInput
from lepton_edge.telemetry.schema import DeployCommand


@pytest.fixture(scope="module")
def flat_onnx(tmp_path_factory) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 28, 28])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 784])
    graph = helper.make_graph([helper.make_node("Flatten", ["input"], ["y"], axis=1)], "flat", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    p = tmp_path_factory.mktemp("model") / "flat.onnx"
    onnx.save(model, p)
    return p


# ---- `run` with an input spec the model cannot take: one line at load, not a traceback per frame ----
@pytest.mark.parametrize("spec", ['{"size":[1]}', "size=1x1", "layout=NHWC", "color=RGB"])
def test_plain_model_input_spec_that_contradicts_the_model_is_refused_at_load(flat_onnx, spec):
    from lepton_edge.runtime import Runtime

    with pytest.raises(BadInput) as e:
        Runtime.load(flat_onnx, input_spec=spec)
    assert "\n" not in str(e.value) and "shape" in str(e.value)


def test_plain_model_with_a_matching_spec_still_runs(flat_onnx):
    import numpy as np

    from lepton_edge.runtime import Runtime

    rt = Runtime.load(flat_onnx, input_spec="size=28x28")
    assert rt.infer(rt.preprocess(np.zeros((40, 30, 3), np.uint8)))[0].shape == (1, 784)


# ---- deploy errors are one line --------------------------------------------------------------------
def _store(tmp_path: Path, **kw) -> BundleStore:
    return BundleStore(tmp_path / "state", [], 1 << 20, max_bundle_bytes=1 << 20, download_timeout_s=5, **kw)


def test_deploy_of_a_file_that_is_no_archive_is_one_line(tmp_path):
    not_tar = tmp_path / "shadow"
    not_tar.write_text("root:*:19000:0:99999:7:::\n")
    store = _store(tmp_path)
    with pytest.raises(DeployError) as e:
        store.fetch(DeployCommand(path=str(not_tar)))
    assert "\n" not in str(e.value) and "cannot unpack" in str(e.value)
    assert list(store.root.iterdir()) == []


class _Redirects(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", "/loop")
        self.end_headers()


@pytest.fixture
def redirect_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirects)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_deploy_url_redirect_loop_and_unparsable_url_are_one_line_deploy_errors(tmp_path, redirect_server):
    store = _store(tmp_path)
    with pytest.raises(DeployError) as e:
        store.fetch(DeployCommand(url=redirect_server + "/loop"))
    assert "\n" not in str(e.value) and "loop" in str(e.value)
    with pytest.raises(DeployError) as e:  # used to escape as a bare ValueError from urlsplit
        store.fetch(DeployCommand(url="http://[::1"))
    assert "bad url" in str(e.value)
    assert list(store.root.iterdir()) == []


# ---- a FIFO as the source: refused at once instead of blocking in open() for ever ------------------
def test_fifo_source_is_refused_without_blocking(tmp_path):
    from lepton_edge.capture import open_source

    fifo = tmp_path / "cam"
    os.mkfifo(fifo)
    done: list = []

    def attempt():
        try:
            open_source(str(fifo))
        except BadInput as e:
            done.append(str(e))

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # let the blocked open() return so the thread can end
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    assert done and "named pipe" in done[0], "open_source blocked on a FIFO with no writer"
