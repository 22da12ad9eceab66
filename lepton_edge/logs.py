"""Logging setup: library code logs through `logging`, and this module decides, once per process,
how the records look on stderr.

Why one place: the library (exporters, runtime, agent, fleet) only calls
`logging.getLogger(__name__)`; whether a record becomes a coloured line on a terminal, a plain
line in the journal or CI log, or a JSON object for a log shipper is the entry point's choice
(`lepton-edge --quiet/--verbose/--log-json`), made here and nowhere else. A Python program
using the library gets standard behaviour: nothing configured, so warnings reach stderr through
logging's last-resort handler, and `configure()` is there for whoever wants our format.

Three renderings, chosen by `configure`:
- a terminal (a person watching): rich's RichHandler on the shared stderr console, so log lines
  print above progress bars and spinners instead of through them;
- stderr that is not a terminal (systemd's journal, CI, a pipe): one plain line per record.
  The journal stamps each line and keeps one entry per line, so a record never wraps or carries
  a newline, and no markup is read from a message (a payload's '[/x]' is text, not a style);
- `--log-json`: one JSON object per record (time, level, logger, message and the record's extra
  fields), for log shippers. Written here rather than with python-json-logger: a device install
  (offline kits carry every wheel) should not grow a dependency for thirty lines.

Every handler writes to `stderr()`, which is sys.stderr except while `ui.native_stderr_silenced`
has pointed file descriptor 2 at /dev/null: then it is a duplicate of the original descriptor, so
other threads' log lines still reach the terminal or the journal during that window.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
import threading
from typing import IO, Any

ROOT = "lepton_edge"

# Set by ui.native_stderr_silenced while fd 2 points at /dev/null: where Python-level lines go meanwhile.
_redirect: IO[str] | None = None
_lock = threading.Lock()
_installed: list[logging.Handler] = []
_state: dict[str, Any] = {"verbosity": 0, "json": False, "timestamps": False, "quiet": False, "configured": False}

# What every LogRecord carries; anything else on a record came from `extra=` and is worth keeping.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def stderr() -> IO[str]:
    """Where Python-level diagnostics go now: sys.stderr, except while native output is silenced
    and sys.stderr writes to fd 2 (now /dev/null): then a duplicate of the original fd 2. A
    sys.stderr swapped for something else (a capture, a sink) is respected as it is."""
    out = sys.stderr
    alt = _redirect
    if alt is not None:
        try:
            if out.fileno() == 2:
                return alt
        except (AttributeError, ValueError, OSError):
            pass
    return out


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller attached with `extra=` (presentation-only ones start with '_')."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class StderrHandler(logging.StreamHandler):
    """A StreamHandler whose stream is looked up at each record (see `stderr()`), as logging's own
    last-resort handler does, so pytest's capture, a redirected sys.stderr or a silenced window
    all see the line."""

    def __init__(self, level: int = logging.NOTSET):
        logging.Handler.__init__(self, level)

    @property
    def stream(self):  # type: ignore[override]
        return stderr()

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__/setStream assign it; the lookup wins
        pass


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, then extra fields
    (and the exception, when there is one). Values JSON cannot hold are written as strings."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        for k, v in extra_fields(record).items():
            doc.setdefault(k, v)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False, separators=(",", ":"))


def _prefix(record: logging.LogRecord) -> str:
    if getattr(record, "stage", None) is not None:
        return "✓ "
    if record.levelno >= logging.ERROR:
        return "error: "
    if record.levelno >= logging.WARNING:
        return "warning: "
    return ""


def printable_line(text: str) -> str:
    """A record's text with control characters shown as '?' (ui.printable), for a terminal or the journal.
    Why here, for every record: a message quotes what devices and files say (a device's clock string, a
    file name, a broker's reason), and one `\x1b]52;...` in it wrote the operator's clipboard and `\x1b[2J`
    cleared the screen; each call site escaping its own fields missed some. (JSON lines escape them already.)"""
    from lepton_edge.ui import printable

    return "\n".join(printable(line) for line in text.split("\n"))  # (a message's own line breaks stay)


class PlainFormatter(logging.Formatter):
    """One line per record, whitespace collapsed and length bounded (the journal's one entry per
    line); 'warning: '/'error: ' say the level, --verbose adds time, level and logger."""

    MAX = 1000

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += " | " + self.formatException(record.exc_info)
        line = printable_line(" ".join(text.split()))
        if len(line) > self.MAX:
            line = line[:self.MAX] + "..."
        if self.verbose:
            return f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.name}: {line}"
        return _prefix(record) + line


def _rich_handler(verbose: bool, timestamps: bool) -> logging.Handler:
    from rich.highlighter import NullHighlighter
    from rich.logging import RichHandler
    from rich.markup import MarkupError
    from rich.text import Text

    from lepton_edge import ui

    class HumanHandler(RichHandler):
        """RichHandler on ui.err (so lines go above live progress bars), rendering our records the
        way the CLI always showed them: '✓ stage (1.2 s)', 'warning: ...', ui.info's markup."""

        def render_message(self, record: logging.LogRecord, message: str):
            stage = getattr(record, "stage", None)
            if stage is not None:
                return Text.assemble(("✓ ", "green"), str(stage), (f" ({getattr(record, 'seconds', 0):.1f} s)", "dim"))
            rich_text = getattr(record, "_rich", None)
            text = Text(printable_line(message))
            if rich_text is not None:
                try:
                    text = Text.from_markup(rich_text)
                except MarkupError:
                    pass
            if not verbose and record.levelno >= logging.WARNING:
                label = ("error: ", "red") if record.levelno >= logging.ERROR else ("warning: ", "yellow")
                text = Text.assemble(label, text)
            return text

    return HumanHandler(console=ui.err, show_time=verbose or timestamps, show_level=verbose, show_path=verbose,
                        markup=False, highlighter=NullHighlighter(), keywords=[], log_time_format="%H:%M:%S")


def _terminal() -> bool:
    try:
        return stderr().isatty()
    except (AttributeError, ValueError, OSError):
        return False


def configure(verbosity: int = 0, json_lines: bool = False, timestamps: bool = False) -> None:
    """Install the one handler for this process (again: replaces the previous one).

    verbosity: -1 quiet (warnings and errors), 0 normal (info), 1 verbose (debug, with time, level
    and logger name). json_lines: one JSON object per record. timestamps: a time on every human
    line on a terminal (the agent's; the journal and CI logs stamp lines themselves). Other libraries' records pass at
    warning level (info with --verbose), ours at the chosen level."""
    with _lock:
        root = logging.getLogger()
        for h in _installed:
            root.removeHandler(h)
        _installed.clear()
        verbose = verbosity > 0
        if json_lines:
            handler: logging.Handler = StderrHandler()
            handler.setFormatter(JsonFormatter())
        elif _terminal():
            handler = _rich_handler(verbose, timestamps)
        else:
            handler = StderrHandler()
            handler.setFormatter(PlainFormatter(verbose=verbose))
        root.addHandler(handler)
        _installed.append(handler)
        root.setLevel(logging.INFO if verbose else logging.WARNING)
        _state.update(verbosity=verbosity, json=json_lines, timestamps=timestamps, configured=True)
        logging.getLogger(ROOT).setLevel(_level())
        logging.raiseExceptions = False  # a broken stderr (journal gone, pipe closed) must not stop the agent


def _level() -> int:
    if _state["quiet"] or _state["verbosity"] < 0:
        return logging.WARNING
    return logging.DEBUG if _state["verbosity"] > 0 else logging.INFO


def set_quiet(quiet: bool) -> None:
    """Only warnings and errors from now on (a verb printing --json keeps stderr for problems)."""
    _state["quiet"] = quiet
    if _state["configured"]:
        logging.getLogger(ROOT).setLevel(_level())


def quiet() -> bool:
    """No info lines wanted: --quiet, or a verb's --json."""
    return bool(_state["quiet"]) or _state["verbosity"] < 0


def json_mode() -> bool:
    """--log-json: stderr carries JSON lines only, so presentation (tables, bars) stays off it."""
    return bool(_state["json"])


def show_timestamps() -> None:
    """Keep the current settings and add a time to each human line (the agent's verb does this)."""
    if _state["configured"]:
        configure(_state["verbosity"], _state["json"], timestamps=True)
