"""Matmul kernels for decode-size blocks (M = 1..9 rows) over the default model's layer matrices.

    python benchmarks/kernel_speed.py [--layers 30] [--repeats 7] [--rows 1,2,3,5,8,9] [--compile] [--threads N]

Streams the weights of `--layers` Llama layers of SmolLM2-135M shape (q/k/v 960x576, o 576x576, gate/up 3072x576,
down 576x1536; random values) through each kernel, so no matrix is served from cache, and prints per kernel the time
of one pass with M = 1 row, the effective GB/s (weight bytes / time) and v(M) = time(M rows) / time(1 row):
  F.linear fp32/bf16/fp16                          stock PyTorch (MKL / oneDNN)
  small_linear fp32/bf16/fp16/int8 [packed]        our batch-invariant AVX2 kernel (model/kernels/), on row-major
                                                   weights or on pair-packed ones (model/packing.py, the default)
  small_linear GGUF Q4_1/Q8_0 amx|vnni|avx512|avx2 GGUF blocks (model/gguf_blocks.py) on each instruction-set path;
                                                   on the tiles (amx, vnni) with x as two int8 parts or one,
                                                   on avx2 with x in fp32 or as one int8 part
  _weight_int8pack_mm (bf16 activations)            PyTorch's int8 weight-only op
  quantize_dynamic int8 (fp32 activations)          torch.ao dynamic quantization (fbgemm)
  --compile: torch.compile + inductor freezing (weight prepacking) of the same stack, fp32 and bf16, one graph per M
Kernels are interleaved: every kernel once per repeat, medians reported.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from skiplayer.model.optimize import native_kernels_available, quantize_int8
from skiplayer.model.packing import pack_pairs

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


class Stack(nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.lins = nn.ModuleList()
        for w in weights:
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
            lin.weight = nn.Parameter(w, requires_grad=False)
            self.lins.append(lin)

    def forward(self, xs: list[torch.Tensor]):
        return [lin(xs[i % len(xs)]) for i, lin in enumerate(self.lins)]


def build(args):
    torch.manual_seed(0)
    ws = [torch.randn(o, i) * 0.02 for _ in range(args.layers) for o, i in SHAPES]
    n = sum(w.numel() for w in ws)
    kernels = {}  # name -> (bytes per pass, activation dtype, fn(xs) running the whole stack)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        wd = [w.to(dt) for w in ws]
        kernels[f"F.linear {dt}"] = (n * dt.itemsize, dt, lambda xs, wd=wd: [F.linear(xs[i % 4], w)
                                                                               for i, w in enumerate(wd)])
    if native_kernels_available():
        op = torch.ops.skiplayer.small_linear
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            for packed in (False, True):  # row-major, or pairs of rows interleaved (model/packing.py, the default)
                wd = [pack_pairs(w.to(dt)) if packed else w.to(dt) for w in ws]
                kernels[f"small_linear {dt}{' packed' if packed else ''}"] = (
                    n * dt.itemsize, dt, lambda xs, wd=wd, p=packed: [op(xs[i % 4], w, None, None, False, p)
                                                                      for i, w in enumerate(wd)])
        q8 = [quantize_int8(w) for w in ws]
        for packed in (False, True):
            q8p = [(pack_pairs(q), s) if packed else (q, s) for q, s in q8]
            kernels[f"small_linear int8{' packed' if packed else ''} (fp32 act)"] = (
                n, torch.float32, lambda xs, qs=q8p, p=packed: [op(xs[i % 4], q, s, None, False, p)
                                                                for i, (q, s) in enumerate(qs)])
        from gguf import GGMLQuantizationType, quants
        from skiplayer.model.gguf_blocks import pack_blocks
        for fmt in ("Q4_1", "Q8_0"):  # GGUF blocks as the kernels hold them (model/gguf_blocks.py)
            here = torch.ops.skiplayer.kernel_isa("")
            has = {"amx": ("amx",), "vnni": ("amx", "vnni"), "avx512": ("amx", "vnni", "avx512"), "avx2": None}
            for isa in ("amx", "vnni", "avx512", "avx2"):  # the paths this CPU has (amx, vnni: the tiles layout)
                if has[isa] and here not in has[isa]:
                    continue
                tiles = isa in ("amx", "vnni")
                qb = [pack_blocks(fmt, quants.quantize(w.numpy(), GGMLQuantizationType[fmt]), tiles=tiles)
                      for w in ws]
                # tiles: x as two int8 parts, or one (--gguf_activations int8); rows: fp32 x, or on AVX2 one int8 part
                choices = (((2, "int8x2 act"), (1, "int8 act")) if tiles else
                           ((2, "fp32 act"), (1, "int8 act")) if isa == "avx2" else ((2, "fp32 act"),))
                for parts, act in choices:
                    if isa == "amx" and parts == 1:
                        continue
                    kernels[f"small_linear GGUF {fmt} {isa} ({act})"] = (
                        sum(q.numel() for q in qb), torch.float32,
                        lambda xs, qb=qb, isa=isa, parts=parts: [torch.ops.skiplayer.kernel_isa(isa),
                                                                 torch.ops.skiplayer.activation_int8_parts(parts)] + [
                            op(xs[i % 4], q, None, None, False, False) for i, q in enumerate(qb)])
    q8b = [(q, s.to(torch.bfloat16)) for q, s in (quantize_int8(w) for w in ws)]
    kernels["_weight_int8pack_mm (bf16 act)"] = (n, torch.bfloat16, lambda xs: [
        torch.ops.aten._weight_int8pack_mm(xs[i % 4], q, s) for i, (q, s) in enumerate(q8b)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dyn = torch.ao.quantization.quantize_dynamic(Stack(ws), {nn.Linear}, dtype=torch.qint8)
    kernels["quantize_dynamic int8 (fp32 act)"] = (n, torch.float32, dyn)
    if args.compile:
        from torch import _dynamo
        from torch._inductor import config as inductor_config
        inductor_config.freezing = True
        _dynamo.config.recompile_limit = 64  # one graph per M and dtype
        for dt in (torch.float32, torch.bfloat16):
            compiled = torch.compile(Stack([w.to(dt) for w in ws]), dynamic=False)
            kernels[f"compile+freezing {dt}"] = (n * dt.itemsize, dt, compiled)
    return kernels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rows", default="1,2,3,5,8,9")
    p.add_argument("--compile", action="store_true", help="also torch.compile + freezing (slow to compile)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    if rows[0] != 1:
        rows = [1] + rows
    kernels = build(args)
    times = {(k, m): [] for k in kernels for m in rows}
    with torch.inference_mode():
        xs = {(dt, m): [torch.randn(m, i, dtype=dt) for _, i in SHAPES]
              for dt in (torch.float32, torch.bfloat16, torch.float16) for m in rows}
        for k, (_, dt, fn) in kernels.items():  # warm-up (and compilation)
            for m in rows:
                fn(xs[dt, m])
        names = list(kernels)
        for r in range(args.repeats):
            for k in names[r % len(names):] + names[:r % len(names)]:
                _, dt, fn = kernels[k]
                for m in rows:
                    t = time.perf_counter()
                    fn(xs[dt, m])
                    times[k, m].append(time.perf_counter() - t)
    print(f"{args.layers} layers, {torch.get_num_threads()} threads, {args.repeats} repeats (medians)\n")
    print("| kernel | ms (M=1) | GB/s (M=1) | " + " | ".join(f"v({m})" for m in rows[1:]) + " |")
    print("|---" * (3 + len(rows) - 1) + "|")
    for k, (nbytes, _, _) in kernels.items():
        t1 = statistics.median(times[k, 1])
        vs = " | ".join(f"{statistics.median(times[k, m]) / t1:.2f}" for m in rows[1:])
        print(f"| {k} | {t1 * 1e3:.1f} | {nbytes / t1 / 1e9:.1f} | {vs} |")


if __name__ == "__main__":
    main()
