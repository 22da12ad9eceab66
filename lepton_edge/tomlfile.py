"""TOML from outside (an agent config, a target profile) as a dict, or one line saying why not.

Why one place: both files are written by hand and copied between machines, so each can be too big,
not UTF-8, not TOML, or nested past what the parser's recursion takes; the agent and the profile
loader must refuse those the same way, with the file named, never with a traceback.

Size is not the whole budget: tomllib spends time superlinear in a dotted key's parts (one key of
16,000 parts, 32 KB, took 3 s; a 1 MB one did not end in 3 minutes), and an integer past 4,300
digits is a ValueError of its own. So a line with more than MAX_DOTS_PER_LINE dots is refused
before parsing (a 1 MB file of 64-part keys parses in under a second), and a too-long number is
one line too.
"""
from __future__ import annotations

try:  # not a version check: a test takes tomllib away to run the 3.10 branch on 3.11
    import tomllib  # novermin
except ModuleNotFoundError:  # Python 3.10 (JetPack 6's): tomli is the same parser, before the stdlib took it in
    import tomli as tomllib  # type: ignore[no-redef]

from lepton_edge.errors import BadInput

MAX_TOML_BYTES = 1 << 20  # a config or profile is a page of text; a bigger file is a mistake or an attack
MAX_DOTS_PER_LINE = 64  # a key's parts (and a table header's) are on one line; real files have a handful


def _long_keys(text: str) -> int | None:
    """The number of the first line with more than MAX_DOTS_PER_LINE dots (in a key, a string or a
    comment alike: a cheap bound, not a parse), or None."""
    if text.count(".") <= MAX_DOTS_PER_LINE:
        return None
    for i, line in enumerate(text.splitlines(), 1):
        if line.count(".") > MAX_DOTS_PER_LINE:
            return i
    return None


def loads(raw: str | bytes, source: str, what: str, max_bytes: int = MAX_TOML_BYTES) -> dict:
    """`raw` (bytes as read, capped by the caller at max_bytes + 1, or text) parsed as TOML."""
    try:
        if isinstance(raw, bytes):
            if len(raw) > max_bytes:
                raise BadInput(f"{source}: larger than {max_bytes // 1024} KB; not a {what}")
            raw = raw.decode("utf-8")
        if (line := _long_keys(raw)) is not None:
            raise BadInput(f"{source}: line {line} has more than {MAX_DOTS_PER_LINE} dots (no key has that many parts)")
        return tomllib.loads(raw.removeprefix("\ufeff"))  # (a byte-order mark, as Windows editors save)
    except UnicodeDecodeError as e:
        raise BadInput(f"{source}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{source}: not valid TOML ({e})") from None
    except RecursionError:
        raise BadInput(f"{source}: nested too deeply to be a {what}") from None
    except ValueError as e:  # (after TOMLDecodeError, a subclass): an integer past Python's 4,300 digits
        raise BadInput(f"{source}: a value this parser cannot hold ({str(e)[:120]})") from None


def read(path, what: str, max_bytes: int = MAX_TOML_BYTES) -> dict:
    """A TOML file as a dict, or one line: missing, not a regular file (a FIFO would block, /dev/zero
    never end), unreadable, too big, not UTF-8, not TOML, nested too deeply."""
    from lepton_edge.paths import read_small

    return loads(read_small(path, max_bytes, what), str(path), what, max_bytes)
