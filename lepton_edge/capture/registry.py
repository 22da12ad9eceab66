"""Which source reads a spec: a registry filled by `@register_source`, plus entry points.

Why a registry: a new kind of source is one class in one module (built in) or in another package
(entry point group `lepton_edge.sources`, the entry point's name is the URL scheme it opens:
`mycam = mypkg.sources:MyCam` serves `mycam://...`), not a branch in an if-chain.

What a spec can and cannot do: it picks among sources the *installation* registered, by URL
scheme; it never names a module, a class or a library to load. Plug-ins can only claim a URL
scheme of their own: reading plain paths, camera indices and GStreamer pipelines (specs with no
scheme) is reserved to the built-in sources, so an installed plug-in cannot take over
`/data/clip.mp4` or `0`. An unknown scheme, or a plug-in that fails to load, is one BadInput line.
"""
from __future__ import annotations

import inspect
import re
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from lepton_edge.capture.base import Source, redacted
from lepton_edge.errors import BadInput

ENTRY_POINT_GROUP = "lepton_edge.sources"
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")
_SPEC_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31})://")
_SCHEMES: dict[str, type[Source]] = {}
_CLAIMERS: list[type[Source]] = []  # built-ins for specs without a scheme, by `claim_order`


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: `cls` opens the URL schemes in `cls.schemes` (and, built-ins only, the
    scheme-less specs its `claims()` accepts)."""
    if not (isinstance(cls, type) and issubclass(cls, Source)) or inspect.isabstract(cls):
        raise TypeError(f"{cls!r} is not a concrete lepton_edge.capture.Source")
    builtin = cls.__module__.startswith("lepton_edge.")
    for scheme in cls.schemes:
        if not _SCHEME.fullmatch(scheme):
            raise ValueError(f"{cls.__name__}: {scheme!r} is not a URL scheme (lower case, [a-z0-9+.-])")
        owner = _SCHEMES.get(scheme)
        if owner is not None and owner is not cls:
            raise ValueError(f"{cls.__name__}: scheme {scheme}:// is already {owner.__module__}.{owner.__name__}'s")
    if cls.claims.__func__ is not Source.claims.__func__:  # type: ignore[attr-defined]
        if not builtin:
            raise ValueError(f"{cls.__name__}: only built-in sources read specs without a URL scheme; "
                             "declare `schemes` instead of `claims()`")
        if cls not in _CLAIMERS:
            _CLAIMERS.append(cls)
            _CLAIMERS.sort(key=lambda c: c.claim_order)
    for scheme in cls.schemes:
        _SCHEMES[scheme] = cls
    return cls


def _plugin(scheme: str) -> type[Source] | None:
    """The installed entry point named `scheme`, loaded and registered; BadInput if it is broken."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name.lower() != scheme:
            continue
        try:
            cls = ep.load()
            if scheme not in getattr(cls, "schemes", ()):
                raise ValueError(f"its class does not declare schemes = ({scheme!r},)")
            register_source(cls)
        except Exception as e:  # whatever a third-party module does on import: one line
            why = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
            raise BadInput(f"source plug-in {ep.name} ({ep.value}) does not load: {why}") from None
        return cls
    return None


def known_schemes() -> list[str]:
    """Built-in schemes and those installed plug-ins declare (without importing them)."""
    names = set(_SCHEMES) | {"file"}
    try:
        names |= {ep.name.lower() for ep in entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # a broken distribution's metadata must not hide the built-ins
        pass
    return sorted(names)


def resolve(spec: str) -> tuple[type[Source], str]:
    """(source class, the spec it is given) for a spec string."""
    m = _SPEC_SCHEME.match(spec)
    if m is None:
        try:
            for cls in _CLAIMERS:
                if cls.claims(spec):
                    return cls, spec
        except OSError as e:  # a name past the file system's limit (ENAMETOOLONG) and the like
            raise BadInput(f"source {redacted(spec)[:200]!r}: {e.strerror or e}") from None
        raise BadInput(f"no source reads {redacted(spec)!r}")
    scheme = m.group(1).lower()
    if scheme == "file":  # a path, once: 1,200 nested file:// prefixes recursed past Python's limit
        path = spec[len(m.group(0)):]
        if _SPEC_SCHEME.match(path):
            raise BadInput(f"source {redacted(spec)[:200]!r}: a file:// URL holds a path, not another URL")
        return resolve(path)
    found = _SCHEMES.get(scheme) or _plugin(scheme)
    if found is None:
        raise BadInput(f"unknown source scheme {scheme}:// in {redacted(spec)!r}; known: "
                       + ", ".join(f"{s}://" for s in known_schemes()))
    return found, spec


def _declared_options() -> set[str]:
    return {name for cls in {*_SCHEMES.values(), *_CLAIMERS} for name in cls.Options.model_fields}


def open_source(spec: str | int, policy: str | None = None, **settings: Any) -> Source:
    """Open the source a spec names: '0' (camera index), 'rtsp://...' or 'http://...' (stream), a
    GStreamer pipeline ('... ! appsink'), a directory, a glob or an image (images), a video file,
    or a scheme an installed plug-in registered.

    `settings`: options for whichever source the spec picks; each source takes the ones its
    `Options` model declares (`max_backoff`, `max_reconnects`, `stall_s` for live sources, `loop`
    for video files, `decode_threads` for files and streams, a plug-in's own...) and ignores those
    meant for other kinds of source. `policy`: "newest-frame" or "every-frame" (None: the
    source's default). An option no source declares, or a bad value, is one BadInput line.

    `decode_threads`: FFmpeg's decoding threads (None: OpenCV's default, one per core). The
    pipeline passes the cores the model leaves free: FFmpeg's own threads would otherwise preempt
    the model's, and MobileNetV2 on two cores runs ~3 % faster end to end with a one-thread decoder
    (bench/runtime_bench.py)."""
    s = str(spec).strip()
    if not s:  # (an unset $CAM in a script read the working directory, recursively, as images)
        raise BadInput("the source is empty: give a camera index, a video or image path, a folder, a glob or a URL")
    cls, target = resolve(s)
    unknown = set(settings) - _declared_options() - set(cls.Options.model_fields)
    if unknown:
        raise BadInput(f"source {redacted(s)!r}: unknown option(s) {', '.join(sorted(unknown))}")
    given = {k: v for k, v in settings.items() if k in cls.Options.model_fields} | {"policy": policy}
    try:
        options = cls.Options.model_validate(given)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "options"
        raise BadInput(f"source {redacted(s)!r}: {where}: {err['msg']}") from None
    try:
        return cls.from_spec(target, options)
    except OSError as e:  # the file system's own refusals (too long a name, too deep a folder, permissions)
        raise BadInput(f"source {redacted(s)[:200]!r}: {e.strerror or e}") from None
