"""The wheel holds one top-level package with exporters/ and targets/ mapped into it."""
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_layout(tmp_path):
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                        "--outdir", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = tmp_path.glob("lepton_edge-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"lepton_edge"}
    for must in ("lepton_edge/agent/service.py", "lepton_edge/telemetry/outbox.py", "lepton_edge/fleet/deploy.py",
                 "lepton_edge/exporters/base.py", "lepton_edge/exporters/onnx.py", "lepton_edge/targets/__init__.py",
                 "lepton_edge/targets/rpi4.toml", "lepton_edge/targets/x86-cpu.toml",
                 "lepton_edge/zoo/weights/fashion-cnn.pt", "lepton_edge/zoo/weights/mobilenetv2-fashion.pt"):
        assert must in names, must
    entry = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "lepton-edge = lepton_edge.cli:main" in entry


DEVICE_MODULES = ("lepton_edge", "lepton_edge.bundle", "lepton_edge.targets", "lepton_edge.runtime",
                  "lepton_edge.runtime.onnx", "lepton_edge.runtime.litert", "lepton_edge.runtime.preprocess",
                  "lepton_edge.runtime.postprocess", "lepton_edge.capture", "lepton_edge.pipeline",
                  "lepton_edge.stats", "lepton_edge.sinks", "lepton_edge.bench", "lepton_edge.signing",
                  "lepton_edge.telemetry.topics", "lepton_edge.telemetry.schema", "lepton_edge.telemetry.outbox",
                  "lepton_edge.telemetry.broker", "lepton_edge.telemetry.publisher", "lepton_edge.telemetry.health",
                  "lepton_edge.agent.config",
                  "lepton_edge.agent.commands", "lepton_edge.agent.deploy", "lepton_edge.agent.service",
                  "lepton_edge.fleet.deploy")
HEAVY = ("torch", "tensorflow", "onnx", "litert_torch", "lepton_edge.exporters", "lepton_edge.compress",
         "lepton_edge.zoo")


def test_device_side_imports_no_torch(int8_bundle, rpi4_bundle, fashion_video):
    """Importing the device modules (runtime, capture, pipeline, agent, telemetry), and running both
    backends through the pipeline, bench and the sinks, loads neither torch nor TensorFlow nor
    anything of the workstation side."""
    video, _ = fashion_video
    code = (f"import sys, importlib\n"
            f"for m in {DEVICE_MODULES!r}: importlib.import_module(m)\n"
            "from lepton_edge.pipeline import Pipeline\n"
            "from lepton_edge import bench, sinks\n"
            f"for b in ({str(int8_bundle.bundle.path)!r}, {str(rpi4_bundle.bundle.path)!r}):\n"
            f"    p = Pipeline({str(video)!r}, b, max_frames=20)\n"
            "    rs = list(p); p.close(); assert len(rs) == 20\n"
            "    sinks.annotate(rs[0].frame, rs[0])\n"
            "    bench.table([bench.measure(b, 1, 5, 1)], 't')\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m.startswith({HEAVY[-3:]!r})]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
