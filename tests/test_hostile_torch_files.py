"""PyTorch model files built to run code at export: a pickle that calls os.system on load (.pth, and a .pt2
weight flagged `use_pickle`), a .pt2 carrying compiled AOTInductor code, a TorchScript forward that reads or
writes a file through torch.from_file, and one whose `while` never ends. Each is refused (or ended) with one
line before it can act; a .pt2 with dynamic height and width is probed at the target's size."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

torch = pytest.importorskip("torch")

from conftest import run_cli  # noqa: E402


class _Calls:
    """A pickle that runs `touch MARKER` when it is loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def _refused(r, *words):
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert all(w in r.stderr for w in words), r.stderr[-1500:]


def _export(model, tmp_path, *extra):
    return run_cli("export", str(model), "--target", "x86-cpu", "--precision", "fp32", "--input-shape", "1,3,32,32",
                   "--allow-synthetic-calibration", "--out", str(tmp_path / "out"), *extra, timeout=300)


def test_a_pickle_that_runs_code_on_load_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    for name in ("evil.pth", "evil.pt"):
        torch.save({"model": _Calls(marker)}, tmp_path / name)
        _refused(_export(tmp_path / name, tmp_path), "pickled Python object", "posix.system")
        assert not marker.exists()
    # a whole module pickled with its class: refused alike, with what to do instead
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), tmp_path / "whole.pth")
    _refused(_export(tmp_path / "whole.pth", tmp_path), "pickled Python object", "torch.jit.save")
    torch.save(_Net().state_dict(), tmp_path / "sd.pth")  # tensors alone still load: the usual hint
    _refused(_export(tmp_path / "sd.pth", tmp_path), "holds a state_dict")


def _pt2(tmp_path, dynamic=False):
    x = torch.zeros(1, 3, 32, 32)
    shapes = ({2: torch.export.Dim("h", min=16, max=512), 3: torch.export.Dim("w", min=16, max=512)},) \
        if dynamic else None
    ep = torch.export.export(_Net().eval(), (x,), dynamic_shapes=shapes)
    path = tmp_path / ("dyn.pt2" if dynamic else "m.pt2")
    torch.export.save(ep, str(path))
    return path


def _rewritten(src, dst, change):
    """A copy of the zip `src` with change(name, data) -> data or None (left out), plus what it returns for
    the name None (extra entries)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)
        for name, data in change(None, None) or []:
            zout.writestr(name, data)
    return dst


def _pickled_weight(src, tmp_path, marker):
    """A copy of the .pt2 `src` whose first weight is flagged `use_pickle` and is a pickle that touches
    `marker` when loaded (torch reads such weights with torch.load(weights_only=False))."""
    import io
    import json

    evil = io.BytesIO()
    torch.save(_Calls(marker), evil)
    flagged: dict = {}

    def flag(name, data):
        if name is None:
            return None
        if name.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            key = next(iter(cfg["config"]))
            cfg["config"][key]["use_pickle"] = True
            flagged["file"] = cfg["config"][key]["path_name"]
            return json.dumps(cfg).encode()
        return data

    step = _rewritten(src, tmp_path / "flagged.pt2", flag)
    return _rewritten(step, tmp_path / "evil.pt2",
                      lambda n, d: d if n is None or not n.endswith("/" + flagged["file"]) else evil.getvalue())


def test_a_pt2_whose_weights_are_pickles_or_compiled_code_is_refused(tmp_path):
    src, marker = _pt2(tmp_path), tmp_path / "ran"
    bad = _pickled_weight(src, tmp_path, marker)
    _refused(_export(bad, tmp_path), "pickled Python object")
    assert not marker.exists()
    root = zipfile.ZipFile(src).namelist()[0].split("/")[0]
    compiled = _rewritten(src, tmp_path / "aoti.pt2", lambda n, d: d if n is not None else
                          [(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")])
    _refused(_export(compiled, tmp_path), "compiled code", "aotinductor")
    assert _export(src, tmp_path).returncode == 0  # the same archive, untouched, exports


class _ReadsAFile(torch.nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x):
        t = torch.from_file(self.path, True, 4, dtype=torch.uint8)
        t.fill_(88)
        return x.mean((2, 3)) + t[0].float()


class _NeverEnds(torch.nn.Module):
    def forward(self, x):
        i = 0
        while i >= 0:
            i = i + 1
        return x.mean((2, 3))


class _ReadsOnLoad(torch.nn.Module):
    """jit.load runs a scripted __setstate__: the file's bytes were in the model before any check."""

    def __init__(self, path: str):
        super().__init__()
        self.path, self.t = path, torch.zeros(4)

    def forward(self, x):
        return x.mean((2, 3)) + self.t[0]

    @torch.jit.export
    def __getstate__(self):
        return (self.t, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]):
        self.path, self.training = state[1], state[2]
        self.t = torch.from_file(self.path, True, 4, dtype=torch.uint8).fill_(88).float()


def _reads_in_a_fork(x, path: str):
    return x + torch.from_file(path, False, 4, dtype=torch.uint8)[0].float()


class _ReadsInAFork(torch.nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x):
        return torch.jit.wait(torch.jit.fork(_reads_in_a_fork, x, self.path)).mean((2, 3))


