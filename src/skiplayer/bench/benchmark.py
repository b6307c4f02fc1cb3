"""`skiplayer benchmark`: one strategy (and, by default, autoregressive side by side) over a dataset.

Per sample both strategies run back to back in the same process, the first one alternating between samples,
so the speedup is a ratio of measurements taken under the same conditions. Each finished sample is one line of
DIR/samples.jsonl, written and fsynced before the next sample starts; --resume continues after the last complete
line. DIR/summary.json holds configuration, environment, task metrics and speed per strategy, and the speedup.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from skiplayer.bench import distributed
from skiplayer.bench.runner import (
    use_chat_template,
    RowStore, aggregate_speed, check_output_dir, check_run_args, command_line, config_dict, dataset_names,
    dataset_settings, environment, first_difference, load_samples, measure, merge_histograms,
    model_record, output_dir, primary_metric, score, speedup, warm_up, with_strategy, write_json,
)
from skiplayer.errors import UserError

AR, SS = "autoregressive", "self_speculative"
QUICK_EXIT_FRACTION = 0.8   # no draft and no --exit_layer: E = 80% of the model's depth (24 of 30 layers)


EPILOG = """outputs (DIR = --output_dir):
  DIR/summary.json   configuration, environment, task metrics and speed per strategy, speedup, exit histogram
  DIR/samples.jsonl  one line per finished sample (fsynced); --resume continues after the last complete one

examples:
  skiplayer benchmark                                   quick run: 5 HumanEval samples, 64 new tokens
  skiplayer benchmark --dataset gsm8k --n_shot 8 --num_samples 100 --exit_layer 8 --num_speculations 6
  skiplayer benchmark --dataset custom_jsonl --data_path my.jsonl --output_dir runs/mine --resume
  torchrun --nproc_per_node 2 -m skiplayer benchmark ...   samples sharded over 2 processes, one merged result
