"""Checkpoints with exact resume: safetensors for tensors, JSON for everything else.

A checkpoint folder ``step_000123/`` holds::

    model.safetensors       the model's state dict (full, unsharded)
    optimizer.safetensors   AdamW state as tensors "state.<param index>.<name>" (torch's
                            numbering: position over the param groups); plus "rng.torch"
    state.json              step, model config, train config, optimizer param groups, loss
                            history (for the loss-curve PNG)

Nothing is pickled, so a checkpoint from an untrusted source can be loaded safely. The same
files serve one process, DDP and FSDP runs. The data order needs no saved state: every
batch is a pure function of (seed, step, micro, rank).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


def flatten_optimizer_state(optim_state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """A torch optimizer state dict (int-keyed) -> (tensors, param groups)."""
    tensors: dict[str, torch.Tensor] = {}
    for index, state in optim_state["state"].items():
        for name, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{int(index)}.{name}"] = t.detach().cpu().contiguous()
    return tensors, [dict(g) for g in optim_state["param_groups"]]


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("rng."):
            continue
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise ValueError(f"unexpected tensor {key!r} in optimizer.safetensors")
        state.setdefault(int(parts[1]), {})[parts[2]] = value
    return {"state": state, "param_groups": groups}


def save_checkpoint(folder: str | Path, *, model_state: dict[str, torch.Tensor], optim_state: dict,
                    state: dict) -> Path:
    """Write a checkpoint atomically (into a temp folder, then rename)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
    tensors, groups = flatten_optimizer_state(optim_state)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "optimizer_groups": groups}, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def read_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model state, optimizer state dict, state.json) of a checkpoint, on the CPU; restores
    the torch RNG."""
    folder = Path(folder)
    missing = [f for f in STATE_FILES if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a checkpoint: missing {', '.join(missing)}")
    try:
        state = json.loads((folder / "state.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'state.json'} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("optimizer_groups"), list):
        raise ValueError(f"{folder / 'state.json'} lacks the optimizer's param groups")
    tensors = load_file(folder / "optimizer.safetensors")
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return load_file(folder / "model.safetensors"), unflatten_optimizer_state(tensors, state["optimizer_groups"]), state


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest ``step_*`` checkpoint folder of a run, or None."""
    steps = sorted(p for p in Path(run_dir).glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return steps[-1] if steps else None
