"""Draft policies side by side on the default model: autoregressive, static exits, every dynamic mode, layer
skipping, a combination, and adaptive, on real prompts from three datasets.

    python benchmarks/policies.py [--num_samples 10] [--max_steps 64] [--datasets xsum_summarization,gsm8k,human_eval]
        [--draft DIR]     # a `skiplayer calibrate` artifact: adapters at its layers, its reduced vocabulary for
                          # every draft head and probe

For every sample all configurations run back to back (rotating order), so each speedup is a ratio of tokens/s
measured side by side in one run. Prints one markdown table per dataset and an overall one; greedy outputs are
checked against autoregressive (a mismatch is reported, never hidden).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

from skiplayer.bench.runner import measure, use_chat_template
from skiplayer.data.datasets import DATASETS, load_dataset
from skiplayer.decoding.generate import GenerationConfig
from skiplayer.draft_artifact import load_draft
from skiplayer.errors import output_file
from skiplayer.model.load import load_model
from skiplayer.options import DEFAULT_DTYPE
from skiplayer.policies import PolicyConfig


def configurations(E: int, k: int, draft_layers: list[int]) -> dict[str, dict | None]:
    c = {"autoregressive": None}
    for e in draft_layers:
        c[f"static E={e}"] = dict(exit_layer=e)
    for mode in ("consistent_tokens", "random", "logits_current", "logits_future"):
        c[mode] = dict(exit_layer=E, dynamic_early_exit_mode=mode, min_exit_layer=max(1, E // 3))
    for p in (0.1, 0.25):
        c[f"static E={E} + skip p={p}"] = dict(exit_layer=E, layer_skip_proportion=p)
    c["combo: logits_current + skip p=0.1"] = dict(exit_layer=E, dynamic_early_exit_mode="logits_current",
                                                   layer_skip_proportion=0.1, min_exit_layer=max(1, E // 3))
    c["adaptive"] = dict(exit_layer=E, dynamic_early_exit_mode="adaptive", min_exit_layer=max(1, E // 4))
    return {name: (None if v is None else {"num_speculations": k} | v) for name, v in c.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, help="weight dtype (default %(default)s, as the CLI)")
    p.add_argument("--datasets", default="xsum_summarization,gsm8k,human_eval")
    p.add_argument("--num_samples", type=int, default=10)
    p.add_argument("--max_steps", type=int, default=64)
    p.add_argument("--exit_layer", type=int, default=24, help="E for the dynamic modes (their maximum depth)")
    p.add_argument("--num_speculations", type=int, default=4)
    p.add_argument("--static_layers", default="8,16,24")
    p.add_argument("--only", default=None, help="comma-separated configuration names to run (autoregressive always "
                   "runs), e.g. --only adaptive")
    p.add_argument("--draft", default=None, help="calibrated draft artifact (skiplayer calibrate)")
    p.add_argument("--output_json", default=None, type=output_file)
    args = p.parse_args()

    loaded = load_model(args.model, dtype=args.dtype)
    draft = load_draft(args.draft, loaded) if args.draft else None
    configs = configurations(args.exit_layer, args.num_speculations, [int(x) for x in args.static_layers.split(",")])
    if args.only:
        wanted = {"autoregressive", *(x.strip() for x in args.only.split(","))}
        unknown = wanted - set(configs)
        if unknown:
            raise SystemExit(f"--only: unknown configuration(s) {sorted(unknown)}; choose from {list(configs)}")
        configs = {k: v for k, v in configs.items() if k in wanted}
    names = list(configs)
    totals = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    for dataset in args.datasets.split(","):
        spec = DATASETS[dataset]
        samples = load_dataset(dataset, num_samples=args.num_samples)
        chat = use_chat_template(argparse.Namespace(no_chat_template=False), dataset)
        for i, sample in enumerate(samples):
            reference = None
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                policy = configs[name]
                config = GenerationConfig(max_steps=args.max_steps, stop_words=list(spec.stop_words),
                                          generation_strategy="autoregressive" if policy is None else "self_speculative",
                                          policy=PolicyConfig(**policy) if policy else PolicyConfig())
                result = measure(loaded, sample, config, chat, draft=draft)
                speed = result["speed"]
                t = totals[dataset][name]
                t["tokens"] += speed["new_tokens"]
                t["seconds"] += speed["wall_time"]
                t["drafted"] += speed["drafted"]
                t["accepted"] += speed["accepted"]
                t["exit_sum"] += sum(int(k) * v for k, v in speed.get("exit_layer_histogram", {}).items())
                t["probe_heads"] += speed.get("probe_heads", 0)
                result_ids = result["token_ids"]
                if name == "autoregressive":
                    reference = result_ids
                t["_ids_" + str(i)] = result_ids  # compared below
            for name in names:
                if totals[dataset][name].pop("_ids_" + str(i)) != reference:
                    totals[dataset][name]["mismatches"] += 1
            print(f"  {dataset} sample {i + 1}/{len(samples)} done", flush=True)

    def table(title, rows):
        ar = rows["autoregressive"]["tokens"] / rows["autoregressive"]["seconds"]
        print(f"\n### {title}\n\n| configuration | acceptance | tok/s | speedup vs AR | mean exit layer | probe heads | "
              f"greedy mismatches |\n|---|---:|---:|---:|---:|---:|---:|")
        out = []
        for name in names:
            t = rows[name]
            tps = t["tokens"] / t["seconds"]
            acc = t["accepted"] / t["drafted"] if t["drafted"] else None
            mean_exit = t["exit_sum"] / t["drafted"] if t["drafted"] else None
            out.append({"configuration": name, "acceptance_rate": acc, "tokens_per_second": tps, "speedup": tps / ar,
                        "mean_exit_layer": mean_exit, "probe_heads": t["probe_heads"],
                        "mismatches": int(t["mismatches"])})
            print(f"| {name} | {'-' if acc is None else f'{acc:.3f}'} | {tps:.2f} | {tps / ar:.2f}x | "
                  f"{'-' if mean_exit is None else f'{mean_exit:.1f}'} | {int(t['probe_heads'])} | {int(t['mismatches'])} |")
        return out

    report = {dataset: table(dataset, rows) for dataset, rows in totals.items()}
    overall = defaultdict(lambda: defaultdict(float))
    for rows in totals.values():
        for name, t in rows.items():
            for key, value in t.items():
                overall[name][key] += value
    report["overall"] = table(f"all datasets ({args.num_samples} samples each, {args.max_steps} new tokens)", overall)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "tables": report}, f, indent=2)


if __name__ == "__main__":
    main()
