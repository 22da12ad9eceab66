"""errors.first_line: an exception as one line of at most `limit` characters, cut at a word's end."""
from __future__ import annotations

from lepton_edge.errors import first_line


def test_a_long_line_is_cut_at_a_word_with_a_mark_and_a_short_one_is_whole():
    long = RuntimeError("Non-zero status code returned while running Add node. " * 10)
    cut = first_line(long, 80)
    assert len(cut) <= 80 and cut.endswith("…") and cut[:-1] == cut[:-1].rstrip()
    assert str(long).startswith(cut[:-1]) and str(long)[len(cut) - 1] == " "  # (whole words only)
    assert first_line(RuntimeError("short\nsecond line"), 80) == "short"
    assert first_line(MemoryError()) == "MemoryError"
    word = RuntimeError("x" * 300)  # one word: cut where the limit falls
    assert first_line(word, 50) == "x" * 49 + "…"


def test_the_failure_line_says_which_recipes_could_not_be_made():
    from lepton_edge.exporters.base import _crashed_note

    attempts = [{"recipe": "s8-minmax", "passed": False, "why": "top-1 agreement 0.5 < 0.95"},
                {"recipe": "nncf-default", "skipped": True, "why": "the quantizer failed: mean(): could not infer"},
                {"recipe": "s8-percentile", "skipped": True, "why": "not tried: 2 candidates in a row did not beat"}]
    assert _crashed_note(attempts) == "; 1 other(s) could not be made (nncf-default: the quantizer failed: mean(): " \
                                      "could not infer)"
    assert _crashed_note(attempts[:1] + attempts[2:]) == ""


def test_an_int8_artifact_larger_than_fp32_is_said(tmp_path, caplog):
    """300 branches concatenated grew to 2.2x fp32's size as int8, reported without a word."""
    import logging
    from types import SimpleNamespace

    from lepton_edge.exporters.base import _record_sizes

    fp32, small, large = tmp_path / "fp32.onnx", tmp_path / "small.onnx", tmp_path / "large.onnx"
    fp32.write_bytes(b"x" * 1000)
    small.write_bytes(b"x" * 300)
    large.write_bytes(b"x" * 2160)
    ctx = SimpleNamespace(report=SimpleNamespace(compression=SimpleNamespace()))
    with caplog.at_level(logging.WARNING):
        assert _record_sizes(ctx, small, fp32, "int8") == 300 and not caplog.records
        assert _record_sizes(ctx, large, fp32, "int8") == 2160
    assert ctx.report.compression.size_vs_fp32 == 2.16
    assert "the int8 model is 2.16x fp32's size" in caplog.records[-1].getMessage()
    assert "--precision fp32" in caplog.records[-1].getMessage()


def test_a_declared_dim_the_engine_does_not_know_is_recorded_unknown():
    """onnxruntime reported [1, '?'] for an output declared [1, 5] that a Flatten made [1, 48] (its lenient
    merge): the manifest kept the false 5."""
    from types import SimpleNamespace

    from lepton_edge.exporters.writer import observed_shape

    declared = {"name": "y", "shape": [1, 5]}
    assert observed_shape(declared, SimpleNamespace(shape=[1, "?"])) == [1, "?"]
    assert observed_shape(declared, SimpleNamespace(shape=[1, 10])) == [1, 10]
    assert observed_shape(declared, SimpleNamespace(shape=[1, 5])) == [1, 5]
    assert observed_shape(declared, SimpleNamespace(shape=[1, None])) == [1, 5]
    assert observed_shape({"name": "y", "shape": ["n", 5]}, SimpleNamespace(shape=["n", 5])) == ["n", 5]


def test_a_library_s_bare_error_in_a_skip_line_says_its_kind():
    """"the quantizer failed: type" (a KeyError inside a quantizer) told the reader nothing."""
    from types import SimpleNamespace

    from lepton_edge.exporters.recipes import _skip

    said, kept = [], []
    progress = SimpleNamespace(info=said.append)
    watch = SimpleNamespace(peak=0)

    def record(label, **fields):
        kept.append(fields["why"])

    _skip(progress, record, "u8-minmax", KeyError("type"), watch)
    _skip(progress, record, "u8-minmax", IndexError("list index out of range"), watch)
    _skip(progress, record, "u8-minmax", ValueError("the graph has no input named x at node 3"), watch)
    assert kept == ["the quantizer failed: KeyError: 'type'", "the quantizer failed: IndexError: list index out of "
                    "range", "the quantizer failed: the graph has no input named x at node 3"]
