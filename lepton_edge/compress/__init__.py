"""Workstation-side compression: pruning (torch-pruning), calibration data, quantization (onnxruntime)."""
