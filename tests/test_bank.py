"""The memory bank: every codec round-trips, loading modes agree, the in-place path feeds
memory_attention, dedup/replace/delete/compact/reencode/merge, the cache's LRU, clear errors
on bad input and on damaged files, and the codec registry taking a new codec."""
from __future__ import annotations

import json
import os

import pytest
import torch

from memory3 import ops
from memory3.memory.bank import Bank, LOAD_MODES
from memory3.memory.cache import MemoryCache
from memory3.memory.codecs import ArraySpec, Codec, codec_names, make_codec, register_codec
from memory3.memory.errors import BankCorruptError, BankError, BankMismatchError
from memory3.memory.manifest import MemoryShape
from memory3.memory.rewrite import compact, merge, reencode

SHAPE = MemoryShape(layers=2, kv_heads=2, tokens=8, head_dim=16)
EMB = {"name": "test-embedder", "dim": 5}
CODECS = ["fp32", "bf16", "fp16", "int8", "int4", "pq"]
# mean relative L2 error of a stored memory against the original (random normal data)
ERROR_BOUND = {"fp32": 0.0, "bf16": 4e-3, "fp16": 5e-4, "int8": 1e-2, "int4": 0.15, "pq": 0.5}


def memories(n: int, seed: int = 0, shape: MemoryShape = SHAPE) -> torch.Tensor:
    return torch.randn((n, *shape.memory), generator=torch.Generator().manual_seed(seed))


def make_bank(path, n=40, codec="fp32", shard_rows=16, seed=0, **kw) -> tuple[Bank, torch.Tensor, torch.Tensor]:
    if codec == "pq":
        kw.setdefault("codec_config", {"iters": 4})  # k-means converges enough for the bounds
    bank = Bank.create(path, shape=SHAPE, fingerprint="f00d", codec=codec, embedder=EMB, shard_rows=shard_rows,
                       dtype=torch.float32, **kw)
    mem, emb = memories(n, seed), torch.randn(n, EMB["dim"], generator=torch.Generator().manual_seed(seed + 1))
    bank.append([f"r{i}" for i in range(n)], [f"text {i}" for i in range(n)], mem, embeddings=emb,
                tokens=[[i, i + 1] for i in range(n)], sources=[f"src{i % 3}" for i in range(n)])
    return bank, mem, emb


def as_layers(mem: torch.Tensor) -> torch.Tensor:
    """[*ids, L, 2, Hkv, M, D] -> the layout gather returns, [L, 2, *ids, Hkv, M, D]."""
    return mem.movedim((-5, -4), (0, 1))


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_round_trips_through_shards(tmp_path, codec):
    bank, mem, _ = make_bank(tmp_path / "b", codec=codec)
    assert len(bank.manifest.shards) == 3 and bank.rows == len(bank) == 40
    ids = torch.tensor([[3, 17, -1], [39, 3, 0]])
    got = bank.gather(ids)
    assert got.shape == (2, 2, 2, 3, 2, 8, 16) and got.dtype == torch.float32
    assert got[:, :, 0, 2].abs().max() == 0  # -1: an empty slot reads as zeros
    want = as_layers(mem[ids.clamp(min=0)])
    err = ((got - want).flatten(4).norm(dim=-1) / want.flatten(4).norm(dim=-1))[:, :, ids >= 0]
    assert err.mean() <= ERROR_BOUND[codec] + 1e-7, err.mean()
    if codec in ("int8", "int4"):  # bit-exact against the ops' own codec on the same data
        for l in range(SHAPE.layers):
            for kv in range(2):
                codes, meta = ops.quantize_memory(mem[:, l, kv], codec)
                ref = ops.dequantize_memory(codes, meta, codec, ids=ids, out_dtype=torch.float32)
                torch.testing.assert_close(got[l, kv], ref, rtol=0, atol=0)
    if codec == "pq":
        book = bank.codec.state_dict()["layer1.v"]
        codes, _ = ops.quantize_memory(mem[:, 1, 1], "pq", codebook=book)
        ref = ops.dequantize_memory(codes, book, "pq", ids=ids, out_dtype=torch.float32)
        torch.testing.assert_close(got[1, 1], ref, rtol=0, atol=0)
    # reopened read-only (memory-mapped) it reads the same
    bank.close()
    with Bank.open(tmp_path / "b", dtype=torch.float32, expect_fingerprint="f00d") as again:
        torch.testing.assert_close(again.gather(ids), got, rtol=0, atol=0)


