"""TOML from outside (an agent config, a target profile) as a dict, or one line saying why not.

Why one place: both files are written by hand and copied between machines, so each can be too big,
not UTF-8, not TOML, or nested past what the parser's recursion takes; the agent and the profile
loader must refuse those the same way, with the file named, never with a traceback.
"""
from __future__ import annotations

try:  # not a version check: a test takes tomllib away to run the 3.10 branch on 3.11
    import tomllib  # novermin
except ModuleNotFoundError:  # Python 3.10 (JetPack 6's): tomli is the same parser, before the stdlib took it in
    import tomli as tomllib  # type: ignore[no-redef]

from lepton_edge.errors import BadInput

MAX_TOML_BYTES = 1 << 20  # a config or profile is a page of text; a bigger file is a mistake or an attack


def loads(raw: str | bytes, source: str, what: str, max_bytes: int = MAX_TOML_BYTES) -> dict:
    """`raw` (bytes as read, capped by the caller at max_bytes + 1, or text) parsed as TOML."""
    try:
        if isinstance(raw, bytes):
            if len(raw) > max_bytes:
                raise BadInput(f"{source}: larger than {max_bytes // 1024} KB; not a {what}")
            raw = raw.decode("utf-8")
        return tomllib.loads(raw.removeprefix("\ufeff"))  # (a byte-order mark, as Windows editors save)
    except UnicodeDecodeError as e:
        raise BadInput(f"{source}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{source}: not valid TOML ({e})") from None
    except RecursionError:
        raise BadInput(f"{source}: nested too deeply to be a {what}") from None


def read(path, what: str, max_bytes: int = MAX_TOML_BYTES) -> dict:
    """A TOML file as a dict, or one line: missing, not a regular file (a FIFO would block, /dev/zero
    never end), unreadable, too big, not UTF-8, not TOML, nested too deeply."""
    from lepton_edge.paths import read_small

    return loads(read_small(path, max_bytes, what), str(path), what, max_bytes)