"""


def add_arguments(p) -> None:
    from skiplayer.bench.runner import add_dataset_arguments, add_run_arguments, set_help
    from skiplayer.options import add_generation_arguments, add_model_arguments
    add_model_arguments(p)
    add_dataset_arguments(p, quick_samples=5, quick_steps=64, quick_extra=", --exit_layer 80%% of the model depth")
    add_generation_arguments(p)
    g = p.add_argument_group("comparison")
    g.add_argument("--compare_autoregressive", action="store_true", default=True,
                   help="also run autoregressive on every sample, interleaved, for the speedup (default on)")
    g.add_argument("--no_compare_autoregressive", dest="compare_autoregressive", action="store_false",
                   help="run only --generation_strategy")
    add_run_arguments(p, "benchmark")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    set_help(p, "exit_layer", "draft exit layer E, max depth for dynamic modes (default 8; in the quick run "
                              "80%% of the model's depth)")
    p.set_defaults(generation_strategy=SS, max_steps=None, exit_layer=None)


def fill_unset(args, draft, n_layers: int, quick: bool) -> None:
    """The exit layer, where the user left it unset and the draft did not set it (options.load_from_args). The
    policy flags were set before loading (options.fill_policy_defaults: the quick run always takes the best measured
    configuration for those left unset)."""
    if args.exit_layer is None:
        if draft is not None:
            args.exit_layer = draft.exit_layers[0]
        else:   # a depth where an untrained model's drafts get accepted at all
            args.exit_layer = max(1, round(QUICK_EXIT_FRACTION * n_layers)) if quick else 8


def strategies_for(args, config) -> list[str]:
    if config.generation_strategy == AR or not args.compare_autoregressive:
        return [config.generation_strategy]
    return [config.generation_strategy, AR]


def run(args) -> int:
    from skiplayer.options import fill_policy_defaults, generation_config, load_from_args

    names, quick = dataset_names(args)
    settings = dataset_settings(args, names[0], quick)
    check_run_args(args)
    dist, device = distributed.init(args.device, args.threads)
    try:
        args.device = device
        samples = load_samples(settings, args.offline)
        fill_policy_defaults(args, best=quick)
        loaded, draft = load_from_args(args)
        fill_unset(args, draft, loaded.model.n_layers, quick)
        config = generation_config(args, max_steps=settings["max_steps"], stop_words=settings["stop_words"])
        config.validate(loaded.model.n_layers)
        strategies = strategies_for(args, config)
        configs = {s: with_strategy(config, s) for s in strategies}
        for c in configs.values():
            c.validate(loaded.model.n_layers)
        out_dir = output_dir(args, "benchmark", settings["dataset"], dist)
        args.output_dir = str(out_dir)
        configuration = {**settings, **model_record(loaded, args, draft), "generation": config_dict(config),
                         "strategies": strategies, "compare_autoregressive": len(strategies) > 1,
                         "execute_code": args.execute_code, "warmup": args.warmup}
        return _run(args, dist, loaded, draft, samples, configs, configuration, out_dir)
    finally:
        dist.close()


def _run(args, dist, loaded, draft, samples, configs, configuration, out_dir: Path) -> int:
    index = {s.id: i for i, s in enumerate(samples)}
    store = RowStore(out_dir, "samples", key=lambda r: r["id"], order=lambda r: r.get("index", 0),
                     rank=dist.rank, world_size=dist.world_size)
    summary_path = out_dir / "summary.json"
    resuming = check_output_dir(out_dir, store, args.resume, configuration, summary_path)
    head = {"kind": "benchmark", "status": "running", **command_line(args), "output_dir": str(out_dir),
            "configuration": configuration}
    if resuming or args.resume:
        head = keep_first_command(head, summary_path)
    dist.barrier()   # every rank has checked the directory before rank 0 writes to it
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        store.consolidate()
        if not resuming or not summary_path.exists():
            write_json(summary_path, {**head, "environment": environment(loaded, dist.world_size)})
    dist.barrier()
    done = {key for key in store.load() if key in index}
    todo = dist.shard([s for s in samples if s.id not in done])
    if dist.is_main and done:
        print(f"[skiplayer] resuming {out_dir}: {len(done)} of {len(samples)} samples done", file=sys.stderr)

    chat = use_chat_template(args, configuration["dataset"])
    strategies = list(configs)
    warm_up(loaded, todo, configs.values(), args.warmup, chat, draft)
    progress = _progress(args, dist, len(todo), configuration["dataset"])
    running: list[dict] = []
    for sample in todo:
        i = index[sample.id]
        row = measure_sample(loaded, draft, sample, i, configs, strategies, configuration, args.execute_code, chat)
        store.append(row)
        running.append(row)
        if progress is not None:
            progress.update(1)
            progress.set_postfix_str(_postfix(running, strategies), refresh=False)
    if progress is not None:
        progress.close()
    dist.barrier()
    if dist.is_main:
        rows = store.consolidate()
        rows = [r for r in rows if r.get("id") in index]
        summary = {**head, "environment": environment(loaded, dist.world_size), **summarize(rows, strategies)}
        summary["status"] = "complete" if len(rows) == len(samples) else "incomplete"
        summary["samples_total"] = len(samples)
        write_json(summary_path, summary)
        print(render(summary))
        print(f"\nresults: {summary_path} and {store.main}")
    dist.barrier()
    return 0


def keep_first_command(head: dict, summary_path: Path) -> dict:
    """A resumed run keeps the command that started it; the resuming commands are listed under "resumed"."""
    import json
    try:
        old = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return head
    if not isinstance(old, dict) or "command" not in old:
        return head
    resumed = list(old.get("resumed") or []) + [head["command"]]
    return {**head, "command": old["command"], "argv": old.get("argv"), "resumed": resumed}


def measure_sample(loaded, draft, sample, i: int, configs: dict, strategies: list[str], configuration: dict,
                   execute_code: bool, chat: bool) -> dict:
    """Run every strategy on one sample, the first one alternating with the sample index; one samples.jsonl row."""
    order = strategies if i % 2 == 0 else strategies[::-1]
    results = {}
    try:
        for name in order:
            results[name] = measure(loaded, sample, configs[name], chat, draft)
    except UserError as e:   # e.g. a prompt longer than the model's context: recorded, not fatal to the run
        return {"index": i, "id": sample.id, "prompt": sample.prompt, "reference": sample.reference,
                "skipped": str(e)}
    main = strategies[0]
    for name in strategies:
        results[name]["metrics"] = score(configuration["metric"], results[name]["output"], sample, execute_code)
    row = {"index": i, "id": sample.id, "prompt": sample.prompt, "reference": sample.reference,
           "output": results[main]["output"], "metrics": results[main]["metrics"], "order": order}
    if sample.turns:
        row["turns"] = sample.turns
    if AR in results and len(results) > 1:
        greedy = not configs[main].sampling.sample
        diff = first_difference(results[main]["token_ids"], results[AR]["token_ids"])
        row["equals_autoregressive"] = (diff is None) if greedy else None
        row["first_difference"] = diff if greedy else None
        ar_rate = results[AR]["speed"]["tokens_per_second"]
        row["speedup"] = results[main]["speed"]["tokens_per_second"] / ar_rate if ar_rate else None
    for name in strategies:
        results[name]["num_tokens"] = len(results[name].pop("token_ids"))
    row["results"] = results
    return row


def summarize(rows: list[dict], strategies: list[str]) -> dict:
    """Aggregate samples.jsonl rows into the summary's metrics / speed / speedup / equality sections."""
    from skiplayer.metrics.tasks import aggregate
    measured = [r for r in rows if "results" in r]
    out = {"samples": len(measured), "skipped": [{"id": r["id"], "reason": r["skipped"]}
                                                 for r in rows if "skipped" in r],
           "metrics": {}, "speed": {}}
    for name in strategies:
        out["metrics"][name] = aggregate([r["results"][name]["metrics"] for r in measured])
        out["speed"][name] = aggregate_speed([r["results"][name]["speed"] for r in measured])
    main = strategies[0]
    if len(strategies) > 1:
        out["speedup"] = speedup([(r["results"][main]["speed"], r["results"][AR]["speed"]) for r in measured])
        compared = [r for r in measured if r.get("equals_autoregressive") is not None]
        out["equality"] = {"compared": len(compared),
                           "identical": sum(r["equals_autoregressive"] for r in compared),
                           "mismatches": sum(not r["equals_autoregressive"] for r in compared),
                           "mismatch_ids": [r["id"] for r in compared if not r["equals_autoregressive"]]}
    else:
        out["speedup"] = None
        out["equality"] = None
    hist = merge_histograms(r["results"][main]["speed"].get("exit_layer_histogram") for r in measured)
    out["exit_layer_histogram"] = hist
    out["mean_exit_layer"] = out["speed"][main].get("mean_exit_layer") if measured else None
    return out


