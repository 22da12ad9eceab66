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
