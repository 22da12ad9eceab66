"""Loading a state_dict into a module with errors a user can act on."""
from __future__ import annotations

from pathlib import Path

from lepton_edge.errors import BadInput


def load_state_dict(model, src) -> None:
    import torch

    name = str(src)
    if isinstance(src, (str, Path)) and not Path(src).is_file():
        raise BadInput(f"weights file not found: {name}")
    try:
        with open(src, "rb") if isinstance(src, (str, Path)) else src.open("rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise BadInput(f"cannot read weights {name}: {str(e).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BadInput(f"{name}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel checkpoints
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"shape mismatch {', '.join(wrong[:3])} "
                         f"(file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"missing keys {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected keys {', '.join(unexpected[:3])}")
        raise BadInput(f"weights {name} do not match the architecture: {'; '.join(parts)}")
    model.load_state_dict(state)
