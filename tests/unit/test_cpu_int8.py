"""runtime/cpu_int8.py: the CPU's int8 dot-product instructions in one word, and the line `bench` gives when an
x86 int8 bundle was validated on a CPU whose onnxruntime kernels differ (VNNI or not)."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys

import pytest

from lepton_edge.runtime.cpu_int8 import cpu_int8, kernels_differ

X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.skipif(not X86, reason="x86 flags")
@pytest.mark.parametrize("flags, word", [("fpu sse2 avx2 avx512f avx512_vnni", "avx512-vnni"),
                                         ("sse2 avx2 avx_vnni", "avx-vnni"), ("sse2 avx avx2 fma", "avx2"),
                                         ("sse2 sse4_2", "sse")])
def test_x86_flags_name_the_kernels(flags, word):
    text = f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert cpu_int8(text) == word


def test_arm_features_and_nothing_readable():
    assert cpu_int8("processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp\n") == "neon-dotprod"
    assert cpu_int8("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n") == "neon"
    assert cpu_int8("") is None and cpu_int8("processor\t: 0\n") is None
    if X86 and cpu_int8() is not None:  # this host's own
        assert cpu_int8() in ("avx512-vnni", "avx-vnni", "avx2", "sse")


def test_only_a_device_that_saturates_where_the_validation_did_not_is_a_line():
    assert "avx512-vnni" in kernels_differ("avx512-vnni", "avx2") and "-w7" in kernels_differ("neon-dotprod", "avx2")
    for a, b in (("avx512-vnni", "avx-vnni"), ("avx2", "sse"), ("avx512-vnni", "sse"), ("avx2", "avx2"),
                 ("avx512-vnni", "neon"),
                 ("avx2", "avx-vnni"), ("avx2", "neon-dotprod"), (None, "avx2"), ("avx2", None)):
        assert kernels_differ(a, b) is None, (a, b)  # (validated saturating, or exact here: judged as bad or worse)
    assert kernels_differ("\x1b[31m" + "A" * 5000, "avx2") is None  # (a hostile manifest's value: no line)


def test_bench_measures_with_the_note_where_the_device_saturates_and_the_export_did_not(int8_bundle, monkeypatch,
                                                                                         tmp_path):
    from lepton_edge import bench
    from lepton_edge.runtime import cpu_int8 as mod

    src = int8_bundle.bundle.path
    manifest = json.loads((src / "manifest.json").read_text())
    for here, exported, recipe, noted in (("avx2", "avx512-vnni", "nncf-default", True),
                                          ("avx2", "avx512-vnni", "u8-minmax-w7", False),
                                          ("avx512-vnni", "avx2", "nncf-default", False),
                                          ("avx2", "avx2", "nncf-default", False)):
        copy = tmp_path / f"{here}-{exported}-{recipe}" / src.name
        shutil.copytree(src, copy)
        manifest["toolchain"]["cpu_int8"] = exported
        manifest["compression"]["quantization"]["recipe"] = recipe
        (copy / "manifest.json").write_text(json.dumps(manifest))
        monkeypatch.setattr(mod, "cpu_int8", lambda here=here: here)
        row = bench.measure(str(copy), 1, runs=2, warmup=0)
        assert ("note" in row) == noted, (here, exported, recipe, row.get("note"))


@pytest.mark.skipif(not X86 or cpu_int8() is None, reason="needs an x86 CPU whose flags can be read")
def test_bench_says_when_the_bundle_was_validated_on_other_kernels(int8_bundle, tmp_path):
    """From the command line, on this CPU: a bundle recorded as validated with VNNI gets the line where this CPU
    saturates (no VNNI), and none where it has VNNI too."""
    src = int8_bundle.bundle.path
    manifest = json.loads((src / "manifest.json").read_text())
    assert manifest["toolchain"]["cpu_int8"] == cpu_int8()  # the export recorded its host's
    other = tmp_path / src.name
    shutil.copytree(src, other)
    manifest["toolchain"]["cpu_int8"] = "avx512-vnni"
    manifest["compression"]["quantization"]["recipe"] = "nncf-default"  # (8-bit weights)
    (other / "manifest.json").write_text(json.dumps(manifest))
    args = [sys.executable, "-m", "lepton_edge.cli", "bench", "--runs", "3", "--warmup", "0", "--json"]
    same = subprocess.run([*args, str(src)], capture_output=True, text=True, timeout=300)
    moved = subprocess.run([*args, str(other)], capture_output=True, text=True, timeout=300)
    assert same.returncode == 0 and moved.returncode == 0, (same.stderr[-800:], moved.stderr[-800:])
    assert "note" not in json.loads(same.stdout)[0] and "validated on a CPU" not in same.stderr
    if cpu_int8() == "avx2":
        assert "validated on a CPU with avx512-vnni" in json.loads(moved.stdout)[0]["note"]
        assert "validated on a CPU with" in moved.stderr and "Traceback" not in moved.stderr
    else:  # (this CPU computes int8 exactly: what was validated is what runs)
        assert "note" not in json.loads(moved.stdout)[0] and "validated on a CPU" not in moved.stderr
