"""Memory3Config: presets, JSON round-trip, validation that names the field."""
from __future__ import annotations

import json

import pytest

from memory3.model import Memory3Config


@pytest.mark.parametrize("name", ["tiny", "small", "2.4b"])
def test_json_round_trip(name, tmp_path):
    config = Memory3Config.preset(name, memory_positions="ranked")
    assert Memory3Config.from_json(config.to_json()) == config
    config.to_json(tmp_path / "config.json")
    assert Memory3Config.from_json(tmp_path / "config.json") == config


def test_presets_sizes():
    tiny, small, paper = (Memory3Config.preset(n) for n in ("tiny", "small", "2.4b"))
    assert tiny.param_count() < 1_000_000
    assert 5e6 <= small.param_count() <= 20e6
    # PAPER.md §1: 44 x (2d^2 + 2*d*640 + 3*d*W) = 2.433B non-embedding (+ norm weights)
    assert paper.param_count(embeddings=False) == 44 * (2 * 3200**2 + 2 * 3200 * 640 + 3 * 3200**2 + 2 * 3200) + 3200
    assert round(paper.param_count(embeddings=False) / 1e9, 1) == 2.4
    assert paper.memory_layers == tuple(range(22))
    assert paper.memory_shape == (22, 2, 8, 8, 80)
    assert (paper.n_layers, paper.n_heads, paper.n_kv_heads, paper.head_dim, paper.vocab_size) == (44, 40, 8, 80, 60416)


def test_defaults_first_half_memory_layers_and_offsets():
    config = Memory3Config(n_layers=6)
    assert config.memory_layers == (0, 1, 2)
    assert config.context_offset == 128 and config.prefix_len == 1
    assert Memory3Config(memory_positions="ranked").context_offset == 5 * 128
    assert Memory3Config(memory_layers=()).context_offset == 0


def test_print_2_4b_preset():
    out = str(Memory3Config.preset("2.4b"))  # what `print(Memory3Config.preset('2.4b'))` shows
    assert "n_layers=44" in out and "2.433B non-embedding" in out and "(22, 2, 8, 8, 80)" in out


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("n_heads", 5, "multiple of n_kv_heads"),
        ("dim", 0, "positive int"),
        ("head_dim", 15, "even"),
        ("memory_layers", (0, 9), "distinct layer indices"),
        ("memory_layers", (1, 2), "first layers"),
        ("memory_positions", "diagonal", "parallel"),
        ("memory_tokens", 200, "ref_len"),
        ("prefix_ids", (999,), "vocab_size"),
        ("bos_id", -1, "token id"),
    ],
)
def test_validation_names_the_field(field, value, words):
    with pytest.raises(ValueError, match=f"Memory3Config.{field}.*{words}"):
        Memory3Config.preset("tiny", **{field: value})


def test_bad_json_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown Memory3Config field.*'width'"):
        Memory3Config.from_json(json.dumps({"width": 3}))
    with pytest.raises(ValueError, match="not valid JSON"):
        Memory3Config.from_json("{nope")
    with pytest.raises(ValueError, match="cannot read model config"):
        Memory3Config.from_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        Memory3Config.preset("huge")
