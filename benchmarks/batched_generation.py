"""Throughput of greedy generation with several prompts decoding together (decoding/batched.py, what
`skiplayer calibrate --generation_batch B` uses), against one prompt at a time, on the same prompts.

    python benchmarks/batched_generation.py [--batch_sizes 1,4,8,16] [--dataset gsm8k] [--num_prompts 24]
        [--max_steps 64] [--dtype float16] [--repeats 2]

Prints new tokens per second (prefills included; median over repeats, batch sizes interleaved) per batch size,
its ratio to the first batch size, and whether every prompt's output equals its output there.
"""
from __future__ import annotations

import argparse
import statistics
import time

from skiplayer.data.datasets import load_dataset
from skiplayer.decoding.batched import generate_batched
from skiplayer.decoding.stopping import StopCriteria
from skiplayer.model.load import load_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--dataset", default="gsm8k")
    p.add_argument("--skip", type=int, default=100, help="start at this row of the dataset (default %(default)s)")
    p.add_argument("--num_prompts", type=int, default=24)
    p.add_argument("--max_steps", type=int, default=64)
    p.add_argument("--batch_sizes", default="1,4,8,16")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    lm = load_model(args.model, dtype=args.dtype)
    rows = list(load_dataset(args.dataset))[args.skip:args.skip + args.num_prompts]
    prompts = [lm.encode(s.prompt) for s in rows]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    tok_s = {b: [] for b in sizes}
    outputs = {}
    for r in range(args.repeats):
        for b in sizes[r % len(sizes):] + sizes[:r % len(sizes)]:
            t = time.perf_counter()
            done = list(generate_batched(lm.model, prompts, lambda i: StopCriteria(args.max_steps, lm.eos_token_ids),
                                         b))
            seconds = time.perf_counter() - t
            tok_s[b].append(sum(len(f.tokens) for f in done) / seconds)
            outputs[b] = {f.index: f.tokens for f in done}
    base = statistics.median(tok_s[sizes[0]])
    print(f"{len(prompts)} {args.dataset} prompts, <= {args.max_steps} new tokens each, {args.dtype}")
    print(f"| batch | tok/s | x batch {sizes[0]} | outputs equal batch {sizes[0]} |")
    print("|---:|---:|---:|---|")
    for b in sizes:
        m = statistics.median(tok_s[b])
        print(f"| {b} | {m:.1f} | {m / base:.2f}x | {outputs[b] == outputs[sizes[0]]} |")


if __name__ == "__main__":
    main()
