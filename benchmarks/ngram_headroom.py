"""How far n-gram drafting can go on this machine, and what would move it: replayed rounds on real outputs.

    python benchmarks/ngram_headroom.py [--datasets gsm8k human_eval mbpp xsum_summarization cnn_dm_summarization]
        [--num_samples 20] [--max_steps 128] [--max_run 8] [--output_json out.json] [--update_doc docs/trees.md]

The model first decodes each prompt greedily (its own outputs, as a lossless run emits them), autoregressively and
with `adaptive` n-gram drafting (`--draft_source ngram`, the n-gram table on), side by side: the measured decode-only
speedup and tokens per pass are the last row, for comparison with the replayed ones. Then drafting rounds are
replayed on those outputs, with the draft's n-gram lookup (context, then the n-gram table) as it drafts in decoding:
each round proposes a run, the matching prefix is accepted plus one verified token, and the round costs v(n) for
the n positions verified, from the cost profile `adaptive` measures at start-up (v(n) between its short and long
context by the round's context, in units of one decode step). Per dataset, tokens per pass and tokens per unit of
cost (the decode-only speedup if the rounds cost nothing else) for:
  run of D          every round proposes up to D tokens (D = 2, 4: `ngram D=` of benchmarks/trees.py)
  best D per order  per matched suffix length (context 1-3, table 1-3) the D with the highest rate, D <= 4 (the
                    default --ngram_tokens) and D <= --max_run: the best any policy that knows only the match order
                    can do (`adaptive` learns this online)
  oracle length     each run cut to exactly what will be accepted: no policy can beat it (the rejected tail costs
                    nothing); the headroom of smarter run lengths
and, for the best D <= --max_run per order, the same with every extra verified position costing half as much
(v'(n) = 1 + (v(n) - 1) / 2): what a cheaper wide pass (attention rows, per-row work) would bring.
"""
from __future__ import annotations

import argparse
import json

from skiplayer.bench.runner import measure, speedup, sum_speed, use_chat_template, warm_up
from skiplayer.bench.stamp import stamp, write_between_markers
from skiplayer.data.datasets import DATASETS, load_dataset
from skiplayer.decoding.costs import profile_costs
from skiplayer.decoding.generate import GenerationConfig
from skiplayer.draft_artifact import resolve_draft
from skiplayer.drafts.ngram import NGramLookup
from skiplayer.errors import output_file
from skiplayer.model.load import load_model
from skiplayer.options import DEFAULT_DTYPE
from skiplayer.policies import PolicyConfig

NGRAM_MAX = PolicyConfig.ngram_max  # the longest suffix the lookup matches, as decoding's default


def accepted(run: list[int], output: list[int], i: int) -> int:
    """How many tokens of `run` match output[i:], leaving the last output token to the verification."""
    a = 0
    while a < len(run) and i + a < len(output) - 1 and run[a] == output[i + a]:
        a += 1
    return a


def replay(pairs, table, max_run: int, length, v) -> tuple[float, float]:
    """(tokens per pass, tokens per unit of cost) of rounds over (prompt, output) pairs; length(run, order, a) is
    how many tokens of the proposed run the round verifies (a: how many would be accepted). As in decoding, the
    first output token comes from the prefill and the lookup starts from the prompt and that token."""
    tokens = passes = cost = 0.0
    for prompt, output in pairs:
        lookup = NGramLookup(NGRAM_MAX, 1, max_run, table)
        lookup.extend(prompt + output[:1])
        i = 1
        while i < len(output):
            run = lookup.propose(max_run)
            run = run[:length(run, lookup.order, accepted(run, output, i))]
            new = output[i:i + accepted(run, output, i) + 1]
            cost += v(len(prompt) + i, len(run) + 1)
            lookup.extend(new)
            i += len(new)
            tokens, passes = tokens + len(new), passes + 1
    return tokens / passes, tokens / cost


