"""Structured pruning with torch-pruning: whole channels leave the network.

Why torch-pruning: `torch.nn.utils.prune` only masks weights, the file and the latency stay the
same. torch-pruning follows the dependency graph (residual adds, depthwise groups, BN) and cuts
coupled channels together, so parameter count, file size and FLOPs really fall.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PruneReport:
    ratio: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    def as_dict(self) -> dict:
        return {
            "method": "torch-pruning MetaPruner, group L2 magnitude",
            "ratio": self.ratio,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
        }


def prune(model, example_input, ratio: float, round_to: int | None = 8) -> PruneReport:
    """Remove `ratio` of the channels of every prunable layer, in place.

    The classifier's output layer is never pruned (its outputs are the classes), and channel
    counts are rounded to multiples of `round_to` because int8 kernels run fastest on those.
    """
    import torch
    import torch_pruning as tp

    from lepton_edge.errors import BadInput

    if not 0.0 < ratio < 1.0:
        raise BadInput(f"--prune must be between 0 and 1 (exclusive), got {ratio}")
    model.eval()
    macs0, params0 = tp.utils.count_ops_and_params(model, example_input)
    # Leave the layers that produce the model's outputs alone: their channels are the classes.
    with torch.no_grad():
        out = model(example_input)
    n_out = out.shape[-1] if hasattr(out, "shape") else None
    ignored = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
               and getattr(m, "out_features", getattr(m, "out_channels", None)) == n_out]
    ignored = ignored[-1:]  # only the last such layer
    pruner = tp.pruner.MetaPruner(
        model, example_input, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to,
    )
    pruner.step()
    macs1, params1 = tp.utils.count_ops_and_params(model, example_input)
    return PruneReport(ratio, int(params0), int(params1), int(macs0), int(macs1))


FINETUNE_SECONDS = 1800.0  # fine-tuning's time budget: half an hour of a CPU is far past a few epochs


def finetune(model, x, y, epochs: int, lr: float = 0.01, batch: int = 64, seed: int = 0,
             max_seconds: float = FINETUNE_SECONDS) -> None:
    """Recover the accuracy pruning cost with a few epochs of SGD on labelled data (in place).

    Stopped (CheckFailed, one line) when the epochs would take more than `max_seconds`: judged between
    batches from the time the batches so far took, so an impossible count stops within seconds, not at
    the budget's end. Why: finetune_epochs=10**9 on 64 samples ran until killed.
    """
    import time

    import numpy as np
    import torch

    from lepton_edge import ui

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, np.int64))
    steps = epochs * ((len(xt) + batch - 1) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    t0, done = time.perf_counter(), 0
    with ui.progress("fine-tuning", steps) as advance:
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(len(xt)))
            for i in range(0, len(order), batch):
                idx = order[i:i + batch]
                opt.zero_grad()
                loss = loss_fn(model(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
                sched.step()
                advance(1)
                done += 1
                _within_time(time.perf_counter() - t0, done, steps, epochs, max_seconds)
    model.eval()


def _within_time(elapsed: float, done: int, steps: int, epochs: int, max_seconds: float) -> None:
    """Raise CheckFailed when fine-tuning went past `max_seconds`, or, after a second of it, when the
    batches left would at this pace take it past twice that (the first batches run slower: a margin)."""
    from lepton_edge.errors import CheckFailed

    projected = elapsed / done * steps
    if elapsed > max_seconds or (elapsed > 1.0 and projected > 2 * max_seconds):
        raise CheckFailed(f"fine-tuning {epochs} epoch(s) ({steps} batches) would take about {projected:.0f} s at "
                          f"{elapsed / done * 1000:.0f} ms a batch, over its {max_seconds:g} s budget: give fewer "
                          "--finetune-epochs (or less --train data)")