# Task metrics printed per metric kind (summary.json keeps every score). Code is judged by execution only.
TASK_METRICS = {"gsm8k": ("accuracy",), "multiple_choice": ("accuracy",), "boolq": ("accuracy",),
                "nq_open": ("exact_match", "f1"), "text": ("rougeL", "bleu"), "human_eval": ("pass@1",)}
CODE_DATASETS = {"human_eval", "mbpp"}


def task_metric_lines(summary: dict) -> list[tuple[str, str]]:
    """(label, value) lines for the task metrics that fit the dataset: pass@1 for code (or why it is off), accuracy,
    EM/F1 for short answers, ROUGE-L/BLEU for text; never text-overlap scores for code."""
    conf = summary["configuration"]
    if conf["dataset"] in CODE_DATASETS:
        if conf["metric"] != "human_eval":
            return [("pass@1", f"not measured for {conf['dataset']} (no test execution)")]
        if not conf.get("execute_code"):
            return [("pass@1", "off (--execute_code)")]
    lines = []
    for name in TASK_METRICS.get(conf["metric"], ()):
        values = [(s, summary["metrics"].get(s, {}).get(name)) for s in conf["strategies"]]
        if all(v is None for _, v in values):
            continue
        shown = [f"{v:.3f}" if v is not None else "-" for _, v in values]
        if len(values) > 1:
            shown = [f"{text} ({s})" for (s, _), text in zip(values, shown)]
        lines.append((name, ", ".join(shown)))
    return lines


