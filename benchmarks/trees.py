"""Draft sources side by side: autoregressive, self-draft chains, draft trees of fixed budgets (the draft head's
ranked candidates beside the chain), n-gram lookup, trees with n-grams and adaptive, on real prompts, in one run
per dataset.

    python benchmarks/trees.py [--datasets gsm8k human_eval mbpp xsum_summarization cnn_dm_summarization]
        [--num_samples 20] [--max_steps 128] [--draft DIR --exit_layer 4] [--hf_samples 5]
        [--chains 1,2,3,4] [--tree_budgets 4,8,16] [--tree_width 4] [--ngram_runs 4]
        [--output_json runs/trees.json] [--update_doc docs/trees.md] [--update_readme README.md]

For every sample all configurations run back to back (the order rotates per sample), so each speedup is a ratio
of tokens/s measured side by side; greedy outputs are compared with autoregressive decoding (a mismatch is counted
and printed, never hidden). Self-draft configurations need a calibrated draft (`--draft`, or the built-in one for
the default model) to pay: a vanilla model's shallow exits rarely agree with it. `--hf_samples N` adds HF
`generate` (fp32) with `prompt_lookup_num_tokens=10` and with `assistant_early_exit=E`, as ratios to plain HF
`generate` on the first N samples. The JSON is rewritten after every sample, so a stopped run keeps its work.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict

import torch

from skiplayer.bench.runner import aggregate_speed, measure, speedup, use_chat_template, warm_up
from skiplayer.bench.stamp import stamp, write_between_markers
from skiplayer.data.datasets import DATASETS, load_dataset
from skiplayer.decoding.generate import GenerationConfig
from skiplayer.errors import output_file
from skiplayer.model.load import load_model
from skiplayer.options import DEFAULT_DTYPE
from skiplayer.policies import PolicyConfig

DEFAULT_DATASETS = ["gsm8k", "human_eval", "mbpp", "xsum_summarization", "cnn_dm_summarization"]


def tree_shape(budget: int, width: int) -> dict:
    """A fixed draft tree of `budget` nodes: a chain of k = log2(budget) drafts, the draft head's ranks 2..width
    beside each, the best by draft path probability filling the budget."""
    return dict(num_speculations=max(1, round(math.log2(budget))), tree_width=width, tree_budget=budget)


def configurations(E: int, chains: list[int], runs: list[int], budgets: list[int], width: int,
                   with_self: bool) -> dict[str, dict | None]:
    c: dict[str, dict | None] = {"autoregressive": None}
    if with_self:
        for k in chains:
            c[f"chain k={k}"] = dict(exit_layer=E, num_speculations=k)
        for b in budgets:
            shape = tree_shape(b, width)
            c[f"tree B={b} k={shape['num_speculations']} W={width}"] = dict(exit_layer=E, **shape)
    for d in runs:
        c[f"ngram D={d}"] = dict(draft_source="ngram", ngram_tokens=d)
    if with_self:
        c[f"tree: chain k=1 + ngram D={runs[0]}"] = dict(exit_layer=E, num_speculations=1, draft_source="both",
                                                          ngram_tokens=runs[0])
        if budgets:
            b = budgets[len(budgets) // 2]
            shape = tree_shape(b, width)
            c[f"tree B={b} + ngram D={runs[0]}"] = dict(exit_layer=E, draft_source="both", ngram_tokens=runs[0],
                                                        **dict(shape, tree_budget=b + runs[0]))
        c["adaptive (chains)"] = dict(exit_layer=E, num_speculations=max(chains), dynamic_early_exit_mode="adaptive",
                                      min_exit_layer=E)
    c[f"adaptive + ngram D={runs[0]}"] = dict(exit_layer=E, num_speculations=max(chains), draft_source="both",
                                              dynamic_early_exit_mode="adaptive", min_exit_layer=E,
                                              ngram_tokens=runs[0])
    # the same policy without the self-draft: what the draft layers add (or cost) beside the n-gram runs
    c[f"adaptive ngram D={runs[0]} (no self-draft)"] = dict(exit_layer=E, draft_source="ngram",
                                                             dynamic_early_exit_mode="adaptive", min_exit_layer=E,
                                                             ngram_tokens=runs[0])
    if with_self and width > 1:
        c[f"adaptive trees (W={width}) + ngram D={runs[0]}"] = dict(
            exit_layer=E, num_speculations=max(chains), draft_source="both", dynamic_early_exit_mode="adaptive",
            min_exit_layer=E, ngram_tokens=runs[0], tree_width=width)
    return c


def hf_ratios(loaded, samples, chat: bool, max_steps: int, E: int) -> dict:
    """HF generate (fp32, greedy) with prompt lookup and with early-exit assistance, as ratios to plain generate."""
    from skiplayer.model.load import load_hf
    hf = load_hf(loaded.hf_path, torch.float32)[0]
    variants = {"HF generate": {}, "HF prompt_lookup_num_tokens=10": {"prompt_lookup_num_tokens": 10},
                f"HF assistant_early_exit={E}": {"assistant_early_exit": E}}
    seconds, tokens = defaultdict(float), defaultdict(int)
    for sample in samples:
        ids = torch.tensor([loaded.encode(sample.prompt, chat_template=chat)])
        for name, extra in variants.items():
            with torch.inference_mode():
                t = time.perf_counter()
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_steps,
                                  do_sample=False, pad_token_id=0, **extra)
                seconds[name] += time.perf_counter() - t
                tokens[name] += out.shape[1] - ids.shape[1]
    base = tokens["HF generate"] / seconds["HF generate"]
    return {name: {"tokens_per_second": tokens[name] / seconds[name],
                   "ratio": tokens[name] / seconds[name] / base, "samples": len(samples)} for name in variants}


def row(name: str, speeds: list[dict], ar: list[dict], mismatches: int) -> dict:
    agg = aggregate_speed(speeds)
    ratio = speedup(list(zip(speeds, ar))) if name != "autoregressive" else {"total": 1.0, "decode": 1.0}
    rounds = agg.get("rounds") or 0
    return {"configuration": name, "tokens_per_second": agg["tokens_per_second_total"],
            "speedup": ratio["total"], "decode_speedup": ratio["decode"],
            "tokens_per_pass": agg.get("tokens_per_pass") if rounds else None,
            "nodes_per_pass": agg["drafted"] / rounds + 1 if rounds else None,
            "acceptance": agg.get("acceptance_rate"),
            "accepted_self": agg.get("self_accepted", 0), "accepted_ngram": agg.get("ngram_accepted", 0),
            "accepted_sibling": agg.get("sibling_accepted", 0), "accepted_table": agg.get("table_accepted", 0),
            "acceptance_by_rank": agg.get("acceptance_by_rank"),
            "prefill_share": agg["prefill_time"] / agg["wall_time"] if agg["wall_time"] else None,
            "mismatches": mismatches, "samples": len(speeds)}


def markdown(title: str, rows: list[dict], hf: dict | None) -> list[str]:
    def f(x, spec):
        return "-" if x is None else format(x, spec)
    out = [f"**{title}**", "", "| configuration | tok/s | speedup | decode-only | tokens/pass | nodes/pass | "
           "acceptance | accepted self / sibling / ngram / table | identical |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['configuration']} | {r['tokens_per_second']:.1f} | {f(r['speedup'], '.2f')}x | "
                   f"{f(r['decode_speedup'], '.2f')}x | {f(r['tokens_per_pass'], '.2f')} | {f(r['nodes_per_pass'], '.2f')} | "
                   f"{f(r['acceptance'], '.2f')} | {r['accepted_self']} / {r.get('accepted_sibling', 0)} / "
                   f"{r['accepted_ngram']} / {r.get('accepted_table', 0)} | "
                   f"{r['samples'] - r['mismatches']}/{r['samples']} |")
    for name, h in (hf or {}).items():
        out.append(f"| {name} (HF reference, {h['samples']} samples) | {h['tokens_per_second']:.1f} | "
                   f"{h['ratio']:.2f}x of HF generate | | | | | | |")
    return out + [""]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default=DEFAULT_DTYPE)
    p.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, choices=sorted(DATASETS), metavar="NAME")
    p.add_argument("--num_samples", type=int, default=20)
    p.add_argument("--max_steps", type=int, default=128)
    p.add_argument("--exit_layer", type=int, default=4)
    p.add_argument("--chains", default="1,2,3,4", help="self-draft chain lengths k to run")
    p.add_argument("--ngram_runs", default="4", help="n-gram run lengths D to run (the first one is used in trees)")
    p.add_argument("--tree_budgets", default="4,8,16",
                   help="fixed draft trees of these node budgets (a chain of log2(B) drafts + ranked siblings)")
    p.add_argument("--tree_width", type=int, default=4, help="draft-head candidates per position in trees")
    p.add_argument("--draft", default=None, help="calibrated draft (default: the built-in one for the default model)")
    p.add_argument("--no_self_draft", action="store_true", help="run only autoregressive and n-gram configurations")
    p.add_argument("--compare_ngram_table", action="store_true",
                   help="also run each n-gram configuration without the draft's n-gram table (' (context only)')")
    p.add_argument("--only", default=None, help="comma-separated configuration names (autoregressive always runs)")
    p.add_argument("--hf_samples", type=int, default=0, help="HF generate reference rows on this many samples")
    p.add_argument("--output_json", default=None, type=output_file)
    p.add_argument("--update_doc", default=None, help="write the tables between the trees markers of this file")
    p.add_argument("--doc_marker", default="trees", help="marker name for --update_doc (default %(default)s)")
    p.add_argument("--update_readme", default=None, help="write the overall table between the results markers")
    args = p.parse_args()

    loaded = load_model(args.model, dtype=args.dtype)
    from skiplayer.draft_artifact import resolve_draft
    draft = resolve_draft(args.draft, loaded)  # n-gram configurations use its n-gram table, if it has one
    configs = configurations(args.exit_layer, [int(x) for x in args.chains.split(",")],
                             [int(x) for x in args.ngram_runs.split(",")],
                             [int(x) for x in args.tree_budgets.split(",") if x], args.tree_width,
                             not args.no_self_draft)
    if args.compare_ngram_table:
        for name, policy in list(configs.items()):
            if policy and policy.get("draft_source") in ("ngram", "both"):
                configs[f"{name} (context only)"] = dict(policy, ngram_table=False)
    if args.only:
        wanted = {"autoregressive", *(x.strip() for x in args.only.split(","))}
        if wanted - set(configs):
            raise SystemExit(f"--only: unknown configuration(s) {sorted(wanted - set(configs))}; "
                             f"choose from {list(configs)}")
        configs = {k: v for k, v in configs.items() if k in wanted}
    names = list(configs)
    header = stamp("benchmarks/trees.py")
    print(header)
    report = {"header": header, "args": vars(args), "draft": getattr(draft, "path", None), "tables": {}}
    speeds = {d: defaultdict(list) for d in args.datasets}
    mismatches = {d: defaultdict(int) for d in args.datasets}
    lines = [header, ""]
    for dataset in args.datasets:
        spec = DATASETS[dataset]
        samples = load_dataset(dataset, num_samples=args.num_samples)
        chat = use_chat_template(argparse.Namespace(no_chat_template=False), dataset)
        generation = {name: GenerationConfig(
            max_steps=args.max_steps, stop_words=list(spec.stop_words),
            generation_strategy="autoregressive" if policy is None else "self_speculative",
            policy=PolicyConfig(**policy) if policy else PolicyConfig()) for name, policy in configs.items()}
        warm_up(loaded, samples, generation.values(), 1, chat, draft)  # first calls pay one-off costs
        for i, sample in enumerate(samples):
            ids = {}
            for name in names[i % len(names):] + names[:i % len(names)]:
                result = measure(loaded, sample, generation[name], chat, draft=draft)
                speeds[dataset][name].append(result["speed"])
                ids[name] = result["token_ids"]
            for name in names:
                if ids[name] != ids["autoregressive"]:
                    mismatches[dataset][name] += 1
                    print(f"  MISMATCH: {dataset} sample {sample.id}, {name}", flush=True)
            rows = [row(n, speeds[dataset][n], speeds[dataset]["autoregressive"], mismatches[dataset][n])
                    for n in names]
            report["tables"][dataset] = {"rows": rows}
            if args.output_json:
                with open(args.output_json, "w") as f:
                    json.dump(report, f, indent=1)
            print(f"  {dataset} {i + 1}/{len(samples)}: " + ", ".join(
                f"{r['configuration']} {r['speedup']:.2f}x" for r in rows[1:] if r["speedup"]), flush=True)
        hf = hf_ratios(loaded, samples[:args.hf_samples], chat, args.max_steps, args.exit_layer) \
            if args.hf_samples else None
        report["tables"][dataset]["hf"] = hf
        title = f"{dataset}: {len(samples)} samples, {args.max_steps} new tokens"
        table = markdown(title, report["tables"][dataset]["rows"], hf)
        print("\n" + "\n".join(table), flush=True)
        lines += table
    overall = [row(n, [s for d in args.datasets for s in speeds[d][n]],
                   [s for d in args.datasets for s in speeds[d]["autoregressive"]],
                   sum(mismatches[d][n] for d in args.datasets)) for n in names]
    report["tables"]["overall"] = {"rows": overall}
    lines += markdown(f"all datasets ({', '.join(args.datasets)})", overall, None)
    print("\n".join(lines[-len(overall) - 5:]))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=1)
    if args.update_doc:
        write_between_markers(args.update_doc, args.doc_marker, lines)
    if args.update_readme:
        counts = {d: len(speeds[d]["autoregressive"]) for d in args.datasets}  # a dataset may hold fewer
        title = (f"{', '.join(args.datasets)}: {args.num_samples} samples each" if set(counts.values()) ==
                 {args.num_samples} else "samples: " + ", ".join(f"{d} {n}" for d, n in counts.items()))
        write_between_markers(args.update_readme, "results", [header, ""] + markdown(
            f"{title}; {args.max_steps} new tokens", overall, None))


if __name__ == "__main__":
    main()
