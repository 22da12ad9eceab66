"""The exporter interface and its registry: one class per output format.

Why a registry filled by subclassing (after Frigate's detector plug-ins and Optimum's exporters):
a new format is one class that subclasses `Exporter` and sets `format`; defining it registers it.
The built-ins are entries of `REGISTRY` of the same kind as a third-party package's
`lepton_edge.exporters` entry points (lepton_edge/plugins.py), imported on first use, so nothing
here imports a format module by name and a package adds a format by declaring, in its pyproject.toml,

    [project.entry-points."lepton_edge.exporters"]
    coreml = "lepton_coreml:CoreMLExporter"

Why an explicit context: every step of an export gets the `ExportContext` (options, model source,
profile, work directory, data, progress, report) as its first argument, instead of one method
leaving state on the instance for another to find. An exporter instance holds nothing; the same
one can serve two exports.
"""
from __future__ import annotations

import abc
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from lepton_edge.errors import BadInput, CheckFailed, LeptonError, first_line
from lepton_edge.plugins import Registry

if TYPE_CHECKING:
    from lepton_edge.compress.quantize import QuantResult, Recipe
    from lepton_edge.exporters.context import ExportContext

ENTRY_POINT_GROUP = "lepton_edge.exporters"
REGISTRY: Registry[type[Exporter]] = Registry(ENTRY_POINT_GROUP, "exporter", {
    "onnx": "lepton_edge.exporters.onnx:OnnxExporter",
    "tflite": "lepton_edge.exporters.tflite:TfliteExporter",
})


# one engine run's time limit during an export (a validation batch of up to 64 inputs): past it the run is
# stopped with one line (lepton_edge/runtime/onnx.py), as an endless Loop otherwise ran forever
EXPORT_RUN_S = 600.0


def _export_run_bytes() -> int | None:
    """One engine run's memory budget during an export: what the machine has available now (None: the
    runtime's default). Not the device's default (max(2 GiB, 12x the model)): a legitimate model with large
    activations is the export's to refuse softly (--max-memory, compress/calibration.MemoryWatch), and a run
    past what the machine has ends the export with one line before the kernel's OOM killer would take it."""
    from lepton_edge.memory import available_bytes

    avail = available_bytes()
    return None if avail is None else max(256 << 20, avail)