def render(summary: dict) -> str:
    """The plain summary printed at the end of a benchmark: tok/s per strategy, ONE speedup (total tokens / total
    time) with its decoding-only part, acceptance, tokens per verify pass, output equality, task metrics."""
    conf = summary["configuration"]
    gen = conf["generation"]
    policy = gen["policy"]
    greedy = not gen["sampling"]["sample"]
    weights = f", weights {conf['weights']}" if conf.get("weights") else ""
    lines = [f"benchmark {conf['dataset']} | model {conf['model']} ({conf['n_layers']} layers, {conf['dtype']}"
             f"{weights}) | "
             f"{summary['samples']} samples | max_steps {conf['max_steps']} | {'greedy' if greedy else 'sampling'}"]
    if SS in conf["strategies"]:
        drafts = {"self": "early exit", "ngram": "n-gram lookup",
                  "both": "token trees of early exit + n-gram lookup"}.get(policy.get("draft_source", "self"))
        draft = f", draft {conf['draft']}" if conf.get("draft") else ""
        lines.append(f"self_speculative: drafts from {drafts}{draft} | exit_layer {policy['exit_layer']}, "
                     f"num_speculations {policy['num_speculations']}, mode {policy['dynamic_early_exit_mode']}, "
                     f"layer_skip_proportion {policy['layer_skip_proportion']}")
    main = conf["strategies"][0]
    items: list[tuple[str, str]] = []
    for name in sorted(conf["strategies"], key=lambda s: s != AR):   # autoregressive first
        sp = summary["speed"].get(name, {})
        if sp.get("samples"):
            tpt = sp.get("time_per_token")
            ms = f", {1000 * tpt:.1f} ms/token" if tpt else ""
            items.append((name, f"{sp['tokens_per_second_total']:.1f} tok/s ({sp['new_tokens']} tokens{ms})"))
    up = summary.get("speedup") or {}
    if up.get("total") is not None:
        decode = f" (decoding only {up['decode']:.3f}x)" if up.get("decode") is not None else ""
        items.append(("speedup", f"{up['total']:.3f}x{decode}"))
    elif main != AR and len(conf["strategies"]) == 1:
        items.append(("speedup", "not measured (--no_compare_autoregressive)"))
    sp = summary["speed"].get(main, {})
    if main != AR and sp.get("samples"):
        if sp.get("acceptance_rate") is not None:
            items.append(("acceptance", f"{sp['acceptance_rate']:.3f}"))
        if sp.get("tokens_per_pass") is not None:
            items.append(("tokens per pass", f"{sp['tokens_per_pass']:.2f} (accepted drafts per verification + 1)"))
        if policy["dynamic_early_exit_mode"] != "none" and sp.get("mean_exit_layer") is not None:
            items.append(("mean exit layer", f"{sp['mean_exit_layer']:.2f}"))
    e = summary.get("equality")
    if e:
        if e["compared"]:
            mismatch = f" (MISMATCH: {', '.join(e['mismatch_ids'][:5])})" if e["mismatches"] else ""
            items.append(("outputs identical", f"{e['identical']}/{e['compared']}{mismatch}"))
        elif not greedy:
            items.append(("outputs identical", "not compared (sampling)"))
    items += task_metric_lines(summary)
    width = max(len(label) for label, _ in items) + 2 if items else 0
    lines += [""] + [f"{label:<{width}}{value}" for label, value in items]
    split = sp.get("time_split_fraction")
    if split and main != AR:
        lines.append(f"time split ({main}): " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in split.items()))
    if summary.get("skipped"):
        lines.append(f"skipped {len(summary['skipped'])} samples: {summary['skipped'][0]['reason']}")
    return "\n".join(lines)


def _progress(args, dist, total: int, label: str):
    if args.no_progress or not dist.is_main or total == 0:
        return None
    from tqdm import tqdm
    suffix = f" (rank 0 of {dist.world_size})" if dist.enabled else ""
    return tqdm(total=total, desc=f"benchmark {label}{suffix}", unit="sample", file=sys.stderr, dynamic_ncols=True)


def _postfix(rows: list[dict], strategies: list[str]) -> str:
    measured = [r for r in rows if "results" in r]
    if not measured:
        return ""
    main = strategies[0]
    speeds = aggregate_speed([r["results"][main]["speed"] for r in measured])
    parts = []
    if speeds.get("acceptance_rate") is not None:
        parts.append(f"accept {speeds['acceptance_rate']:.2f}")
    parts.append(f"{speeds['tokens_per_second_total']:.1f} tok/s")
    if len(strategies) > 1:
        up = speedup([(r["results"][main]["speed"], r["results"][AR]["speed"]) for r in measured])["total"]
        if up is not None:
            parts.append(f"speedup {up:.2f}x")
    return ", ".join(parts)


def summary_metric(summary: dict, strategy: str) -> tuple[str | None, float | None]:
    return primary_metric(summary.get("metrics", {}).get(strategy, {}))
