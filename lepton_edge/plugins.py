"""Plug-in registries: the runtime backends and model loaders this *installation* can use.

Why entry points (`importlib.metadata`, after pytest and Frigate): a third-party package adds a
backend by declaring, in its own pyproject.toml,

    [project.entry-points."lepton_edge.backends"]
    openvino = "lepton_openvino:OpenVinoBackend"

and nothing in this package changes. The built-ins are entries of the same kind, listed in code
(`builtins`) rather than in our pyproject.toml, so a source checkout or a stale editable install
still finds them; they are loaded first, so a plug-in cannot take a built-in's name.

Why lazy: an entry is a "module:attr" string until the registry is first asked, and the built-in
modules import their engine (onnxruntime, LiteRT) only when a model is opened; so importing a
registry imports no engine, and a device with one runtime installed never touches the other.

Why a broken plug-in is one warning: a half-removed third-party package must not take the
built-ins (or the CLI) down with it. Registration itself is by subclassing (`__init_subclass__`
of the base class calls `Registry.add`), so importing an entry point's module is what registers it.
"""
from __future__ import annotations

import logging
import threading
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def _origin(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__name__)}"


def _one_line(e: BaseException) -> str:
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


class Registry(Generic[T]):
    """Name -> plug-in, filled by `add` (called when a plug-in class is defined) and, on first
    use, by importing the built-in entries and then the installed entry points of `group`. The key
    is the name the plug-in declares (a backend's `name`); an entry point's own name is a label."""

    def __init__(self, group: str, what: str, builtins: dict[str, str]):
        self.group, self.what = group, what
        self.builtins = dict(builtins)  # name -> "module:attr"
        self._items: dict[str, T] = {}
        self._refused: list = []  # lost a name to an earlier plug-in (warned once, in add)
        self._discovered = False
        self._lock = threading.RLock()  # the agent may load a model from two threads at once

    def add(self, name: str, obj: T) -> None:
        """Register `obj` as `name`; the first of two different plug-ins with one name keeps it."""
        with self._lock:
            cur = self._items.get(name)
            if cur is not None and cur is not obj and _origin(cur) != _origin(obj):
                log.warning("%s %r from %s ignored: %s already has that name", self.what, name, _origin(obj),
                            _origin(cur))
                self._refused.append(obj)
                return
            self._items[name] = obj

    def all(self) -> dict[str, T]:
        """Every plug-in that loaded, built-ins first, in registration order."""
        with self._lock:
            if not self._discovered:
                self._discovered = True
                for ep in self._entries():
                    self._load(ep)
            first = [n for n in self.builtins if n in self._items]  # built-ins first, whatever was imported first
            return {n: self._items[n] for n in first + [n for n in self._items if n not in self.builtins]}

    def _entries(self) -> list[EntryPoint]:
        eps = [EntryPoint(name, value, self.group) for name, value in self.builtins.items()]
        try:
            installed = list(entry_points(group=self.group))
        except Exception as e:  # a distribution with unreadable metadata: the built-ins still work
            log.warning("%s plug-ins: cannot read installed entry points (%s)", self.what, _one_line(e))
            installed = []
        known = {ep.value for ep in eps}
        return eps + [ep for ep in installed if ep.value not in known]

    def _load(self, ep: EntryPoint) -> None:
        try:
            obj = ep.load()  # importing the module registers what it defines
        except Exception as e:  # any error of third-party code at import: one line, not the CLI
            log.warning("%s plug-in %r (%s) not loaded: %s", self.what, ep.name, ep.value, _one_line(e))
            return
        if ep.attr and obj not in self._items.values() and obj not in self._refused:
            log.warning("%s plug-in %r (%s) not loaded: %s is not a registered %s", self.what, ep.name, ep.value,
                        _origin(obj), self.what)