class Exporter(abc.ABC):
    """One output format. A concrete subclass sets `format` (its registry key and the bundle's
    `format`), `suffix`, `precisions`, and implements the steps below; each gets the export's
    context first."""

    format: ClassVar[str]
    suffix: ClassVar[str] = ""
    precisions: ClassVar[tuple[str, ...]] = ()
    sources: ClassVar[tuple[str, ...]] = ("torch", "onnx")  # model kinds this format converts from
    recipe_examples: ClassVar[tuple[str, ...]] = ()  # int8 recipes to use when none of the profile's fit

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # a subclass that does not set its own format (a test's fault injection) is no new format
        if "format" in cls.__dict__:
            REGISTRY.add(cls.format, cls)

    def supports_recipe(self, name: str) -> bool:
        """Whether this format can carry out the int8 recipe `name` (see targets.QuantizationSettings)."""
        return True

    @abc.abstractmethod
    def to_fp32(self, ctx: ExportContext, path: Path) -> Path:
        """The reference-equivalent float artifact of `ctx.source`, written to `path`."""

    @abc.abstractmethod
    def convert(self, ctx: ExportContext, fp32_path: Path, out_path: Path, precision: str) -> Path:
        """fp32/fp16 artifact from the fp32 one."""

    @abc.abstractmethod
    def prepare_int8(self, ctx: ExportContext, fp32_path: Path) -> Path:
        """The graph every int8 recipe starts from (written under `ctx.workdir`)."""

    @abc.abstractmethod
    def quantize_int8(self, ctx: ExportContext, prepared: Path, out_path: Path, recipe: Recipe,
                      exclude: list[str] | None = None, check: Callable[[], None] | None = None,
                      limit: int | None = None) -> QuantResult:
        """One int8 candidate calibrated on `ctx.data.calib_x`; `exclude` names layers kept in float;
        `check` (the memory watch) is to be called now and then during calibration; `limit`: the memory
        budget (bytes of RSS) that work known to need more is refused against before it starts."""

    @abc.abstractmethod
    def describe(self, path: Path) -> dict:
        """{'opset', 'inputs': [{name, shape}], 'outputs': [...]} of the artifact."""

    def int8_method(self, recipe: Recipe) -> str:
        """What quantized the model, in words, for the manifest."""
        return recipe.method()

    def predictor(self, path: Path, threads: int, **settings) -> Callable[[np.ndarray], list[np.ndarray]]:
        """A function running the artifact on a batch of float inputs and returning every
        output (a list, in the graph's order) as float, through the device runtime's own backend
        (lepton_edge.runtime): what is validated here is what the device will run, engine settings
        included. An integer input (`--int8-io`) is quantized with the model's own scale and zero point.

        `settings`: engine settings a backend's Options declare (qdq_fusion: exporters/kernels.py).
        Why no context: it depends on the artifact alone, and the validator calls it per candidate."""
        from lepton_edge.runtime.backend import backend_for
        from lepton_edge.runtime.preprocess import quantize

        try:
            be = backend_for(self.format).open(path, threads=max(1, min(threads, os.cpu_count() or 1)),
                                               **{"max_run_s": EXPORT_RUN_S, "max_run_bytes": _export_run_bytes(),
                                                  **settings})
        except BadInput as e:
            raise CheckFailed(f"the {self.format} runtime cannot load the exported model: {e}") from None
        info = be.inputs[0]
        q = info.quantization if info.dtype in ("int8", "uint8", "int16") else None
        first = info.shape[0] if info.shape else None
        fixed = first if isinstance(first, int) else (None if self.format == "onnx" else 1)

        def once(x: np.ndarray) -> list[np.ndarray]:
            try:
                out = be.run(np.ascontiguousarray(x))
            except LeptonError:
                raise
            except Exception as e:  # the engine's own error types: a model it loads but cannot run on these inputs
                raise BadInput(f"the {self.format} runtime cannot run the model on a batch of {x.shape} "
                               f"{x.dtype} ({first_line(e, 240)})") from None
            try:
                return [np.asarray(o, dtype=np.float32) for o in out]
            except (TypeError, ValueError):  # a map or a sequence (ZipMap's probabilities): not a tensor to judge
                kinds = ", ".join(sorted({type(o).__name__ for o in out if not isinstance(o, np.ndarray)}))
                raise BadInput(f"the model has an output that is not a tensor ({kinds}; e.g. a ZipMap of class "
                               "probabilities): export it without that step, so every output is a tensor") from None

        per_call = [fixed]

        def run(x: np.ndarray) -> list[np.ndarray]:
            from lepton_edge.exporters.validation import batch_first, stack_outputs

            if q is not None:
                x = quantize(x, q, info.dtype)
            if per_call[0] is None or per_call[0] == len(x):
                try:
                    return once(x)
                except BadInput:
                    if per_call[0] is not None or len(x) == 1:
                        raise
                    # a dynamic batch dim whose graph runs at batch 1 only (a Reshape to [1, -1] written in):
                    # the device feeds one frame a call, so do the same here
                    if self.format != "onnx" or not _runs_one_at_a_time(once, x):
                        raise
                    per_call[0] = 1
            step = per_call[0]
            calls = [x[i:i + step] for i in range(0, len(x), step)]  # (each call's outputs inputs first, then joined)
            return stack_outputs([batch_first(once(c), len(c)) for c in calls], [len(c) for c in calls])

        run.outputs = list(be.outputs)  # type: ignore[attr-defined]  # (the engine's view: writer.observed_shape)
        return run


def _runs_one_at_a_time(once, x: np.ndarray) -> bool:
    """Whether the model runs on the first input alone (after refusing the whole batch)."""
    try:
        once(x[:1])
    except BadInput:
        return False
    return True


def register(cls: type[Exporter]) -> type[Exporter]:
    """Register `cls` under its format (subclassing already does; kept for explicit use)."""
    REGISTRY.add(cls.format, cls)
    return cls


def formats() -> list[str]:
    """Every format this installation can export to, built-ins first."""
    return list(REGISTRY.all())


def get_exporter(fmt: str) -> Exporter:
    """A new exporter for `fmt`, or one BadInput line naming the formats there are."""
    cls = REGISTRY.all().get(fmt) if isinstance(fmt, str) else None
    if cls is None:
        raise BadInput(f"format '{fmt}' is not available (have: {', '.join(formats())})")
    return cls()
