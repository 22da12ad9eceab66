"""parse_size (--max-size, --max-memory): decimal and binary units, one-line BadInput otherwise."""
from __future__ import annotations

import pytest

from lepton_edge.errors import BadInput
from lepton_edge.exporters.options import parse_memory, parse_size


@pytest.mark.parametrize("text, n", [
    (None, None), (1234, 1234), ("1234", 1234), ("1234B", 1234),
    ("1MB", 1_000_000), ("1M", 1_000_000), ("1mb", 1_000_000), (" 2 GB ", 2_000_000_000),
    ("800KB", 800_000), ("800k", 800_000), ("1.5MB", 1_500_000),
    ("512KiB", 524_288), ("1MiB", 1 << 20), ("2GiB", 2 << 30),
])
def test_sizes(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "MB", "abc", "0", "0MB", "-1MB", "1XB", "1TB", "1 M B x", "1e"])
def test_bad_sizes_are_one_line_bad_input(text):
    with pytest.raises(BadInput, match="--max-size must look like 1MB, 800KB or 1048576"):
        parse_size(text)


@pytest.mark.parametrize("text", ["inf", "nan", "1e999", "-inf"])
def test_non_finite_sizes_are_bad_input_not_a_traceback(text):
    """float() reads these; int() of them used to raise OverflowError/ValueError."""
    with pytest.raises(BadInput):
        parse_size(text)


@pytest.mark.parametrize("value", [True, 1.5, [1]])
def test_non_text_non_int_is_bad_input(value):
    with pytest.raises(BadInput):
        parse_size(value)


def test_max_memory_has_a_floor_and_its_own_message():
    assert parse_memory("4GB") == 4_000_000_000 and parse_memory(None) is None
    with pytest.raises(BadInput, match="at least 64MiB"):
        parse_memory("1MB")
    with pytest.raises(BadInput, match="--max-memory must look like 4GB"):
        parse_memory("lots")


def test_sizes_under_one_byte_are_bad_input():
    with pytest.raises(BadInput):
        parse_size("0.5B")
