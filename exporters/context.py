"""`ExportContext`: what every step of one export reads and writes, passed explicitly.

Why: an export is a chain of steps (load, compress, convert, quantize, validate, measure, write)
run by the orchestrator (exporters/base.py) and by the format's exporter. Each step takes the
context and finds there the options, the profile, the model source, the data and the work
directory; what a step learns for the manifest goes into `report`, typed. Nothing is left on an
exporter instance for a later method to find.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lepton_edge.exporters.options import ExportOptions
from lepton_edge.manifest_sections import (
    CompressionSection,
    LatencySection,
    PostprocessSection,
    ValidationSection,
)


class Progress:
    """How an export tells the user what it is doing: a stage line per step, a bar for loops, a
    note. This one prints through lepton_edge.ui (a caller may pass a quieter one)."""

    def stage(self, name: str) -> AbstractContextManager:
        from lepton_edge import ui

        return ui.stage(name)

    def bar(self, description: str, total: int) -> AbstractContextManager[Callable[[int], None]]:
        from lepton_edge import ui

        return ui.progress(description, total)

    def info(self, message: str) -> None:
        from lepton_edge import ui

        ui.info(message)


@dataclass
class ExportReport:
    """The manifest sections, filled in as the steps run (lepton_edge/manifest_sections.py)."""

    compression: CompressionSection = field(default_factory=CompressionSection)
    validation: ValidationSection | None = None
    latency: LatencySection | None = None
    postprocess: PostprocessSection | None = None  # a detector's head (exporters/base.py _validator)
    started: float = field(default_factory=time.perf_counter)


@dataclass
class ExportContext:
    """One export's state. `source` and `data` are set by the load and data steps; an exporter
    method is called only after them."""

    options: ExportOptions
    profile: Any  # targets.Profile
    workdir: Path
    progress: Progress = field(default_factory=Progress)
    source: Any = None  # model_source.ModelSource
    data: Any = None  # exporters.datasets.ExportData
    report: ExportReport = field(default_factory=ExportReport)
    # the onnxruntime calibration methods the int8 search plans (recipes.search): a candidate calibrates
    # once for MinMax and Percentile only when both are planned (compress/shared_ranges.py)
    planned_calibrations: frozenset[str] = frozenset()

    @property
    def per_channel(self) -> bool:
        """int8 weights per output channel (the profile's quantization settings)."""
        return bool(self.profile.quantization.per_channel)

    @property
    def enforce(self) -> bool:
        """Whether the validation gate decides: not for random weights (no --weights), whose
        int8 is ranked by the same metrics but cannot be expected to pass them."""
        return self.source is None or bool(self.source.trained)

    @property
    def threads(self) -> int:
        return int(self.profile.threads)
