"""Typed sections of the manifest that an export writes: compression (calibration, pruning,
quantization), validation and latency.

Why typed: the exporter used to assemble these as string-keyed dicts in three places, so a
misspelt key or a numpy scalar went unnoticed until a reader failed. Each section is a model
with the fields every export writes; `extra="allow"` keeps what a task or a newer version adds
(the metrics of a task, flat at the top of `validation`). They are dumped into the manifest as
plain JSON objects, so manifests on disk keep their shape and older bundles still load.
Pydantic only: the device side may import this module.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="allow")

    def record(self) -> dict[str, Any]:
        """The section as the manifest stores it: what was set, nothing filled in by default."""
        return self.model_dump(exclude_unset=True)


class CalibrationSection(Section):
    """Which data calibrated int8 (exporters/datasets.py)."""

    source: str | None = None
    kind: str | None = None  # images, npy, video, zoo, synthetic
    samples: int | None = None


class PruningSection(Section):
    """What structured pruning removed (compress/prune.py), and what fine-tuning did after."""

    method: str
    ratio: float
    params_before: int
    params_after: int
    macs_before: int | float | None = None
    macs_after: int | float | None = None
    finetune_epochs: int | None = None
    finetune_samples: int | None = None
    accuracy_before: float | None = None  # the unpruned model's, on the labelled evaluation set
    accuracy_after: float | None = None  # the pruned (and fine-tuned) PyTorch model's, on the same set


class QuantizationSection(Section):
    """The int8 search: the recipe kept, the tool that made it, and every candidate tried."""

    method: str  # in words: the quantizer and its settings (PT2E, LiteRT quantizer, onnxruntime, NNCF)
    recipe: str
    float_nodes: list[str] = Field(default_factory=list)
    attempts: list[dict[str, Any]] = Field(default_factory=list)
    search_seconds: float
    peak_rss_bytes: int | None = None
    max_memory_bytes: int | None = None
    speed_vs_fp32: float | None = None
    qdq_fusion: bool | None = None  # False: the device runs it with onnxruntime's QDQ fusion off (exporters/kernels.py)


class ConstantInputSection(Section):
    """A non-image input of a multi-input model and the constant baked into the graph as its
    default (the device feeds the frame alone): what the model computes with depends on it."""

    name: str
    shape: list[int | str]
    dtype: str
    value: list[float] | None = None  # flat, row-major
    rule: str = ""  # "set by --input-value", or the rule that chose it (exporters/datasets.constant_value)


class Fp16Section(Section):
    """What fp16 conversion kept in fp32 (compress/fp16.py): the nodes whose weights or measured
    activations leave fp16's range, named as in the fp32 graph, each with the tensor and value why."""

    method: str
    float_nodes: list[str] = Field(default_factory=list)
    float_node_count: int = 0
    reasons: dict[str, str] = Field(default_factory=dict)
    ranges_from: str = ""
    range_samples: int = 0
    activation_limit: float | None = None
    fp16_weight_fraction: float | None = None


class CompressionSection(Section):
    calibration: CalibrationSection | None = None
    pruning: PruningSection | None = None
    params: int | None = None
    quantization: QuantizationSection | None = None
    fp32_bytes: int | None = None
    bytes: int | None = None
    size_vs_fp32: float | None = None
    fp16: Fp16Section | None = None
    constant_inputs: list[ConstantInputSection] | None = None


class ConversionSection(Section):
    """The fp32 graph checked against the PyTorch model it came from."""

    samples: int
    max_abs_diff: float
    top1_agreement: float


class BudgetsSection(Section):
    max_model_bytes: int
    model_bytes: int
    ram_budget_bytes: int
    ram_bytes_measured: int | None = None
    latency_budget_ms: float
    latency_checked_on_host: bool


class ValidationSection(Section):
    """The verdict (validation.Verdict.as_dict: metrics also flat at the top level) and what it was
    measured on."""

    passed: bool
    why: str | None = None
    task: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    thresholds: dict[str, Any] = Field(default_factory=dict)
    min_agreement: float | None = None
    max_accuracy_drop_pp: float | None = None
    task_inferred: bool = False
    inputs: dict[str, Any] = Field(default_factory=dict)
    eval_source: str | None = None
    agreement_inputs: str | None = None
    # how an int8 ONNX artifact was run to judge it, where not as the device will (exporters/base.exact_int8)
    arithmetic: str | None = None
    reference: str | None = None
    conversion: ConversionSection | None = None
    trained_weights: bool = True
    budgets: BudgetsSection | None = None


class LatencySection(Section):
    """Batch-1 latency on the exporting host, with the target's thread count."""

    host: str
    threads: int
    batch: int = 1
    p50_ms: float
    p90_ms: float
    min_ms: float | None = None  # the fastest run: what the budget is judged on (a shared host's median is its load)
    runs: int | None = None  # how many timed runs p50, p90 and min come from
    fp32_p50_ms: float
    vs_fp32: float


class PostprocessSection(Section):
    """How the device turns the outputs into results, as the export validated it. `head`: the detector
    head (runtime/detect_heads.py) the detect gate decoded fp32's and the artifact's boxes with, so the
    device decodes with the same one instead of recognising it again from each frame's outputs."""

    head: str | None = None
