"""Real third-party models (issue 14), fast subset: two small pretrained models from PyPI wheels
exported int8 with default flags, calibrated on a folder of real photos, then run on held-out photos.
The whole corpus (fp32/fp16/int8, x86-cpu and rpi4, NNCF beside) is bench/third_party_bench.py."""
from __future__ import annotations

import json
import shutil

import cv2
import pytest

from conftest import run_cli
from third_party import corpus


def _fetch(name):
    try:
        return corpus.fetch(name)
    except RuntimeError as e:  # the wheel could not be downloaded (no index reachable)
        if "pip download" in str(e):
            pytest.skip(str(e))
        raise


def test_photos_are_real_split_and_deterministic():
    cal, ev = sorted(corpus.calib_dir().glob("*.jpg")), sorted(corpus.eval_dir().glob("*.jpg"))
    assert (len(cal), len(ev)) == (corpus.N_CALIB, corpus.N_EVAL)
    src = lambda ps: {p.name.rsplit("-", 1)[0] for p in ps}  # noqa: E731
    assert src(cal) and src(ev) and not src(cal) & src(ev)  # evaluation photos are held out
    for p in cal[:3] + ev[:3]:
        im = cv2.imread(str(p))
        assert im.shape == (corpus.CROP, corpus.CROP, 3) and im.std() > 5  # a real picture, not a flat fill
    assert corpus.photos() == cal + ev


def test_fetch_checks_sha256_and_repairs_the_cache(tmp_path, monkeypatch):
    _fetch("ppocr-cls")  # the wheel, in the real cache
    whl = corpus.wheel("rapidocr-onnxruntime", "1.4.4")
    monkeypatch.setattr(corpus, "CACHE", tmp_path)
    (tmp_path / "wheels").mkdir()
    shutil.copy(whl, tmp_path / "wheels" / whl.name)
    p = corpus.fetch("ppocr-cls")
    p.write_bytes(b"tampered")  # a damaged cache file is re-extracted, never used
    assert corpus._sha256(corpus.fetch("ppocr-cls")) == corpus.MODELS["ppocr-cls"].sha256
    bad = corpus.CorpusModel(**{**corpus.MODELS["ppocr-cls"].__dict__, "name": "bad", "sha256": "0" * 64})
    monkeypatch.setitem(corpus.MODELS, "bad", bad)
    with pytest.raises(RuntimeError, match="sha256"):
        corpus.fetch("bad")
    assert not list((tmp_path / "models").glob("bad*"))  # nothing half-written left behind


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppocr-cls", "mtcnn-onet"])
def test_int8_export_with_defaults_then_run(name, tmp_path):
    """What a new user does: export with --calib pointing at photos (int8 is x86-cpu's default),
    then run the bundle on real frames."""
    m = corpus.MODELS[name]
    src = _fetch(name)
    r = run_cli("export", str(src), "--target", "x86-cpu", "--calib", str(corpus.calib_dir()),
                "--out", str(tmp_path), "--json", *m.flags, timeout=600)
    assert r.returncode == 0, f"{name}: int8 export failed: {r.stderr.strip()[-600:]}"
    (bundle,) = [p.parent for p in tmp_path.rglob("manifest.json")]
    assert json.loads((bundle / "manifest.json").read_text())["precision"] == "int8"
    r = run_cli("run", str(bundle), "--source", str(corpus.eval_dir()), "--max-frames", "10", "--json", "--no-show",
                timeout=300)
    assert r.returncode == 0, r.stderr[-600:]
    assert json.loads(r.stdout)["frames"] == 10