def test_bytes_per_memory_per_codec(tmp_path):
    L, Hkv, M, D = SHAPE.layers, SHAPE.kv_heads, SHAPE.tokens, SHAPE.head_dim
    values = L * 2 * Hkv * M * D
    want = {"fp32": 4 * values, "bf16": 2 * values, "fp16": 2 * values, "int8": values + 4 * L * 2 * Hkv * M,
            "int4": values // 2 + 8 * L * 2 * Hkv * M * ((D + 31) // 32), "pq": values // 8}
    for codec, nbytes in want.items():
        bank = Bank.create(tmp_path / codec, shape=SHAPE, fingerprint="f", codec=codec)
        assert bank.bytes_per_memory() == nbytes, codec
        bank.append(["a"], ["t"], memories(1))
        files = [p for p in (tmp_path / codec).rglob("*.bin")]
        assert sum(p.stat().st_size for p in files) == nbytes, codec


@pytest.mark.parametrize("codec", ["fp32", "int8", "pq"])
def test_loading_modes_agree(tmp_path, codec):
    bank, mem, _ = make_bank(tmp_path / "b", codec=codec)
    bank.close()
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    results = {}
    for mode in LOAD_MODES:  # "gpu" and "pinned" run on the CPU here: same code, host memory
        with Bank.open(tmp_path / "b", mode=mode, device="cpu", dtype=torch.float32, cache_size=8) as b:
            results[mode] = b.gather(ids)
            assert b.mode == mode
    for mode in LOAD_MODES:
        torch.testing.assert_close(results[mode], results["mmap"], rtol=0, atol=0)


@pytest.mark.parametrize("codec", ["fp32", "int8"])
@pytest.mark.parametrize("mode", LOAD_MODES)
def test_layer_bank_feeds_memory_attention_in_place(tmp_path, codec, mode):
    """memory_attention reading the bank by row id == reading the gathered rows."""
    bank, _, _ = make_bank(tmp_path / "b", codec=codec)
    bank.close()
    bank = Bank.open(tmp_path / "b", mode=mode, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    B, T, Hq, C, R = 2, 20, 4, 3, 2
    q, k, v = (torch.randn(B, T, n, SHAPE.head_dim, generator=g) for n in (Hq, SHAPE.kv_heads, SHAPE.kv_heads))
    rows = torch.randint(0, 40, (B, C, R), generator=g, dtype=torch.int32)
    rows[0, 1, 0] = -1
    for layer in range(SHAPE.layers):
        in_place = bank.layer_bank(layer)
        assert in_place["mem_k"].shape == (40, SHAPE.kv_heads, 8, 16)
        out, _ = ops.memory_attention(q, k, v, mem_ids=rows, chunk_size=8, **in_place)
        kd, vd = bank.gather_layers(rows.reshape(-1))[layer]
        local = torch.arange(B * C * R, dtype=torch.int32).reshape(B, C, R)
        local[rows < 0] = -1
        ref, _ = ops.memory_attention(q, k, v, kd, vd, local, chunk_size=8)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_layer_bank_refuses_gather_only_codecs(tmp_path):
    bank, _, _ = make_bank(tmp_path / "b", codec="int4")
    with pytest.raises(ValueError, match="int4 cannot be read in place.*in-place codecs: bf16, fp16, fp32, int8"):
        bank.layer_bank(0)
    with pytest.raises(ValueError, match="layer must be in"):
        bank.layer_bank(2)


def test_cache_is_lru_and_reports_hit_rate():
    loads = []

    def load(rows):  # one layer whose memory of row r is filled with r (keys) and -r (values)
        loads.append(rows.tolist())
        x = rows.float()[:, None, None, None].expand(-1, 1, 1, 1).clone()
        return [(x, -x)]

    cache = MemoryCache(3, (1, 2, 1, 1, 1), "cpu", torch.float32)
    (k, v), = cache.fetch(torch.tensor([5, 6, 7]), load)
    assert k.flatten().tolist() == [5, 6, 7] and v.flatten().tolist() == [-5, -6, -7]
    cache.fetch(torch.tensor([5]), load)  # 5 becomes the most recent: 6 is now least recent
    (k, v), = cache.fetch(torch.tensor([7, 8]), load, order=torch.tensor([1, 0, -1, 1]))  # evicts 6
    assert v.flatten().tolist() == [-8, -7, 0, -8]
    cache.fetch(torch.tensor([5, 7, 8]), load)  # all hits
    cache.fetch(torch.tensor([6]), load)  # a miss again: it was evicted
    assert loads == [[5, 6, 7], [8], [6]]
    s = cache.stats()
    assert (s.hits, s.misses, s.used, s.capacity) == (5, 5, 3, 3) and s.hit_rate == 0.5
    (k, v), = cache.fetch(torch.tensor([1, 2, 3, 4]), load)  # more than fits: read through
    assert loads[-1] == [1, 2, 3, 4] and k.flatten().tolist() == [1, 2, 3, 4]
    assert "hit rate" in str(cache.stats())


def test_bank_gather_goes_through_the_cache(tmp_path):
    bank, mem, _ = make_bank(tmp_path / "b", cache_size=4)
    first = bank.gather(torch.tensor([1, 2, 1, -1]))
    assert (bank.cache_stats().hits, bank.cache_stats().misses) == (0, 2)  # distinct rows only
    again = bank.gather(torch.tensor([2, 1, 3]))
    assert (bank.cache_stats().hits, bank.cache_stats().misses) == (2, 3)
    torch.testing.assert_close(again[:, :, 0], first[:, :, 1], rtol=0, atol=0)
    torch.testing.assert_close(again[:, :, 2], as_layers(mem[3:4])[:, :, 0], rtol=0, atol=0)


def test_same_text_is_a_no_op_and_a_changed_text_replaces(tmp_path):
    bank, mem, emb = make_bank(tmp_path / "b")
    commit = bank.manifest.commit
    assert bank.needs(["r0", "r1", "new"], ["text 0", "changed", "x"]) == [False, True, True]
    res = bank.append(["r0", "r5"], ["text 0", "text 5"], memories(2, seed=9), embeddings=torch.zeros(2, 5))
    assert (res.added, res.replaced, res.unchanged, res.rows) == (0, 0, 2, [0, 5])
    assert bank.manifest.commit == commit  # nothing written
    new = memories(2, seed=7)
    res = bank.append(["r1", "r40"], ["changed", "brand new"], new, embeddings=torch.ones(2, 5))
    assert (res.added, res.replaced, res.unchanged, res.rows) == (1, 1, 0, [40, 41])
    assert bank.lookup(["r1", "r40", "nope"]) == [40, 41, None]
    assert bank.deleted_mask().nonzero().flatten().tolist() == [1]
    assert bank.manifest.counts == {"rows": 42, "live": 41, "deleted": 1}
    torch.testing.assert_close(bank.gather(torch.tensor([40, 1])), as_layers(torch.stack([new[0], mem[1]])), rtol=0, atol=0)
    old, fresh = bank.references([1, 40])
    assert old.deleted and old.text == "text 1" and not fresh.deleted and fresh.text == "changed"
    assert fresh.tokens is None and bank.references([2])[0].tokens == [2, 3] and bank.references([2])[0].source == "src2"
    bank.append(["t"], ["tensor tokens"], memories(1).requires_grad_(), embeddings=torch.zeros(1, 5), tokens=[torch.tensor([7, 8, 9])])
    assert bank.references(bank.lookup(["t"]))[0].tokens == [7, 8, 9]


def test_delete_then_compact(tmp_path):
    bank, mem, emb = make_bank(tmp_path / "b")
    assert bank.delete(["r3", "r20", "unknown"]) == 2 and bank.delete(["r3"]) == 0
    assert len(bank) == 38 and bank.rows == 40
    bank.close()
    bank = Bank.open(tmp_path / "b", writable=True, dtype=torch.float32)
    assert bank.deleted_mask().nonzero().flatten().tolist() == [3, 20]
    old_files = set((tmp_path / "b").rglob("*.bin"))
    assert compact(bank) == 2 and compact(bank) == 0
    keep = [i for i in range(40) if i not in (3, 20)]
    assert bank.rows == len(bank) == 38 and bank.manifest.counts["deleted"] == 0
    assert bank.lookup(["r0", "r3", "r4", "r39"]) == [0, None, 3, 37]
    torch.testing.assert_close(bank.gather(torch.arange(38)), as_layers(mem[keep]), rtol=0, atol=0)
    torch.testing.assert_close(bank.embeddings(), emb[keep], rtol=0, atol=0)
    assert not old_files & set((tmp_path / "b").rglob("*.bin"))  # old shards removed
    bank.close()
    with Bank.open(tmp_path / "b", verify=True) as b:
        assert b.references([3])[0].id == "r4" and len(b) == 38


def test_fingerprint_mismatch_and_reencode(tmp_path):
    bank, _, emb = make_bank(tmp_path / "b", codec="pq")
    bank.delete(["r0"])
    bank.close()
    with pytest.raises(BankMismatchError, match="fingerprint f00d, but this model's fingerprint is beef.*reencode") as info:
        Bank.open(tmp_path / "b", expect_fingerprint="beef")
    assert isinstance(info.value, ValueError)
    new_shape = MemoryShape(layers=3, kv_heads=1, tokens=8, head_dim=8)

    def encode(texts):  # a "model" whose memory of text i is filled with i
        n = torch.tensor([float(t.split()[1]) for t in texts])
        return n[:, None, None, None, None, None].expand(len(texts), *new_shape.memory).clone()

    bank = reencode(tmp_path / "b", encode, "beef", batch_size=7, progress=False)
    assert bank.fingerprint == "beef" and bank.shape == new_shape and len(bank) == bank.rows == 39
    got = bank.gather(torch.arange(39))
    assert torch.allclose(got.float().amax(dim=(0, 1, 3, 4, 5)), torch.arange(1, 40).float(), atol=0.1)
    bank.close()
    with Bank.open(tmp_path / "b", expect_fingerprint="beef", verify=True) as b:
        torch.testing.assert_close(b.embeddings(), emb[1:], rtol=0, atol=0)
        assert len(list((tmp_path / "b" / "codec").iterdir())) == 1  # the old codebooks are gone


def test_read_only_and_single_writer(tmp_path):
    bank, _, _ = make_bank(tmp_path / "b")
    with pytest.raises(BankError, match="open for writing by another process"):
        Bank.open(tmp_path / "b", writable=True)
    reader = Bank.open(tmp_path / "b")
    with pytest.raises(BankError, match="read-only"):
        reader.append(["x"], ["x"], memories(1), embeddings=torch.zeros(1, 5))
    with pytest.raises(BankError, match="read-only"):
        reader.delete(["r1"])
    bank.close()
    Bank.open(tmp_path / "b", writable=True).close()  # the lock went with the writer


def test_bad_inputs_are_named(tmp_path):
    bank, _, _ = make_bank(tmp_path / "b")
    with pytest.raises(ValueError, match=r"memories must be a float tensor \[n, layers, 2, Hkv, M, D\] = \[1, 2, 2, 2, 8, 16\]"):
        bank.append(["x"], ["x"], torch.zeros(1, 2, 2, 2, 8, 15), embeddings=torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"embeddings must be a float tensor \[n, 5\]"):
        bank.append(["x"], ["x"], memories(1))
    with pytest.raises(ValueError, match="'x' appears more than once"):
        bank.append(["x", "x"], ["a", "b"], memories(2), embeddings=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"row ids in \[0, 40\) or -1"):
        bank.gather(torch.tensor([0, 40]))
    with pytest.raises(ValueError, match="int32 or int64"):
        bank.gather(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="unknown memory codec 'zip'; registered codecs: bf16"):
        Bank.create(tmp_path / "c", shape=SHAPE, fingerprint="f", codec="zip")
    with pytest.raises(ValueError, match="mode must be one of gpu, pinned, mmap"):
        Bank.open(tmp_path / "b", mode="ram")
    with pytest.raises(BankError, match="not empty"):
        Bank.create(tmp_path / "b", shape=SHAPE, fingerprint="f")
    with pytest.raises(BankError, match="does not exist"):
        Bank.open(tmp_path / "missing")
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        MemoryShape(2, 2, 8, 0)


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"\x00garbage" * 8)


@pytest.mark.parametrize("target, how, match", [
    ("manifest.json", "garbage", "manifest.json is not (valid JSON|UTF-8)"),
    ("manifest.json", "truncate", "manifest.json is not valid JSON"),
    ("layer_01/s000002.k.bin", "truncate", "s000002.k.bin is truncated: .* bytes, but its 8 committed rows need"),
    ("layer_00/s000001.v.bin", "flip", "s000001.v.bin is damaged: bytes .* fail their checksum"),
    ("index/s000000.emb.bin", "flip", "s000000.emb.bin is damaged"),
    ("meta.sqlite", "garbage", "meta.sqlite is not a readable bank metadata database"),
    ("codec/state-1.safetensors", "flip", "codec state .* is damaged"),
])
def test_damaged_files_are_clear_errors(tmp_path, target, how, match):
    bank, _, _ = make_bank(tmp_path / "b", codec="pq")
    bank.close()
    _damage(tmp_path / "b" / target, how)
    with pytest.raises(BankCorruptError, match=match):
        Bank.open(tmp_path / "b", verify=True)


def test_missing_shard_and_inconsistent_manifest(tmp_path):
    bank, _, _ = make_bank(tmp_path / "b")
    bank.close()
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    m["counts"]["live"] += 1
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BankCorruptError, match="counts .* do not add up"):
        Bank.open(tmp_path / "b")
    m["counts"]["live"] -= 1
    m["shape"]["kv_heads"] = 4
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BankCorruptError, match="differs from the manifest committed in"):
        Bank.open(tmp_path / "b")
    m["shape"]["kv_heads"] = 2
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(m))
    os.remove(tmp_path / "b" / "layer_00" / "s000000.k.bin")
    with pytest.raises(BankCorruptError, match="s000000.k.bin is missing"):
        Bank.open(tmp_path / "b", verify=False)


