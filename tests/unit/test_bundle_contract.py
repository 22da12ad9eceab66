"""What bundle.py promises beyond "it loads": the schema's defaults and limits a runtime relies on,
the one-line refusals a user reads (their whole text is the contract: tests/test_bundle_hardening.py
matches substrings only), and a hash that reads one byte past the declared size so a file that grew
never matches. Tiny bundles in tmp_path; nothing is exported."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from pydantic import ValidationError

from lepton_edge.bundle import (
    Bundle,
    InputSpec,
    Manifest,
    OutputSpec,
    _sha256_fd,
    parse_manifest,
    write_manifest,
)
from lepton_edge.errors import BadInput


def _manifest(**kw) -> Manifest:
    return Manifest(name="t", created="2026-01-01", target={"id": "x86-cpu"}, format="onnx", precision="fp32",
                    model_file="model.onnx", inputs=[InputSpec(name="x", shape=[1, 1, 28, 28])],
                    outputs=[OutputSpec(name="y", shape=[1, 10])], **kw)


def _bundle(tmp_path, **kw):
    b = tmp_path / "b"
    b.mkdir()
    (b / "model.onnx").write_bytes(b"m" * 10)
    write_manifest(b, _manifest(**kw))
    return b


@pytest.mark.parametrize("dtype", ["uint8", "uint64", "bool", "float16"])
def test_every_numpy_dtype_a_runtime_returns_is_accepted(dtype):
    assert OutputSpec(name="y", shape=[1], dtype=dtype).dtype == dtype
    assert np.dtype(InputSpec(name="x", shape=[1, 3, 2, 2], dtype=dtype).dtype).name == dtype


def test_default_input_scale_maps_a_full_pixel_to_one():
    spec = InputSpec(name="x", shape=[1, 3, 2, 2])
    assert 255 * spec.scale == pytest.approx(1.0)
    assert (spec.mean, spec.std, spec.dtype, spec.layout, spec.color) == ([0.0], [1.0], "float32", "NCHW", "RGB")


@pytest.mark.parametrize("color, channels", [("RGB", 3), ("BGR", 3), ("GRAY", 1)])
def test_channels_follow_the_colour_order(color, channels):
    assert InputSpec(name="x", shape=[1, channels, 4, 4], color=color).channels == channels


def test_a_constant_input_is_bounded():
    assert len(InputSpec(name="k", shape=[4096], value=[0.5] * 4096).value) == 4096
    with pytest.raises(ValidationError, match="value"):
        InputSpec(name="k", shape=[4097], value=[0.5] * 4097)


def test_too_many_dimensions_is_one_line_that_says_the_limit():
    with pytest.raises(BadInput) as e:
        parse_manifest(_manifest().model_dump_json().replace(
            '"shape":[1,1,28,28]', '"shape":[1,1,1,1,1,1,1,1,1,1]').encode(), "m.json")
    assert str(e.value) == ("m.json: invalid manifest (inputs.0.shape: shape [1, 1, 1, 1, 1, 1, 1, 1, 1]...: "
                            "more than 8 dimensions)")


def test_a_model_missing_from_files_is_refused_in_one_line():
    data = _manifest().model_dump_json().encode()
    with pytest.raises(BadInput) as e:
        parse_manifest(data, "m.json")
    assert str(e.value) == "m.json: invalid manifest (manifest: model_file 'model.onnx' is not listed in files)"


def test_labels_that_are_not_text_are_refused_in_one_line(tmp_path):
    b = tmp_path / "b"
    b.mkdir()
    (b / "model.onnx").write_bytes(b"m")
    (b / "labels.txt").write_bytes(b"\xff\xfe cat\n")
    write_manifest(b, _manifest(labels_file="labels.txt"))
    bundle = Bundle.load(b)
    with pytest.raises(BadInput) as e:
        _ = bundle.labels
    assert str(e.value) == f"{b / 'labels.txt'}: labels file is not UTF-8 text"


def test_labels_are_read_line_by_line(tmp_path):
    b = tmp_path / "b"
    b.mkdir()
    (b / "model.onnx").write_bytes(b"m")
    (b / "labels.txt").write_text("cat\ndog\n")
    write_manifest(b, _manifest(labels_file="labels.txt"))
    assert Bundle.load(b).labels == ["cat", "dog"]
    # what a log line or a REPL shows of it: where it is, what it holds, for which target
    shown = repr(Bundle.load(b))
    assert shown.startswith(f"Bundle({str(b)!r}, ") and shown.endswith(")") and "target=" in shown, shown


def test_a_file_of_another_size_is_refused_in_one_line_before_hashing(tmp_path):
    b = _bundle(tmp_path)
    (b / "model.onnx").write_bytes(b"m" * 11)
    with pytest.raises(BadInput) as e:
        Bundle.load(b)
    assert str(e.value) == (f"bundle {b}: checksum mismatch for model.onnx (size 11, the manifest says 10); "
                            "refusing to use it")


def test_the_hash_reads_one_byte_past_the_declared_size(tmp_path):
    """A file that grew after its size was checked must not hash like the declared bytes."""
    f = tmp_path / "grown"
    data = os.urandom(100)
    f.write_bytes(data)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert _sha256_fd(fd, 95) == hashlib.sha256(data[:96]).hexdigest()
        assert _sha256_fd(fd, 100) == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)
