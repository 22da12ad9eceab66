"""lepton-edge: export small, fast, validated model bundles for edge devices, run them, watch them.

`lepton_edge.export(...)` needs the `[export]` extra (torch); importing this package does not.
"""
from __future__ import annotations

__version__ = "0.1.0"


def export(*args, **kwargs):
    """See lepton_edge.exporters.base.export (lazy: keeps `import lepton_edge` free of torch)."""
    from lepton_edge.exporters.base import export as _export

    return _export(*args, **kwargs)


def __getattr__(name: str):
    if name == "Bundle":
        from lepton_edge.bundle import Bundle

        return Bundle
    raise AttributeError(name)
