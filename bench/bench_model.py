"""The Memory³ model end to end on the CPU: forward (prefill) and decode tokens/s with memory,
without memory, and the same weights run through `transformers.LlamaForCausalLM`.

    python bench/bench_model.py                 # small preset, B=4, 256-token prompt (~1 min)
    python bench/bench_model.py --preset tiny --prompt 128 --steps 16

With memory: a bank of 1,000 random memories, 5 per 64-token chunk (the paper's read), in
the memory layers (the first half). Decode: one token per step through the preallocated KV
cache at a context of `prompt` tokens; Llama uses its own DynamicCache. All under
inference_mode, float32, the threads torch has. Ratios are measured in this run.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch

from memory3.model import Memories, Memory3Config, Memory3Model
from memory3.model.hf import to_hf


def make_case(preset: str, batch: int, prompt: int, bank: int = 1000, seed: int = 0):
    torch.manual_seed(seed)
    config = Memory3Config.preset(preset)
    model = Memory3Model(config).eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, config.vocab_size, (batch, prompt), generator=g)
    tokens[:, : config.prefix_len] = torch.tensor(config.prefix_ids)
    chunks = math.ceil((prompt + 1 - config.prefix_len) / config.chunk_size)
    ids = torch.randint(0, bank, (batch, chunks, config.memories_per_chunk), generator=g, dtype=torch.int32)
    memories = Memories.from_stacked(torch.randn(bank, *config.memory_shape, generator=g) * 0.5, ids)
    return model, tokens, memories


@torch.inference_mode()
def measure(preset: str = "small", batch: int = 4, prompt: int = 256, steps: int = 32, budget_s: float = 8.0) -> dict:
    model, tokens, memories = make_case(preset, batch, prompt)
    llama = to_hf(model)
    B, T = tokens.shape
    lens = torch.full((B,), T, dtype=torch.int32)
    step_lens = lens + 1
    cache = model.new_cache(B, T + 1)
    next_token = tokens[:, -1:]

    def prefill(mem):
        return lambda: model(tokens, mem)

    def decode(mem):
        model(tokens, mem, cache=cache, kv_lens=lens)  # fill the cache once; each step writes row T
        return lambda: model(next_token, mem, cache=cache, kv_lens=step_lens)

    def llama_decode():
        past = llama(tokens, use_cache=True).cache

        def step():
            llama(next_token, cache=past, use_cache=True)
            past.crop(-1)  # back to the prompt, so every step runs at context T + 1
        return step

    r = dict(preset=preset, batch=B, prompt=T, threads=torch.get_num_threads())
    prefills = interleaved_medians(
        {"memory": prefill(memories), "plain": prefill(None), "llama": lambda: llama(tokens)}, steps, budget_s)
    decodes = interleaved_medians({"memory": decode(memories), "plain": decode(None), "llama": llama_decode()},
                                  steps, budget_s)
    for kind in ("memory", "plain", "llama"):
        r[f"prefill_{kind}_s"], r[f"decode_{kind}_s"] = prefills[kind], decodes[kind]
    for kind in ("memory", "plain", "llama"):
        r[f"prefill_{kind}_tok_s"] = B * T / r[f"prefill_{kind}_s"]
        r[f"decode_{kind}_tok_s"] = B / r[f"decode_{kind}_s"]
    r["prefill_memory_vs_plain"] = r["prefill_memory_s"] / r["prefill_plain_s"]
    r["decode_memory_vs_plain"] = r["decode_memory_s"] / r["decode_plain_s"]
    r["prefill_llama_vs_plain"] = r["prefill_llama_s"] / r["prefill_plain_s"]
    r["decode_llama_vs_plain"] = r["decode_llama_s"] / r["decode_plain_s"]
    return r


def interleaved_medians(fns: dict, rounds: int, budget_s: float) -> dict:
    """Median seconds of each fn, timed in turn round after round (at least 3 rounds within
    budget_s), so load from other processes falls on every path alike."""
    for fn in fns.values():
        fn(), fn()  # warm-up (allocator, caches)
    times = {name: [] for name in fns}
    start = time.perf_counter()
    while len(times[next(iter(fns))]) < rounds and (len(times[next(iter(fns))]) < 3 or time.perf_counter() - start < budget_s):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def test_model_decode_step(benchmark):
    model, tokens, memories = make_case("tiny", 2, 64)
    cache = model.new_cache(2, 65)
    lens = torch.full((2,), 65, dtype=torch.int32)
    with torch.inference_mode():
        model(tokens, memories, cache=cache, kv_lens=lens - 1)
        benchmark(lambda: model(tokens[:, -1:], memories, cache=cache, kv_lens=lens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens (prefix included)")
    parser.add_argument("--steps", type=int, default=32, help="timed rounds per case (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.preset, args.batch, args.prompt, args.steps)
    print(f"# Memory3Model `{r['preset']}` on CPU ({platform.processor() or platform.machine()}, "
          f"{r['threads']} threads, torch {torch.__version__}), B={r['batch']}, prompt {r['prompt']} tokens, float32\n")
    print("| path | prefill tok/s | decode tok/s | prefill time vs no memory | decode step vs no memory |")
    print("|---|---:|---:|---:|---:|")
    for kind, label in (("plain", "Memory3Model, no memory"), ("memory", "Memory3Model, 5 memories/chunk"),
                        ("llama", "transformers Llama, same weights")):
        rel_p = r[f"prefill_{kind}_s"] / r["prefill_plain_s"]
        rel_d = r[f"decode_{kind}_s"] / r["decode_plain_s"]
        print(f"| {label} | {r[f'prefill_{kind}_tok_s']:,.0f} | {r[f'decode_{kind}_tok_s']:,.0f} | "
              f"{rel_p:.2f}x | {rel_d:.2f}x |")
    verdict = "within" if r["decode_memory_vs_plain"] <= 1.2 else "ABOVE"
    print(f"\ndecode step with memory costs {r['decode_memory_vs_plain']:.2f}x the step without ({verdict} the 1.2x target)")


if __name__ == "__main__":
    main()
