"""Decoding attention of the default model's shape, on its own: the one-row loops (AVX2) against the AVX-512
decoding attention, rows x context, side by side in one run.

    python benchmarks/attention_speed.py [--contexts 200,700] [--rows 1,2,4,8] [--repeats 7] [--threads 2]
        [--update_doc docs/performance.md]

Times `rope_cache_attention` (RoPE, the K/V write and attention) over 30 layers' own float16 caches (9 query heads,
3 KV heads, head size 64, as SmolLM2-135M), with a 64 MB read between passes so the caches come from memory as in a
decode step. Each path runs once per repeat (`kernel_isa` switches only the attention here: no matmul runs), medians.
The AVX-512 path runs where the CPU has AVX-512; elsewhere only the loops are timed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from skiplayer.bench.stamp import stamp, write_between_markers
from skiplayer.model.optimize import native_kernels_available

H, G, D, LAYERS = 9, 3, 64, 30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="200,700")
    p.add_argument("--rows", default="1,2,4,8")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--update_doc", default=None, help="write the table between the attention_speed markers")
    args = p.parse_args()
    if not native_kernels_available():
        raise SystemExit("attention_speed.py: the native kernels cannot be built here")
    torch.set_num_threads(args.threads)
    op = torch.ops.skiplayer.rope_cache_attention
    native = torch.ops.skiplayer.kernel_isa("")
    paths = ["avx2"] + ([native] if native != "avx2" else [])
    flush = torch.ones(16 << 20)  # 64 MB: read between passes, so each pass finds its caches in memory
    g = torch.Generator().manual_seed(0)
    rows = [int(x) for x in args.rows.split(",")]
    lines = [stamp("benchmarks/attention_speed.py"), "",
             "| context | path | " + " | ".join(f"{n} row{'s' if n > 1 else ''} (ms)" for n in rows) + " |",
             "|---|---|" + "---:|" * len(rows)]
    for ctx in (int(x) for x in args.contexts.split(",")):
        caches = [(torch.randn(G, ctx + max(rows), D, generator=g).half(),
                   torch.randn(G, ctx + max(rows), D, generator=g).half()) for _ in range(LAYERS)]
        times = {(path, n): [] for path in paths for n in rows}
        for _ in range(args.repeats):
            for n in rows:
                qkv = torch.randn(n, (H + 2 * G) * D, generator=g).half()
                angles = torch.rand(n, D // 2, generator=g) * 6
                cos, sin = torch.cat([angles.cos()] * 2, -1).half(), torch.cat([angles.sin()] * 2, -1).half()
                for path in paths:
                    torch.ops.skiplayer.kernel_isa(path)
                    flush.sum()
                    t = time.perf_counter()
                    for kc, vc in caches:
                        op(qkv, cos, sin, kc, vc, ctx, H, G, True, None, 0)
                    times[(path, n)].append(time.perf_counter() - t)
        torch.ops.skiplayer.kernel_isa(native)
        for path in paths:
            label = "one-row loops (AVX2)" if path == "avx2" else "AVX-512 decoding attention"
            lines.append(f"| {ctx} | {label} | " + " | ".join(
                f"{statistics.median(times[(path, n)]) * 1e3:.2f}" for n in rows) + " |")
    print("\n".join(lines))
    if args.update_doc:
        write_between_markers(args.update_doc, "attention_speed", lines)


if __name__ == "__main__":
    main()
