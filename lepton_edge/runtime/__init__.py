"""Device-side runtime: backends (onnxruntime, LiteRT), preprocessing, postprocessing.

Imports neither torch nor TensorFlow (a test checks): a Raspberry Pi has no room for them.
"""
from lepton_edge.runtime.runtime import Result, Runtime

__all__ = ["Result", "Runtime"]