def best_length_per_order(pairs, table, max_run: int, v, longest: int) -> dict[int, int]:
    """Per match order, the run length <= longest that maximises the replayed rate (coordinate ascent from D = 4:
    each order's D in turn, the others held)."""
    orders = [*range(1, NGRAM_MAX + 1), *range(-(table.max_ngram if table else 0), 0)]  # context, then table
    choice = {o: min(4, longest) for o in orders}
    best = replay(pairs, table, max_run, lambda r, o, a: choice.get(o, 0), v)[1]
    for _ in range(2):
        for o in orders:
            for d in range(longest + 1):
                trial = {**choice, o: d}
                rate = replay(pairs, table, max_run, lambda r, order, a: trial.get(order, 0), v)[1]
                if rate > best + 1e-9:
                    best, choice = rate, trial
    return choice


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default=DEFAULT_DTYPE)
    p.add_argument("--draft", default=None, help="draft whose n-gram table drafts (default: the built-in one)")
    p.add_argument("--datasets", nargs="+", default=["gsm8k", "human_eval", "mbpp", "xsum_summarization",
                                                     "cnn_dm_summarization"])
    p.add_argument("--num_samples", type=int, default=20)
    p.add_argument("--max_steps", type=int, default=128)
    p.add_argument("--max_run", type=int, default=8, help="longest run a round may verify")
    p.add_argument("--output_json", type=output_file, default=None)
    p.add_argument("--update_doc", default=None, help="write the table between the ngram_headroom markers")
    args = p.parse_args()
    for name in args.datasets:
        if name not in DATASETS:
            raise SystemExit(f"--datasets: unknown dataset '{name}'; choose from {sorted(DATASETS)}")

    loaded = load_model(args.model, dtype=args.dtype)
    draft = resolve_draft(args.draft, loaded)
    table = getattr(draft, "ngrams", None)
    costs = profile_costs(loaded.model, args.max_run + 1)

    def v(context: int, n: int) -> float:
        costs.context = context
        return costs.verify_at(n)

    def v_half(context: int, n: int) -> float:
        return 1 + (v(context, n) - 1) / 2

    header = stamp("benchmarks/ngram_headroom.py")
    print(header)
    report = {"header": header, "args": vars(args), "table_entries": len(table) if table else 0,
              "v_short": costs.verify, "v_long": costs.verify_long, "long_context": costs.long_context,
              "datasets": {}}
    for name in args.datasets:
        spec = DATASETS[name]
        chat = use_chat_template(argparse.Namespace(no_chat_template=False), name)
        ar = GenerationConfig(max_steps=args.max_steps, stop_words=list(spec.stop_words))
        ngram = GenerationConfig(max_steps=args.max_steps, stop_words=list(spec.stop_words),
                                 generation_strategy="self_speculative",
                                 policy=PolicyConfig(draft_source="ngram", dynamic_early_exit_mode="adaptive"))
        samples = load_dataset(name, num_samples=args.num_samples)
        warm_up(loaded, samples, [ar, ngram], 1, chat, draft)
        pairs, timed = [], []
        for i, sample in enumerate(samples):
            runs = {}
            for which in (["ar", "ngram"] if i % 2 == 0 else ["ngram", "ar"]):
                runs[which] = measure(loaded, sample, ar if which == "ar" else ngram, chat, draft=draft)
            if runs["ar"]["token_ids"] != runs["ngram"]["token_ids"]:
                print(f"  MISMATCH: {name} sample {sample.id}", flush=True)
            pairs.append((loaded.encode(sample.prompt, chat_template=chat), runs["ar"]["token_ids"]))
            timed.append((runs["ngram"]["speed"], runs["ar"]["speed"]))
        choice = best_length_per_order(pairs, table, args.max_run, v, args.max_run)
        per_order = lambda r, o, a: choice.get(o, 0)  # noqa: E731
        rows = {f"run of {d}": replay(pairs, table, args.max_run, lambda r, o, a, d=d: d, v) for d in (2, 4)}
        short = best_length_per_order(pairs, table, args.max_run, v, 4)
        rows["best D <= 4 per order"] = replay(pairs, table, args.max_run, lambda r, o, a: short.get(o, 0), v)
        rows[f"best D <= {args.max_run} per order"] = replay(pairs, table, args.max_run, per_order, v)
        rows["oracle length"] = replay(pairs, table, args.max_run, lambda r, o, a: a, v)
        rows[f"best D <= {args.max_run} per order, half the per-row cost"] = replay(
            pairs, table, args.max_run, per_order, v_half)
        rows["measured: adaptive n-gram decoding"] = (sum_speed([s for s, _ in timed])["tokens_per_pass"],
                                                      speedup(timed)["decode"])
        report["datasets"][name] = {"best_length_per_order": choice, "output_tokens": sum(len(o) for _, o in pairs),
                                    "rows": {k: {"tokens_per_pass": t, "rate": r} for k, (t, r) in rows.items()}}
        print(name, {k: f"{t:.2f} / {r:.3f}" for k, (t, r) in rows.items()}, "D per order", choice, flush=True)
        if args.output_json:  # after every dataset: a stopped run keeps what it measured
            with open(args.output_json, "w") as f:
                json.dump(report, f, indent=1)

    names = list(next(iter(report["datasets"].values()))["rows"])
    lines = [header, "", "Tokens per pass / tokens per unit of cost (decode step = 1; the decode-only speedup if "
             "rounds cost nothing else):", "",
             "| rounds | " + " | ".join(report["datasets"]) + " |", "|---|" + "---|" * len(report["datasets"])]
    for row in names:
        cells = [report["datasets"][d]["rows"][row] for d in report["datasets"]]
        lines.append(f"| {row} | " + " | ".join(f"{c['tokens_per_pass']:.2f} / {c['rate']:.2f}x" for c in cells)
                     + " |")
    v_row = lambda vs: " / ".join(f"{x:.2f}" for x in vs[2:args.max_run + 2])  # noqa: E731
    lines += ["", f"v(2..{args.max_run + 1}) profiled at {costs.profile_context} tokens: {v_row(costs.verify)}"
              + (f"; at {costs.long_context}: {v_row(costs.verify_long)}" if costs.verify_long else "")
              + f". n-gram table: {report['table_entries']} entries."]
    print("\n".join(lines))
    if args.update_doc:
        write_between_markers(args.update_doc, "ngram_headroom", lines)


if __name__ == "__main__":
    main()
