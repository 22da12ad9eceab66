"""One calibration pass for both MinMax and Percentile ranges of an export's onnxruntime candidates.

Why: an export's recipe search usually tries u8-minmax and then u8-percentile (s8-minmax and
s8-percentile for ARM) on the same model and data, and each ran its own pass of onnxruntime's
calibration over every input: MinMax (ReduceMin/ReduceMax of each calibrated tensor) and then the
histogram pass (`histogram.sampled_augment_graph`: a strided sample of each tensor followed by its
exact minimum and maximum). The histogram pass already computes what MinMax keeps, with the same
ReduceMin/ReduceMax on the same tensors of the same inputs, so the first of the two candidates now
runs the histogram pass alone and writes both range files into onnxruntime's calibration cache
(`quantize_static(calibration_cache_path=)`); the second reads its file and calibrates nothing.

The ranges do not depend on the candidate: onnxruntime calibrates every tensor of the quantized op
types whatever the activation type or the layers left in float, and neither calibrator here is told
to make its ranges symmetric (`ActivationSymmetric` acts later, in the quantizer). The MinMax file is
byte for byte what MinMaxCalibrater writes (tests/unit/test_minmax_ranges.py); the Percentile one is what
the Percentile candidate computed on its own before.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

PERCENTILE = 99.99  # the percentile recipes' CalibPercentile (onnxruntime's default is 99.999)


def range_files(prefix: Path) -> dict[str, Path]:
    """The cache file of each calibration method for `prefix` (work folder / model stem): one export's
    own files, never shared between models or data sets; "failed": a marker that a shared pass failed
    (each candidate then calibrates alone)."""
    return {"minmax": prefix.with_name(f"{prefix.name}.minmax-ranges.json"),
            "percentile": prefix.with_name(f"{prefix.name}.percentile-{PERCENTILE:g}-ranges.json"),
            "failed": prefix.with_name(f"{prefix.name}.one-pass-failed")}


def minmax_from_histograms(histogram_dict: dict, names: dict[str, str]):
    """MinMax ranges (onnxruntime's TensorsData) from the histogram collector's exact minima and maxima:
    the same (1,)-shaped arrays MinMaxCalibrater keeps, in the tensor's own type (a float16 tensor's
    scale must be float16 too, or its QuantizeLinear is invalid). `names`: sampled output -> tensor."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    ranges = {}
    for key, (_hist, _edges, lo, hi) in histogram_dict.items():
        ranges[names.get(key, key)] = (np.asarray(lo).reshape(1), np.asarray(hi).reshape(1))
    return TensorsData(CalibrationMethod.MinMax, ranges)


def _without_histograms(data):
    """Percentile ranges as the quantizer reads them (lowest, highest): the histograms the collector
    attaches to each tensor would make the cache file megabytes of JSON that nothing reads again."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    return TensorsData(data.calibration_method,
                       {k: TensorData(lowest=v.lowest, highest=v.highest) for k, v in data.items()})


@contextmanager
def one_pass(files: dict[str, Path], wanted: str) -> Iterator[None]:
    """For the block, onnxruntime's quantize_static calibrates with the (sampled, linear-time) Percentile
    calibrator whatever method it was asked for, saves the other method's ranges to its file in
    `files`, and goes on with `wanted`'s ranges (which quantize_static saves to its own file). Use it
    with histogram.sampled_histograms() and linear_time_histograms() active, as for a Percentile pass."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, save_tensors_data

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")  # (the package's `quantize`
    # attribute is the function of that name, not this module)

    original = ort_quantize.create_calibrator

    def create_calibrator(model, op_types_to_calibrate=None, augmented_model_path="augmented_model.onnx",
                          calibrate_method=CalibrationMethod.MinMax, use_external_data_format=False,
                          providers=None, extra_options=None):
        calibrator = original(model, op_types_to_calibrate, augmented_model_path, CalibrationMethod.Percentile,
                              use_external_data_format, providers, {"percentile": PERCENTILE})
        compute = calibrator.compute_data

        def compute_data():
            percentile = _without_histograms(compute())
            minmax = minmax_from_histograms(calibrator.collector.histogram_dict,
                                            getattr(calibrator, "lepton_sampled", {}))
            for name, data in (("minmax", minmax), ("percentile", percentile)):
                if name != wanted:
                    save_tensors_data(data, files[name])
            return minmax if wanted == "minmax" else percentile

        calibrator.compute_data = compute_data
        return calibrator

    ort_quantize.create_calibrator = create_calibrator
    try:
        yield
    finally:
        ort_quantize.create_calibrator = original
