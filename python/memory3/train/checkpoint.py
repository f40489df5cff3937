"""Checkpoints with exact resume: safetensors for tensors, JSON for everything else.

A checkpoint folder ``step_000123/`` holds::

    model.safetensors       the model's state dict
    optimizer.safetensors   AdamW state as tensors "state.<param index>.<name>" (+ torch RNG)
    state.json              step, model config, train config, optimizer hyperparameters,
                            loss history (for the loss-curve PNG)

Nothing is pickled, so a checkpoint from an untrusted source can be loaded safely. The data
order needs no saved state: every batch is a pure function of (seed, step, micro, rank).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """(tensors, param_groups without params) of an optimizer's state dict."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{index}.{name}"] = t.detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           groups: list[dict]) -> None:
    current = optimizer.state_dict()
    if len(groups) != len(current["param_groups"]) or any(
            len(g["params"]) != len(c["params"]) for g, c in zip(groups, current["param_groups"])):
        raise ValueError("checkpoint optimizer state does not match this model's parameters")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            if key.startswith("rng."):
                continue
            raise ValueError(f"unexpected tensor {key!r} in optimizer.safetensors")
        state.setdefault(int(parts[1]), {})[parts[2]] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(folder: str | Path, *, model_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, state: dict) -> Path:
    """Write a checkpoint atomically (into a temp folder, then rename)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
    tensors, groups = optimizer_tensors(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "optimizer_groups": groups}, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_checkpoint(folder: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load weights (and optimizer state, torch RNG) into ``model`` / ``optimizer``; return
    the state.json dict."""
    folder = Path(folder)
    missing = [f for f in STATE_FILES if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a checkpoint: missing {', '.join(missing)}")
    try:
        state = json.loads((folder / "state.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'state.json'} is not valid JSON ({e})") from None
    device = next(model.parameters()).device
    weights = load_file(folder / "model.safetensors", device=str(device))
    model.load_state_dict(weights, strict=True)
    if optimizer is not None:
        tensors = load_file(folder / "optimizer.safetensors", device=str(device))
        load_optimizer_tensors(optimizer, tensors, state["optimizer_groups"])
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"].cpu())
    return state


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest ``step_*`` checkpoint folder of a run, or None."""
    steps = sorted(p for p in Path(run_dir).glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return steps[-1] if steps else None