@pytest.mark.parametrize("build", [_ReadsAFile, _ReadsOnLoad, _ReadsInAFork])
def test_a_torchscript_that_touches_files_is_refused_before_it_loads(tmp_path, build):
    """In forward, in the __setstate__ that torch.jit.load runs, or in a fork's target (which the graph's
    blocks do not hold): refused from the archive's code before torch loads any of it."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep-this")
    torch.jit.script(build(str(victim))).save(str(tmp_path / "m.pt"))
    _refused(_export(tmp_path / "m.pt", tmp_path), "from_file", "reads or writes files")
    assert victim.read_text() == "keep-this"


def test_a_pt2_whose_graph_names_a_file_op_is_refused_and_torch_is_put_back(tmp_path):
    """The graph scanned after loading held the top level only; the archive's graphs are read as text first.
    And an in-process refusal leaves torch.load and torch's .pt2 reader as they were."""
    from torch.export.pt2_archive import _package

    from lepton_edge.errors import BadInput
    from lepton_edge.model_source import _load_torch_file

    src = _pt2(tmp_path)
    import re

    op = re.compile(rb"torch\.ops\.aten\.\w+\.default")
    bad = _rewritten(src, tmp_path / "reads.pt2", lambda n, d: d if n is None or not n.endswith("model.json") else
                     op.sub(b"torch.ops.aten.from_file.default", d, count=1))
    assert op.search(zipfile.ZipFile(src).read(next(n for n in zipfile.ZipFile(src).namelist()
                                                    if n.endswith("model.json"))))
    load, pickle_module = torch.load, _package.pickle
    with pytest.raises(BadInput, match="calls from_file"):
        _load_torch_file(bad)
    marker = tmp_path / "ran"
    evil = _pickled_weight(src, tmp_path, marker)
    with pytest.raises(BadInput, match="pickled Python object"):
        _load_torch_file(evil)
    assert not marker.exists() and torch.load is load and _package.pickle is pickle_module
    module, shape = _load_torch_file(src)  # and the untouched archive loads, torch.load unforced after
    assert shape == [1, 3, 32, 32] and torch.load is load


def test_a_module_given_from_python_is_not_put_under_the_files_time_limit(monkeypatch):
    """Ending the caller's process (a notebook's kernel) for a slow module of its own is not the check's to do:
    the limit is for files."""
    from lepton_edge import model_source
    from lepton_edge.runtime import hard_stop

    begun = []
    real = hard_stop.begin
    monkeypatch.setattr(hard_stop, "begin", lambda what, *a, **k: begun.append(what) or real(what, *a, **k))
    model_source.load(_Net().eval(), profile_hw=(32, 32), input_shape=[1, 3, 32, 32])
    assert not [w for w in begun if "check run" in w]


def test_a_torchscript_whose_loop_never_ends_ends_the_export_with_one_line(tmp_path):
    torch.jit.script(_NeverEnds()).save(str(tmp_path / "loop.pt"))
    code = ("import sys, lepton_edge; from lepton_edge import model_source as m; m.CHECK_RUN_S = 3; "
            f"lepton_edge.export({str(tmp_path / 'loop.pt')!r}, target='x86-cpu', precision='fp32', "
            f"input_shape=[1, 3, 32, 32], allow_synthetic_calibration=True, out={str(tmp_path / 'o')!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "did not finish in 3 s" in r.stderr and "Traceback" not in r.stderr, r.stderr[-800:]


def test_a_pt2_with_dynamic_height_and_width_is_probed_at_the_targets_size(tmp_path):
    """Its dynamic dims were all 1: a Dim with min=16 refused the model at 1x1."""
    r = run_cli("export", str(_pt2(tmp_path, dynamic=True)), "--target", "x86-cpu", "--precision", "fp32",
                "--allow-synthetic-calibration", "--out", str(tmp_path / "out"), "--json", timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    from lepton_edge import targets
    from lepton_edge.bundle import Bundle

    bundle = Bundle.load(next((tmp_path / "out").iterdir()))
    assert bundle.manifest.inputs[0].shape == [1, 3, *targets.load("x86-cpu").input_size]


class _TakesPixels(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x.permute(0, 3, 1, 2).float() / 127.5 - 1.0, 1).flatten(1)


def test_a_pt2_that_takes_uint8_pixels_is_told_how_to_export_it(tmp_path):
    """Its refusal spoke of the input's shape ("does not accept input of shape [1, 96, 96, 3]: Tensor dtype
    mismatch! Expected: Byte"), with no way forward."""
    ep = torch.export.export(_TakesPixels().eval(), (torch.zeros(1, 32, 32, 3, dtype=torch.uint8),))
    torch.export.save(ep, str(tmp_path / "u8.pt2"))
    r = run_cli("export", str(tmp_path / "u8.pt2"), "--target", "x86-cpu", "--precision", "fp32", "--input-shape",
                "1,32,32,3", "--allow-synthetic-calibration", "--out", str(tmp_path / "out"), timeout=300)
    _refused(r, "does not take float32 input", "torch.onnx.export", "uint8 input is fed as it is")
