"""Exporters: one module per format (onnx.py, tflite.py), found through the registry in base.py.

Workstation side: these import torch and onnx lazily, and the device side never imports them.
"""
