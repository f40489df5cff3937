"""Saving and loading a model directory (`config.json`, `model.safetensors`, `tokenizer.json`;
never pickle), `load_model` for a directory or a preset name, and the model fingerprint."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from memory3.model.config import PRESETS, Memory3Config
from memory3.model.tokenizer import Memory3Tokenizer
from memory3.model.transformer import Memory3Model

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"


def save_pretrained(model: Memory3Model, directory: str | Path, tokenizer: Memory3Tokenizer | None = None) -> Path:
    """Write the three files (the byte-level tokenizer when none is given)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or Memory3Tokenizer.byte_level()
    _check_tokenizer(model.config, tokenizer, "tokenizer")
    model.config.to_json(directory / CONFIG_FILE)
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "fingerprint": fingerprint(model)})
    tokenizer.save(directory / TOKENIZER_FILE)
    return directory


def from_pretrained(directory: str | Path, *, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> Memory3Model:
    """Load a saved model; a checkpoint that does not match its config is refused, naming the tensor."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"model directory {directory} does not exist")
    config = Memory3Config.from_json(directory / CONFIG_FILE)
    with torch.device("meta"):
        model = Memory3Model(config)
    expected = model.state_dict()
    path = directory / WEIGHTS_FILE
    state = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            for name, want in expected.items():
                if name not in names:
                    raise ValueError(f"{path} lacks tensor {name!r} {tuple(want.shape)} that {CONFIG_FILE} needs")
                got = f.get_slice(name).get_shape()
                if tuple(got) != tuple(want.shape):
                    raise ValueError(f"{path}: tensor {name!r} has shape {tuple(got)} but {CONFIG_FILE} makes it "
                                     f"{tuple(want.shape)}")
                state[name] = f.get_tensor(name)
                if not state[name].is_floating_point():
                    raise ValueError(f"{path}: tensor {name!r} must be floating point, got {state[name].dtype}")
            extra = sorted(names - set(expected))
            if extra:
                raise ValueError(f"{path} has tensor {extra[0]!r} that {CONFIG_FILE} does not make "
                                 f"({len(extra)} unexpected in all)")
    except FileNotFoundError:
        raise ValueError(f"model directory {directory} has no {WEIGHTS_FILE}") from None
    except (OSError, SafetensorError) as e:  # a corrupt or truncated file
        raise ValueError(f"cannot read {path}: {e}") from None
    dtype = dtype or state["output.weight"].dtype
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    model.to(dtype)
    if (directory / TOKENIZER_FILE).exists():
        _check_tokenizer(config, Memory3Tokenizer.from_pretrained(directory), str(directory / TOKENIZER_FILE))
    return model.eval()


def load_model(name_or_dir: str | Path, *, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu") -> tuple[Memory3Model, Memory3Tokenizer, bool]:
    """(model, tokenizer, trained) from a saved directory, or an untrained preset (random
    weights, seed 0, the byte-level tokenizer) when name_or_dir is a preset name."""
    path = Path(name_or_dir)
    if path.is_dir():
        model = from_pretrained(path, dtype=dtype, device=device)
        tok_file = path / TOKENIZER_FILE
        tokenizer = Memory3Tokenizer.from_file(tok_file) if tok_file.exists() else Memory3Tokenizer.byte_level()
        return model, tokenizer, True
    if str(name_or_dir) in PRESETS:
        torch.manual_seed(0)
        model = Memory3Model(Memory3Config.preset(str(name_or_dir))).to(device=device, dtype=dtype or torch.float32)
        return model.eval(), Memory3Tokenizer.byte_level(), False
    raise ValueError(f"--model {name_or_dir!r} is neither a model directory nor a preset ({', '.join(PRESETS)})")


# The config fields a memory depends on. How memories are read (chunk_size,
# memories_per_chunk, memory_positions) and the layers after the memory layers do not
# change them, so a bank stays valid across those.
MEMORY_FIELDS = ("vocab_size", "dim", "n_heads", "n_kv_heads", "head_dim", "mlp_dim", "rope_base", "norm_eps",
                 "memory_layers", "memory_tokens", "ref_len", "reference_prefix", "prefix_ids")


def fingerprint(model: Memory3Model) -> str:
    """sha256 (hex) of the config fields and the weights a memory depends on: the embedding
    and the memory layers. Weights are hashed rounded to bfloat16, so a model and its bf16
    cast share a fingerprint (and banks); any training step changes it."""
    fields = {name: value for name, value in model.config.to_dict().items() if name in MEMORY_FIELDS}
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    prefixes = ("tok_embeddings.",) + tuple(f"layers.{i}." for i in model.config.memory_layers)
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(prefixes):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def _check_tokenizer(config: Memory3Config, tokenizer: Memory3Tokenizer, where: str) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{where} has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}")
    prefix = tokenizer.encode(config.reference_prefix)
    if config.memory_layers and tuple(prefix) != config.prefix_ids:
        raise ValueError(f"{where} encodes the reference prefix {config.reference_prefix!r} as {prefix}, "
                         f"but the config's prefix_ids are {list(config.prefix_ids)}")
