"""Pure helpers of bundle.py and signing.py that tests/test_bundle_hardening.py exercises only through
whole bundles: paths inside a bundle, layout guessing, input geometry, size budgets, and which of
several trusted keys a signature names."""
from __future__ import annotations

import pytest

from lepton_edge.bundle import (
    InputSpec,
    Manifest,
    OutputSpec,
    check_sizes,
    guess_layout,
    safe_relpath,
    write_manifest,
)
from lepton_edge.errors import BadInput
from lepton_edge.signing import key_id, load_public, new_keys, sign, verify


@pytest.mark.parametrize("rel", ["model.onnx", "sub/model.onnx", "a.b/c_d-e"])
def test_paths_inside_the_bundle(rel):
    assert safe_relpath(rel) == rel


@pytest.mark.parametrize("rel", ["", "/etc/passwd", "../x", "a/../x", "a//b", "./a", "a/.", "a\\b", "a\0b",
                                 "x" * 256, None, 7])
def test_paths_that_could_leave_the_bundle(rel):
    with pytest.raises(ValueError, match="relative path inside the bundle"):
        safe_relpath(rel)


@pytest.mark.parametrize("dims, layout", [
    ([1, 3, 224, 224], "NCHW"), ([1, 224, 224, 3], "NHWC"), ([1, 1, 28, 28], "NCHW"), ([1, 28, 28, 1], "NHWC"),
    ([1, 3, 4, 3], "NCHW"), ([1, 10], None), ([1, 64, 64, 64], None), (["batch", 3, "h", "w"], "NCHW"),
    ([1, 1, 1, 1404], None), ([1, 1, 1, 3], None), ([1, 3, 1, 1], None), ([1, 266, 1, 1], None),
    ([1, 1, 0, 0], "NCHW"), ([1, 0, 0, 3], "NHWC"),  # (0: a dynamic dim, as model_source passes it)
])
def test_guess_layout(dims, layout):
    assert guess_layout(dims) == layout


def test_input_geometry_by_layout():
    assert InputSpec(name="x", shape=[1, 3, 32, 48]).hw() == (32, 48)
    assert InputSpec(name="x", shape=[1, 32, 48, 3], layout="NHWC").hw() == (32, 48)
    assert InputSpec(name="x", shape=[1, 1, 28, 28], color="GRAY").channels == 1
    with pytest.raises(BadInput, match="dynamic spatial size.*--input-shape"):
        InputSpec(name="x", shape=[1, 3, "h", "w"]).hw()
    # a colour that contradicts the channels says which colour fits (it said images cannot feed the model)
    with pytest.raises(BadInput, match=r"has 1 channel\(s\), and color BGR gives 3: set the color to GRAY"):
        InputSpec(name="x", shape=[1, 1, 28, 28], color="BGR").hw()
    with pytest.raises(BadInput, match="color GRAY gives 1: set the color to RGB or BGR"):
        InputSpec(name="x", shape=[1, 28, 28, 3], layout="NHWC", color="GRAY").hw()
    with pytest.raises(BadInput, match="has 4 channels.*images cannot feed it"):
        InputSpec(name="x", shape=[1, 4, 28, 28]).hw()


def _manifest(**kw) -> Manifest:
    return Manifest(name="t", created="2026-01-01", target={"id": "x86-cpu"}, format="onnx", precision="fp32",
                    model_file="model.onnx", inputs=[InputSpec(name="x", shape=[1, 1, 28, 28])],
                    outputs=[OutputSpec(name="y", shape=[1, 10])], **kw)


def test_size_budget_per_file_and_in_total():
    zero = "0" * 64
    m = _manifest(files={"model.onnx": {"size": 60, "sha256": zero}, "labels.txt": {"size": 50, "sha256": zero}})
    assert check_sizes(m, 110, "b") == 110
    with pytest.raises(BadInput, match="files total 110 bytes, over the bundle limit of 100"):
        check_sizes(m, 100, "b")
    with pytest.raises(BadInput, match="model.onnx declares 60 bytes, over the bundle limit of 55"):
        check_sizes(m, 55, "b")