def test_manifest_one_commit_behind_is_rolled_forward(tmp_path):
    """A crash between the SQLite commit and the manifest rename."""
    bank, _, _ = make_bank(tmp_path / "b")
    stale = (tmp_path / "b" / "manifest.json").read_bytes()
    bank.append(["late"], ["late"], memories(1, seed=5), embeddings=torch.zeros(1, 5))
    bank.close()
    (tmp_path / "b" / "manifest.json").write_bytes(stale)
    with Bank.open(tmp_path / "b") as reader:  # read-only: reads the committed state
        assert reader.lookup(["late"]) == [40] and reader.rows == 41
    assert json.loads((tmp_path / "b" / "manifest.json").read_bytes())["commit"] == json.loads(stale)["commit"]
    Bank.open(tmp_path / "b", writable=True).close()  # a writer repairs the file
    assert json.loads((tmp_path / "b" / "manifest.json").read_bytes())["commit"] == json.loads(stale)["commit"] + 1


def test_merge_per_rank_banks(tmp_path):
    a, mem_a, _ = make_bank(tmp_path / "rank0", n=10, shard_rows=4, seed=0)
    a.delete(["r2"])
    a.close()
    b = Bank.create(tmp_path / "rank1", shape=SHAPE, fingerprint="f00d", codec="fp32", embedder=EMB, shard_rows=4)
    mem_b = memories(3, seed=3)
    b.append(["s0", "s1", "s2"], ["a", "b", "c"], mem_b, embeddings=torch.zeros(3, 5))
    b.close()
    merged = merge(tmp_path / "all", [tmp_path / "rank0", tmp_path / "rank1"], dtype=torch.float32)
    assert merged.rows == 13 and len(merged) == 12 and merged.deleted_mask().nonzero().flatten().tolist() == [2]
    assert merged.lookup(["r0", "r9", "s0", "s2"]) == [0, 9, 10, 12]
    torch.testing.assert_close(merged.gather(torch.arange(13)), as_layers(torch.cat([mem_a, mem_b])), rtol=0, atol=0)
    assert not (tmp_path / "rank0").exists() and not (tmp_path / "rank1").exists()
    merged.append(["t"], ["t"], memories(1), embeddings=torch.zeros(1, 5))  # appends continue
    assert merged.rows == 14


