"""`skiplayer correctness`: greedy self-speculative decoding (any exit layer, k, mode, skipping) must produce exactly
the tokens greedy autoregressive decoding produces. Runs both on N samples of a dataset and reports, per sample,
whether the token ids match and the first position where they differ. Exit status 1 on any mismatch, else 0.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from skiplayer.bench.runner import (
    use_chat_template,
    command_line, config_dict, dataset_names, dataset_settings, first_difference, load_samples, measure,
    model_record, with_strategy, write_json,
)
from skiplayer.errors import check

AR = "autoregressive"


def add_arguments(p) -> None:
    from skiplayer.bench.runner import add_dataset_arguments, set_help
    from skiplayer.options import add_generation_arguments, add_model_arguments
    add_model_arguments(p)
    add_dataset_arguments(p, quick_samples=5, quick_steps=64)
    add_generation_arguments(p)
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, help="also write the JSON report to this file")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: all available cores)")
    p.set_defaults(generation_strategy="self_speculative", max_steps=None)
    set_help(p, "max_steps", "maximum new tokens (default: the dataset's own; 64 without --dataset)")
    set_help(p, "stop_words", "stop when the text contains one of these (default: the dataset's own; "
                              "give the flag with no words for none)")


def run(args) -> int:
    from skiplayer.bench.distributed import available_cores
    from skiplayer.options import generation_config, load_from_args
    import torch

    check(not args.sample, "correctness compares greedy outputs: drop --sample")
    check(args.generation_strategy != AR, "correctness compares self_speculative against autoregressive: "
                                          "use --generation_strategy self_speculative")
    check(args.threads is None or args.threads >= 1, f"--threads must be >= 1 (got {args.threads})")
    torch.set_num_threads(args.threads or available_cores())
    names, quick = dataset_names(args)
    settings = dataset_settings(args, names[0], quick)
    samples = load_samples(settings, args.offline)
    loaded, draft = load_from_args(args)
    config = generation_config(args, max_steps=settings["max_steps"], stop_words=settings["stop_words"])
    config.validate(loaded.model.n_layers)
    reference = with_strategy(config, AR)
    chat = use_chat_template(args, names[0])
    per_sample = []
    for sample in samples:
        ar = measure(loaded, sample, reference, chat, draft)
        ss = measure(loaded, sample, config, chat, draft)
        diff = first_difference(ss["token_ids"], ar["token_ids"])
        entry = {"id": sample.id, "match": diff is None, "first_difference": diff,
                 "autoregressive_tokens": len(ar["token_ids"]), "self_speculative_tokens": len(ss["token_ids"]),
                 "acceptance_rate": ss["speed"]["acceptance_rate"]}
        if diff is not None:
            entry["autoregressive_token"] = ar["token_ids"][diff] if diff < len(ar["token_ids"]) else None
            entry["self_speculative_token"] = ss["token_ids"][diff] if diff < len(ss["token_ids"]) else None
            entry["autoregressive_output"] = ar["output"]
            entry["self_speculative_output"] = ss["output"]
        per_sample.append(entry)
        print(f"{sample.id}: {'ok' if diff is None else f'MISMATCH at token {diff}'}", file=sys.stderr)
    mismatches = sum(not e["match"] for e in per_sample)
    report = {"kind": "correctness", **command_line(args),
              "configuration": {**settings, **model_record(loaded, args, draft), "generation": config_dict(config)},
              "samples": len(per_sample), "mismatches": mismatches,
              "mismatch_percentage": 100.0 * mismatches / len(per_sample) if per_sample else 0.0,
              "passed": mismatches == 0, "per_sample": per_sample}
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, report)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"{mismatches} of {len(per_sample)} samples differ ({report['mismatch_percentage']:.1f}%)"
          + ("" if mismatches else ": self-speculative output is identical to autoregressive"), file=sys.stderr)
    return 1 if mismatches else 0
