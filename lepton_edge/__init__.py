"""lepton-edge: export small, fast, validated model bundles for edge devices, run them, watch them.

`lepton_edge.export(...)` needs the `[export]` extra (torch); importing this package does not.
"""
from __future__ import annotations

import os as _os
import sys as _sys

__version__ = "0.1.0"

# OpenCV reads this once, when it is first imported, and refuses to decode an image past it: its own
# default (2^30 pixels, 3 GB as BGR) let a 124 KB PNG of 32000x32000 take 6 GB and a 675-byte JPEG in a
# camera stream 6.5 GB. 100 MP is a 300 MB frame, past any camera's; set the variable to change it.
MAX_IMAGE_PIXELS = 100_000_000
# (a program that imported cv2 before lepton_edge keeps OpenCV's own limit: capture/opencv.py says so, once)
CV2_LOADED_FIRST = "cv2" in _sys.modules and "OPENCV_IO_MAX_IMAGE_PIXELS" not in _os.environ
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))


def export(model, target=None, *, options=None, example_input=None, **settings):
    """Export `model` for `target`; the settings are the fields of `lepton_edge.ExportOptions`,
    as keyword arguments, as `options=ExportOptions(...)`, or both. See
    lepton_edge.exporters.base.export (imported lazily: keeps `import lepton_edge` free of torch)."""
    from lepton_edge.exporters.base import export as _export

    return _export(model, target, options=options, example_input=example_input, **settings)


def __getattr__(name: str):
    if name == "Bundle":
        from lepton_edge.bundle import Bundle

        return Bundle
    if name == "ExportOptions":
        from lepton_edge.exporters.options import ExportOptions

        return ExportOptions
    raise AttributeError(name)