def test_only_a_manifest_read_from_a_bundle_must_list_its_model():
    """An exporter builds the manifest before write_manifest() fills in `files`."""
    assert _manifest().files == {}
    with pytest.raises(ValueError, match="model_file 'model.onnx' is not listed in files"):
        Manifest.model_validate(_manifest().model_dump(), context={"complete": True})


def test_write_manifest_lists_every_file_but_manifest_and_signature(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"m" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "extra.bin").write_bytes(b"")
    (tmp_path / "signature").write_text("{}")
    m = _manifest()
    write_manifest(tmp_path, m)
    assert sorted(m.files) == ["model.onnx", "sub/extra.bin"]
    assert m.files["model.onnx"].size == 10
    assert m.files["sub/extra.bin"].sha256 == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_the_signature_names_the_key_that_checks_it(tmp_path):
    _, pub_a = new_keys(tmp_path / "a")
    priv_b, pub_b = new_keys(tmp_path / "b")
    assert key_id(load_public(pub_a)) != key_id(load_public(pub_b))
    assert len(key_id(load_public(pub_a))) == 16
    b = tmp_path / "bundle"
    b.mkdir()
    (b / "model.onnx").write_bytes(b"m" * 10)
    write_manifest(b, _manifest())
    with pytest.raises(BadInput, match="not signed"):
        verify(b, [pub_a])
    sign(b, priv_b)
    assert verify(b, [pub_a, pub_b]) == key_id(load_public(pub_b))  # picked by id among several
    with pytest.raises(BadInput, match="not trusted"):
        verify(b, [pub_a])
    with pytest.raises(BadInput, match="refusing to overwrite a private key"):
        new_keys(tmp_path / "b")


def test_a_normalisation_past_the_inputs_range_names_that_range():
    """The line names the dtype whose range the pixels leave: float16's for a float16 input (its values
    are stored as float16), float32's otherwise; a normalisation that fits gives no line."""
    from lepton_edge.bundle import normalisation_overflow

    assert normalisation_overflow(1 / 255, [0.5], [0.25], "float32") is None
    wide = normalisation_overflow(1.0, [0.0], [1e-37], "float32")
    assert wide is not None and "past float32's range (3.4e+38)" in wide and "every frame would reach" in wide
    half = normalisation_overflow(1.0, [0.0], [0.002], "float16")  # 255 / 0.002 = 127,500 > 65,504
    assert half is not None and "past float16's range (6.55e+04)" in half
    assert normalisation_overflow(1.0, [0.0], [0.002], "float32") is None


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "int16", "bool", "float64"])
def test_every_numeric_type_a_runtime_feeds_is_an_input_dtype(dtype):
    """A model whose input is uint16 (a depth camera's frames) or bool loads: the manifest's dtype list
    is every numpy type onnxruntime and LiteRT take, spelled as numpy spells them."""
    spec = InputSpec(name="x", shape=[1, 4], dtype=dtype)
    assert spec.dtype == dtype
    with pytest.raises(ValueError):
        InputSpec(name="x", shape=[1, 4], dtype=dtype.upper())


@pytest.mark.parametrize("field", ["mean", "std"])
def test_a_nan_normalisation_is_refused(field):
    """A NaN mean or std would make every input NaN; infinities are refused by the float32 range check too."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        InputSpec(name="x", shape=[1, 3, 8, 8], **{field: [float("nan")]})


def test_a_layout_the_shape_contradicts_says_which_layout_to_set():
    with pytest.raises(BadInput) as e:
        InputSpec(name="x", shape=[1, 8, 8, 3], layout="NCHW").hw()
    assert str(e.value) == ("input 'x' of shape [1, 8, 8, 3] read as NCHW has 8 channels, as NHWC 3: set the layout "
                            "to NHWC")
