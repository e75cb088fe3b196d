"""Training checkpoints without pickle: the model through save_pretrained (safetensors + config.json),
optimizer tensors and RNG states in safetensors, every scalar (optimizer hyper-parameters, scheduler,
step, run arguments) in JSON. Loading reads tensors with safetensors and JSON only."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.safetensors"


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON-able rest) of optimizer.state_dict(): tensor "state.<param>.<name>"; scalars kept in JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in rest["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = rest["param_groups"]
    for group in groups:  # JSON turned tuples into lists
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.torch_cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if "rng.torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.torch_cuda"])


def save_checkpoint(directory: str, model, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Write model + optimizer + scheduler + RNG + `state` (JSON-able) to `directory`. The trainer
    state file is written last (through a temporary name), so a directory holding it is complete."""
    os.makedirs(directory, exist_ok=True)
    marker = os.path.join(directory, TRAINER_STATE)
    if os.path.exists(marker):
        os.remove(marker)  # an interrupted overwrite must not look complete
    model.save_pretrained(directory)
    tensors, optim_rest = optimizer_to_flat(optimizer)
    save_file({**tensors, **rng_tensors()}, os.path.join(directory, OPTIMIZER_STATE))
    payload = {**state, "optimizer": optim_rest, "scheduler": scheduler.state_dict()}
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, marker)


def load_checkpoint(directory: str, optimizer, scheduler) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from `directory` (the model is loaded by the caller with
    from_pretrained); returns the saved `state`."""
    marker = os.path.join(directory, TRAINER_STATE)
    if not os.path.isfile(marker):
        raise FileNotFoundError(f"{directory}: no complete checkpoint ({TRAINER_STATE} missing)")
    with open(marker) as f:
        payload = json.load(f)
    tensors = load_file(os.path.join(directory, OPTIMIZER_STATE))
    optimizer_from_flat(optimizer, {k: v for k, v in tensors.items() if k.startswith("state.")}, payload.pop("optimizer"))
    scheduler.load_state_dict(payload.pop("scheduler"))
    restore_rng(tensors)
    return payload
