"""Where a decode step's time goes besides reading the weights: one thread against two, and one product call against
many, side by side in one run.

    python benchmarks/step_overhead.py [--repeats 15] [--context 200] [--update_doc docs/performance.md]

1. The default model's full pass (all layers and the LM head) over 1 and 4 positions at a `--context`-token cache,
   with 1 and 2 threads, and the weight bytes it reads per millisecond.
2. The same bytes' worth of GGUF Q4_1 products on the kernel the model uses (tiles layout on VNNI / AMX, rows on
   AVX-512 / AVX2), one input row, random weights of the default model's gate/up shape (3072 x 576), per 30 layers:
   as one call over all 30 matrices stacked, as 30 calls, and as 120 calls of a quarter each (about the number of
   products in a decode step), with 1 and 2 threads.
If two threads take the one big call to about twice one thread's bandwidth but not the 120 small ones, or the full
pass, then what a step pays beyond streaming its weights is fixed work per product (the parallel region, setup,
serial steps between products), not memory.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from skiplayer.bench.stamp import stamp, write_between_markers
from skiplayer.model.optimize import native_kernels_available


def model_passes(repeats: int, context: int) -> dict[tuple[int, int], float]:
    """(threads, rows) -> median ms of a full pass, the cache rolled back after each."""
    from skiplayer.model.load import load_model
    from skiplayer.options import DEFAULT_DTYPE
    model = load_model("smollm2-135m", dtype=DEFAULT_DTYPE).model
    cache = model.new_cache(context + 16)
    tokens = torch.arange(context + 8) % 1000 + 100
    times: dict[tuple[int, int], list[float]] = {}
    with torch.inference_mode():
        model.prefill(tokens[:context], cache)
        for _ in range(repeats):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for rows in (1, 4):
                    x = model.embed(tokens[context:context + rows])
                    t = time.perf_counter()
                    for _ in range(10):
                        model.logits(model.forward_layers(x, context, cache, 0, model.n_layers))
                        cache.rollback(context)
                    times.setdefault((threads, rows), []).append((time.perf_counter() - t) / 10)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def product_calls(repeats: int) -> tuple[dict[tuple[int, str], float], int]:
    """(threads, how the matrices are called) -> median ms; and the weight bytes of the 30 matrices."""
    from gguf import GGMLQuantizationType, quants
    from skiplayer.model.gguf_blocks import pack_blocks
    isa = torch.ops.skiplayer.kernel_isa("")
    tiles = isa in ("amx", "vnni")
    torch.ops.skiplayer.activation_int8_parts(1 if isa == "vnni" else 2)
    torch.manual_seed(0)
    ws = [torch.randn(3072, 576) * 0.02 for _ in range(30)]

    def blocks(w: torch.Tensor) -> torch.Tensor:
        return pack_blocks("Q4_1", quants.quantize(w.numpy(), GGMLQuantizationType["Q4_1"]), tiles=tiles)
    layouts = {"1 call (30 matrices stacked)": [blocks(torch.cat(ws))], "30 calls": [blocks(w) for w in ws],
               "120 calls (quarters)": [blocks(w[i:i + 768]) for w in ws for i in range(0, 3072, 768)]}
    op, x = torch.ops.skiplayer.small_linear, torch.randn(1, 576)
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(repeats):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, mats in layouts.items():
                t = time.perf_counter()
                for w in mats:
                    op(x, w, None, None, False, False)
                times.setdefault((threads, name), []).append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}, sum(w.numel() for w in layouts["30 calls"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--update_doc", default=None, help="write the tables between the step_overhead markers")
    args = p.parse_args()
    if not native_kernels_available():
        raise SystemExit("step_overhead.py: the native kernels cannot be built here")
    passes = model_passes(args.repeats, args.context)
    products, nbytes = product_calls(args.repeats)
    lines = [stamp("benchmarks/step_overhead.py"), "",
             f"| full pass ({args.context}-token cache) | 1 thread (ms) | 2 threads (ms) | 2 threads / 1 |",
             "|---|---:|---:|---:|"]
    for rows in (1, 4):
        one, two = passes[(1, rows)], passes[(2, rows)]
        lines.append(f"| {rows} position{'s' if rows > 1 else ''} | {one:.2f} | {two:.2f} | {one / two:.2f}x |")
    lines += ["", f"| Q4_1 products, 1 row, {nbytes / 1e6:.0f} MB of weights | 1 thread | 2 threads | "
              "2 threads / 1 |", "|---|---:|---:|---:|"]
    for name in ("1 call (30 matrices stacked)", "30 calls", "120 calls (quarters)"):
        one, two = products[(1, name)], products[(2, name)]
        lines.append(f"| {name} | {one:.2f} ms ({nbytes / one / 1e6:.0f} GB/s) | {two:.2f} ms "
                     f"({nbytes / two / 1e6:.0f} GB/s) | {one / two:.2f}x |")
    print("\n".join(lines))
    if args.update_doc:
        write_between_markers(args.update_doc, "step_overhead", lines)


if __name__ == "__main__":
    main()
