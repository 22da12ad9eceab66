"""Plug-ins (issue #13 point 1): runtime backends and model loaders register themselves, another
package adds one through an entry point, and a bundle only selects among what the installation
registered.

The third-party packages here are real distributions on disk (a module plus a `*.dist-info` with
METADATA and entry_points.txt), found by `importlib.metadata` on PYTHONPATH in a subprocess, as
`pip install` would leave them; nothing is patched in-process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lepton_edge.errors import BadInput

EXE = str(Path(sys.executable).parent / "lepton-edge")

MYBACKEND = '''
"""A third-party backend: onnxruntime underneath, its own name and options."""
import atexit, json, os

from lepton_edge.runtime.onnx import OnnxBackend, OnnxOptions


class MyOptions(OnnxOptions):
    greeting: str = "hello"  # an option of its own: the runtime does not know it, its default stands


class MyBackend(OnnxBackend):
    name = "mybackend"
    Options = MyOptions

    def __init__(self, path, options):
        super().__init__(path, options)
        self.calls = 0
        log = os.environ["MYBACKEND_LOG"]
        with open(log, "w") as f:
            json.dump({"options": options.model_dump(), "type": type(options).__name__}, f)
        atexit.register(lambda: open(log + ".calls", "w").write(str(self.calls)))

    def run(self, x):
        self.calls += 1
        return super().run(x)

    def describe(self):
        return {**super().describe(), "backend": self.name}
'''

MYLOADER = '''
"""A third-party model loader: `.mine` files name a torch layer size."""
from pathlib import Path

from lepton_edge.model_source import ModelLoader, ModelSource, default_spec


class MineLoader(ModelLoader):
    name = "mine"
    suffixes = (".mine",)

    def load(self, model, *, profile_hw, input_shape=None, example_input=None, weights=None, labels=None,
             name=None, **spec_kw):
        import torch

        n = int(Path(model).read_text())
        module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, n)).eval()
        return ModelSource(name=name or Path(model).stem, kind="torch", module=module,
                           input_spec=default_spec([1, 1, 28, 28]), labels=labels, task="raw")
'''


def _dist(site: Path, name: str, module: str, code: str, entry_points: str) -> None:
    """An installed distribution as pip leaves it: the package and its dist-info."""
    pkg = site / module
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(code)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points).lstrip())


@pytest.fixture
def site(tmp_path) -> Path:
    """mybackend (a working backend and loader) and brokenplug (a backend whose module fails to import)."""
    site = tmp_path / "site"
    _dist(site, "mybackend", "mybackend", MYBACKEND, """
        [lepton_edge.backends]
        mybackend = mybackend:MyBackend
        """)
    _dist(site, "myloader", "myloader", MYLOADER, """
        [lepton_edge.model_loaders]
        mine = myloader:MineLoader
        """)
    _dist(site, "brokenplug", "brokenplug", "import a_library_this_machine_lacks\n", """
        [lepton_edge.backends]
        broken = brokenplug:Backend
        """)
    return site


def _env(site: Path | None, tmp_path: Path) -> dict:
    env = {**os.environ, "COLUMNS": "200", "MYBACKEND_LOG": str(tmp_path / "mybackend.json")}
    env.pop("PYTHONPATH", None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return env


def _with_runtime(bundle: Path, out: Path, runtime) -> Path:
    """A copy of the bundle whose manifest names another runtime (unsigned: no checksum covers it)."""
    shutil.copytree(bundle, out)
    m = json.loads((out / "manifest.json").read_text())
    m["target"]["runtime"] = runtime
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    return out


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=300)


# ---- in-process: the registry and the options --------------------------------------------------------
def test_importing_the_registries_imports_no_engine():
    """Listing every backend imports the built-in modules, but neither onnxruntime nor LiteRT: a device
    with one runtime installed never touches the other."""
    code = ("import sys\n"
            "from lepton_edge.runtime.backend import backends\n"
            "import lepton_edge.runtime\n"
            "print(sorted(backends()))\n"
            "print([m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'ai_edge_litert', 'tflite_runtime')])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["['litert', 'onnxruntime']", "[]"]


def test_each_backend_receives_only_the_options_it_declares():
    from lepton_edge.runtime.litert import LiteRTBackend, LiteRTOptions
    from lepton_edge.runtime.onnx import OnnxBackend, OnnxOptions

    settings = {"threads": 3, "providers": ["CPUExecutionProvider"], "delegates": ["/usr/lib/libaccel.so"]}
    onnx = OnnxBackend.options(**settings)
    assert type(onnx) is OnnxOptions and onnx.model_dump() == {"threads": 3, "providers": ["CPUExecutionProvider"],
                                                                "qdq_fusion": True, "max_run_s": 120.0,
                                                                "max_run_bytes": None}
    lite = LiteRTBackend.options(**settings)
    assert type(lite) is LiteRTOptions and lite.model_dump() == {"threads": 3, "delegates": ["/usr/lib/libaccel.so"],
                                                                 "max_run_s": 120.0, "max_run_bytes": None}
    assert OnnxBackend.options(threads=None).threads == 1  # None: the default
    for bad, words in (({"threads": 0}, "threads"), ({"threads": True}, "threads"), ({"qdq_fusion": 0}, "qdq_fusion"),
                       ({"max_run_s": float("inf")}, "max_run_s"),
                       ({"delegates": ["libaccel.so"]}, "absolute"), ({"providers": "CUDAExecutionProvider"},
                                                                     "providers")):
        backend = LiteRTBackend if "delegates" in bad else OnnxBackend
        with pytest.raises(BadInput, match=words) as e:
            backend.options(**bad)
        assert "\n" not in str(e.value)


def test_a_runtime_name_only_selects_among_registered_backends():
    """The format decides when the named runtime runs another one (a profile's preference); a name the
    installation does not know is one line, however much it looks like code to import."""
    from lepton_edge.runtime.backend import backend_for
    from lepton_edge.runtime.litert import LiteRTBackend
    from lepton_edge.runtime.onnx import OnnxBackend

    assert backend_for("onnx") is OnnxBackend and backend_for("tflite") is LiteRTBackend
    assert backend_for("onnx", "onnxruntime") is OnnxBackend
    assert backend_for("onnx", "litert") is OnnxBackend  # rpi4 exported --format onnx records runtime litert
    for name in ("nosuch", "lepton_edge.runtime.onnx:OnnxBackend", "os:system", "/tmp/libevil.so"):
        with pytest.raises(BadInput, match=r"has no backend in this installation; "
                                           r"installed: onnxruntime \(onnx\), litert \(tflite\)$"):
            backend_for("onnx", name)


# ---- a third-party package, through entry points -----------------------------------------------------
@pytest.mark.slow
def test_a_backend_from_another_package_runs_a_bundle(site, tmp_path, int8_bundle, fashion_video):
    """A bundle whose manifest names `mybackend` runs on it (every frame through its `run`, with the
    options it declares and nothing else), giving the built-in's results; a broken plug-in beside it
    costs one warning line."""
    video, _ = fashion_video
    b = _with_runtime(Path(int8_bundle.bundle.path), tmp_path / "b", "mybackend")
    env = _env(site, tmp_path)
    r = _run(env, "run", str(b), "--source", str(video), "--max-frames", "40", "--json", "--jsonl",
             str(tmp_path / "mine.jsonl"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert json.loads(r.stdout)["model"]["backend"] == "mybackend"
    log = json.loads((tmp_path / "mybackend.json").read_text())
    assert log["type"] == "MyOptions"
    assert log["options"] == {"threads": log["options"]["threads"], "providers": ["CPUExecutionProvider"],
                              "qdq_fusion": True, "max_run_s": 120.0, "max_run_bytes": None,  # (OnnxOptions' own)
                              "greeting": "hello"}  # no delegates: an ONNX engine has none
    assert int((tmp_path / "mybackend.json.calls").read_text()) == 40
    assert r.stderr.count("not loaded") == 1 and "broken" in r.stderr and "a_library_this_machine_lacks" in r.stderr
    # the same frames on the built-in backend: the same results
    r = _run(env, "run", str(int8_bundle.bundle.path), "--source", str(video), "--max-frames", "40", "--json",
             "--jsonl", str(tmp_path / "builtin.jsonl"))
    assert r.returncode == 0 and json.loads(r.stdout)["model"]["backend"] == "onnxruntime", r.stderr[-3000:]

    def top1(f):
        return [json.loads(ln)["result"][0]["label"] for ln in (tmp_path / f).read_text().splitlines()]

    assert top1("mine.jsonl") == top1("builtin.jsonl") and len(top1("mine.jsonl")) == 40


@pytest.mark.slow
def test_a_bundle_cannot_bring_its_own_backend(site, tmp_path, int8_bundle, fashion_video):
    """Without the plug-in installed, a bundle naming it is one line (exit 2); so is a runtime that
    names a module to import; nothing of either is imported."""
    video, _ = fashion_video
    for name, runtime in (("plugin", "mybackend"), ("module", "mybackend:MyBackend")):
        b = _with_runtime(Path(int8_bundle.bundle.path), tmp_path / name, runtime)
        r = _run(_env(None, tmp_path), "run", str(b), "--source", str(video), "--max-frames", "5")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"runtime '{runtime}' has no backend in this installation" in lines[0], lines
        assert not (tmp_path / "mybackend.json").exists()


@pytest.mark.slow
def test_a_model_loader_from_another_package(site, tmp_path):
    """`.mine` files load through the plug-in's loader; the built-ins keep theirs; an unknown suffix
    lists every registered kind."""
    (tmp_path / "net.mine").write_text("7")
    code = ("from lepton_edge import model_source as ms\n"
            "from lepton_edge.errors import BadInput\n"
            f"src = ms.load({str(tmp_path / 'net.mine')!r}, profile_hw=(28, 28))\n"
            "print(src.name, src.kind, src.module(__import__('torch').zeros(1, 1, 28, 28)).shape[-1])\n"
            "print(list(ms.LOADERS.all()))\n"
            "try:\n    ms.load('x.weird', profile_hw=(28, 28))\nexcept BadInput as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=_env(site, tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.splitlines()
    assert out[0] == "net torch 7"
    assert out[1] == "['zoo', 'torch-module', 'onnx', 'torch-file', 'mine']"
    assert "unsupported model type '.weird'" in out[2] and ".mine" in out[2] and "zoo:<name>" in out[2]
