"""The wheel holds one top-level package with exporters/ and targets/ mapped into it."""
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_layout(tmp_path):
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = tmp_path.glob("lepton_edge-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"lepton_edge"}
    for must in ("lepton_edge/exporters/base.py", "lepton_edge/exporters/onnx.py", "lepton_edge/targets/__init__.py",
                 "lepton_edge/targets/rpi4.toml", "lepton_edge/targets/x86-cpu.toml",
                 "lepton_edge/zoo/weights/fashion-cnn.pt", "lepton_edge/zoo/weights/mobilenetv2-fashion.pt"):
        assert must in names, must
    entry = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "lepton-edge = lepton_edge.cli:main" in entry


def test_device_side_imports_no_torch():
    code = ("import sys, lepton_edge, lepton_edge.bundle, lepton_edge.runtime.preprocess, lepton_edge.targets;"
            "bad = [m for m in ('torch', 'tensorflow', 'onnx', 'litert_torch') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
