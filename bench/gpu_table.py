"""The short table bench/gpu.sh prints last: one line per GPU benchmark row (from the JSON
lines of bench_gpu_decode.py and bench_gpu_memory.py), its ratio against issue 12's target,
met or not; then the same rows formatted for bench/RESULTS.md (date, device, command).

    python bench/gpu_table.py OUT/gpu_results.jsonl
"""
from __future__ import annotations

import datetime
import json
import sys


def short(r: dict) -> str:
    if r["bench"] == "decode":
        return (f"{r['name']}: {r['kernel_ms'] * 1e3:.1f} us = {r['x_floor']:.2f}x floor, "
                f"{r['x_sdpa_context']:.2f}x SDPA ctx, naive {r['naive_speedup']:.1f}x slower "
                f"[{r['target']}: {'met' if r['target_met'] else 'MISSED'}]")
    if "skipped" in r:
        return f"{r['name']}: skipped ({r['skipped']})"
    extra = f", {r['x_faiss']:.0f}x FAISS" if "x_faiss" in r else ""
    met = r["fraction"] >= r["target"]
    return (f"{r['name']}: {r['rate'] / 1e9:.0f} GB/s = {r['fraction']:.2f} of {r['versus']}{extra} "
            f"[>= {r['target']:.2f}: {'met' if met else 'MISSED'}]")


def main(path: str) -> int:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    if not rows:
        print("no GPU benchmark rows")
        return 1
    device = rows[0]["device"]
    print(f"== GPU results ({device}; copy rate {rows[0]['copy_rate'] / 1e12:.2f} TB/s read+write"
          + (f", pinned H2D {rows[-1]['h2d_rate'] / 1e9:.1f} GB/s" if "h2d_rate" in rows[-1] else "") + ")")
    for r in rows:
        print("  " + short(r))
    today = datetime.date.today().isoformat()
    print(f"\n== rows for bench/RESULTS.md ({today}, {device}, `bash bench/gpu.sh`)")
    for r in rows:
        print(f"| {today} | {device} | {short(r)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
