"""Exporters: one module per format (onnx.py, tflite.py), found through the registry in exporter.py
(entry point group `lepton_edge.exporters`); base.py runs an export's steps over options.py's
`ExportOptions` and context.py's `ExportContext`.

Workstation side: these import torch and onnx lazily, and the device side never imports them.
"""