def test_merge_refuses_mismatched_banks(tmp_path):
    make_bank(tmp_path / "a", n=3)[0].close()
    other = Bank.create(tmp_path / "b", shape=SHAPE, fingerprint="other", codec="fp32", embedder=EMB)
    other.close()
    with pytest.raises(BankError, match="their fingerprint differ"):
        merge(tmp_path / "out", [tmp_path / "a", tmp_path / "b"])
    make_bank(tmp_path / "c", n=3)[0].close()  # the same ids as a
    with pytest.raises(BankError, match="id 'r0' is live in more than one bank"):
        merge(tmp_path / "out", [tmp_path / "a", tmp_path / "c"])
    assert not (tmp_path / "out").exists() and (tmp_path / "a" / "manifest.json").exists()


class OffsetCodec(Codec):
    """A codec with learned state, as the vq codec will be: it stores x - mean as fp16 and
    learns the mean per layer and keys/values from the first memories."""

    name = "offset"

    def __init__(self, shape, scale: float = 1.0):
        super().__init__(shape)
        self.scale, self.mean = scale, {}

    def config(self):
        return {"scale": self.scale}

    def arrays(self):
        return {"k": ArraySpec(torch.float16, self.shape.layer), "v": ArraySpec(torch.float16, self.shape.layer)}

    def needs_training(self):
        return not self.mean

    def train(self, memories):
        for l in range(self.shape.layers):
            for i, kv in enumerate("kv"):
                self.mean[f"{l}.{kv}"] = memories[:, l, i].float().mean(0)

    def state_dict(self):
        return dict(self.mean)

    def load_state_dict(self, state):
        self.mean = dict(state)

    def encode(self, layer, k, v):
        return {kv: ((x.float() - self.mean[f"{layer}.{kv}"]) * self.scale).half() for kv, x in (("k", k), ("v", v))}

    def decode(self, layer, arrays, ids, out_dtype):
        return tuple((arrays[kv][ids].float() / self.scale + self.mean[f"{layer}.{kv}"]).to(out_dtype) for kv in "kv")


def test_a_registered_codec_with_state_plugs_in(tmp_path):
    register_codec("offset", f"{__name__}:OffsetCodec")  # imported on first use, as "vq" will be
    assert "offset" in codec_names()
    bank = Bank.create(tmp_path / "b", shape=SHAPE, fingerprint="f", codec="offset", codec_config={"scale": 2.0},
                       dtype=torch.float32)
    mem = memories(6) + 100.0  # far from 0: wrong without the learned mean
    bank.append([str(i) for i in range(6)], [str(i) for i in range(6)], mem)
    bank.close()
    with Bank.open(tmp_path / "b", dtype=torch.float32) as b:
        assert b.manifest.codec["config"] == {"scale": 2.0} and b.manifest.codec["state"] == "codec/state-1.safetensors"
        torch.testing.assert_close(b.gather(torch.arange(6)), as_layers(mem), rtol=0, atol=2e-3)
        with pytest.raises(ValueError, match="offset cannot be read in place"):
            b.layer_bank(0)
    with pytest.raises(ValueError, match="bad options"):
        make_codec("offset", SHAPE, {"nope": 1})
    with pytest.raises(ValueError, match="Codec subclass"):
        register_codec("bad", object)
