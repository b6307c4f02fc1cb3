"""Decode speed on the default model: HF generate vs our autoregressive vs our self-speculative vs HF's
assistant_early_exit, on the same prompts and token budget, interleaved and repeated.

    python benchmarks/decode_speed.py [--model smollm2-135m] [--dtype float32] [--max_steps 64] [--repeats 3]

Prints tok/s (median over repeats of total new tokens / total time over all prompts) and the ratio to HF generate.
Runs are interleaved (every configuration once per repeat, in rotating order) so machine noise hits all alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.errors import output_file
from skiplayer.model.load import load_hf, load_model
from skiplayer.policies import PolicyConfig

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "List three tips for writing clear code.",
]


def hf_runner(hf, ids, max_steps, eos, **extra):
    def run():
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=max_steps, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos[0], **extra)
        return out.shape[1] - len(ids)
    return run


def ours_runner(model, ids, max_steps, eos, strategy="autoregressive", E=8, k=4, mode="none"):
    config = GenerationConfig(max_steps=max_steps, generation_strategy=strategy,
                              policy=PolicyConfig(exit_layer=E, num_speculations=k, dynamic_early_exit_mode=mode))

    def run():
        return len(generate_ids(model, ids, config, eos)[0])
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max_steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--speculative", default="8:4,16:4,24:3", help="E:k pairs for our self-speculative")
    p.add_argument("--hf_early_exit", default="8,24", help="E values for HF assistant_early_exit ('' to skip)")
    p.add_argument("--output_json", default=None, type=output_file)
    args = p.parse_args()

    loaded = load_model(args.model, dtype=args.dtype)
    hf, _ = load_hf(loaded.hf_path, loaded.dtype)
    eos = loaded.eos_token_ids
    prompts = [loaded.encode(text) for text in PROMPTS]
    configs = {"HF generate": [hf_runner(hf, ids, args.max_steps, eos) for ids in prompts],
               "ours autoregressive": [ours_runner(loaded.model, ids, args.max_steps, eos) for ids in prompts]}
    for pair in filter(None, args.speculative.split(",")):
        E, k = map(int, pair.split(":"))
        configs[f"ours self_speculative E={E} k={k}"] = [
            ours_runner(loaded.model, ids, args.max_steps, eos, "self_speculative", E, k) for ids in prompts]
    for E in filter(None, args.hf_early_exit.split(",")):
        configs[f"HF assistant_early_exit={E}"] = [
            hf_runner(hf, ids, args.max_steps, eos, assistant_early_exit=int(E)) for ids in prompts]

    for runs in configs.values():  # warm-up
        runs[0]()
    rates = {name: [] for name in configs}
    names = list(configs)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            tokens, t = 0, time.perf_counter()
            for run in configs[name]:
                tokens += run()
            rates[name].append(tokens / (time.perf_counter() - t))
            print(f"  repeat {r + 1}: {name}: {rates[name][-1]:.2f} tok/s", flush=True)
    base = statistics.median(rates["HF generate"])
    print(f"\nmodel {args.model}, dtype {args.dtype}, {len(prompts)} prompts x {args.max_steps} new tokens, "
          f"median of {args.repeats} interleaved repeats, torch threads {torch.get_num_threads()}\n")
    print("| configuration | tok/s | vs HF generate |\n|---|---:|---:|")
    rows = []
    for name in names:
        med = statistics.median(rates[name])
        rows.append({"configuration": name, "tokens_per_second": med, "ratio_vs_hf": med / base})
        print(f"| {name} | {med:.2f} | {med / base:.2f}x |")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
