"""`skiplayer calibrate`: self-distil early-exit draft adapters and a reduced draft vocabulary for a model, on its
own greedy outputs; write an artifact directory for `--draft`. See skiplayer.train.calibrate."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from skiplayer.errors import UserError, check

DEFAULT_DATA = ("gsm8k", "xsum_summarization", "cnn_dm_summarization", "chat_format", "human_eval")
ALIASES = {"xsum": "xsum_summarization", "cnn_dm": "cnn_dm_summarization", "cnn": "cnn_dm_summarization",
           "alpaca": "chat_format", "humaneval": "human_eval"}


def add_arguments(p):
    from skiplayer.model.load import DEFAULT_MODEL, DTYPES
    from skiplayer.options import DEFAULT_DTYPE
    from skiplayer.train.calibrate import ADAPTER_FORMS, LOSSES, CalibrationConfig

    d = CalibrationConfig(exit_layers=[])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model to calibrate for (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=["auto", *DTYPES],
                   help="weight dtype (default %(default)s, as every other command): the draft only loads with the "
                        "same weights in the same dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default %(default)s)")
    p.add_argument("--no_chat_template", action="store_true", help="feed prompts as plain text even for chat models")
    p.add_argument("--exit_layers", default="8,12,16", help="comma-separated exit layers to calibrate (default %(default)s)")
    p.add_argument("--output", required=True,
                   help="artifact directory to write (draft.safetensors + draft.json; its calibration-data/ keeps "
                        "the generated outputs, which a rerun with the same --output reuses)")
    p.add_argument("--calibration_data", default=None,
                   help="directory of saved outputs to reuse and extend (default: OUTPUT/calibration-data)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=",".join(DEFAULT_DATA),
                   help="comma-separated datasets whose prompts the model answers (default: %(default)s; "
                        "aliases: xsum, cnn_dm, alpaca)")
    g.add_argument("--data_path", default=None,
                   help="data file(s) for --data: one per dataset, comma-separated (default: the shared copies)")
    g.add_argument("--num_prompts", type=int, default=400,
                   help="prompts to draw, round-robin over the datasets (the budget may use fewer; default %(default)s)")
    g.add_argument("--max_steps", type=int, default=128,
                   help="new tokens per prompt, at most (also capped by the dataset's own; default %(default)s)")
    g.add_argument("--exclude_first", type=int, default=0, metavar="N",
                   help="leave out each dataset's first N rows, the ones `skiplayer benchmark --num_samples N` "
                        "measures (without --random_shuffle), so a draft is never benchmarked on its own "
                        "calibration prompts (default %(default)s)")
    g.add_argument("--max_prompt_tokens", type=int, default=1024, help="skip longer prompts (default %(default)s)")
    g.add_argument("--held_out", type=float, default=0.2,
                   help="share of prompts held out to measure agreement (default %(default)s)")
    t = p.add_argument_group("calibration")
    t.add_argument("--budget_minutes", type=float, default=d.budget_minutes,
                   help="wall-clock budget after loading the model (default %(default)s)")
    t.add_argument("--generation_share", type=float, default=d.generation_share,
                   help="share of the budget spent generating outputs (default %(default)s)")
    t.add_argument("--generation_batch", type=int, default=d.generation_batch,
                   help="prompts decoding together while generating: the weights are read once per step for all "
                        "of them (default %(default)s)")
    t.add_argument("--draft_vocab_size", type=int, default=d.draft_vocab_size,
                   help="draft scores the N most frequent output tokens; 0 = full vocabulary (default %(default)s)")
    t.add_argument("--adapter_form", choices=ADAPTER_FORMS, default=d.adapter_form,
                   help="attention: one attention layer (started from layer E's) + residual MLP, reads the exit "
                        "states of all earlier positions; mlp: the residual MLP alone, cheaper to train "
                        "(default %(default)s)")
    t.add_argument("--adapter_rank", type=int, default=d.adapter_rank, help="adapter rank r (default %(default)s)")
    t.add_argument("--loss", default=d.loss, choices=list(LOSSES),
                   help="kl: KL(full || draft) over the draft vocabulary; ce: cross-entropy to the full model's "
                        "argmax (default %(default)s)")
    t.add_argument("--prompt_positions", type=int, default=d.prompt_positions,
                   help="also train on the last N prompt positions of each prompt (default %(default)s)")
    t.add_argument("--epochs", type=int, default=d.epochs, help="at most (default %(default)s)")
    t.add_argument("--batch_size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--val_fraction", type=float, default=d.val_fraction,
                   help="share of training prompts kept aside to pick the best epoch (default %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="prompt order, held-out split and initialisation")
    t.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    t.add_argument("--no_progress", action="store_true", help="no progress bars")
    t.add_argument("--ngram_table_only", action="store_true",
                   help="add an n-gram table to the existing draft at --output (its adapters stay as they are): "
                        "generate outputs for the budget, keep the n-gram table of the training ones")


def parse_layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise UserError(f"--exit_layers '{text}' is not a comma-separated list of integers, e.g. 8,12,16") from None
    check(len(layers) > 0, "--exit_layers needs at least one layer, e.g. --exit_layers 8,12")
    return layers


def dataset_names(text: str) -> list[str]:
    from skiplayer.data.datasets import DATASETS

    names = [ALIASES.get(n, n) for n in (x.strip() for x in str(text).split(",")) if n]
    check(len(names) > 0, "--data needs at least one dataset name")
    for n in names:
        check(n in DATASETS, f"unknown dataset '{n}' in --data: choose from {', '.join(DATASETS)}")
    check(len(set(names)) == len(names), "--data names a dataset twice")
    return names


def collect_prompts(loaded, names: list[str], data_paths: list[str | None], num_prompts: int, max_steps: int,
                    seed: int, chat_template: bool, held_out: float, max_prompt_tokens: int, required: bool = True,
                    exclude_first: int = 0):
    """Prompts drawn round-robin over the datasets (each shuffled by the seed after dropping its first
    `exclude_first` rows); within each dataset every round(1/held_out)-th prompt is held out (offset per dataset),
    so any prefix of the list is a balanced mix."""
    import random

    from skiplayer.data.datasets import get_spec, load_dataset
    from skiplayer.train.calibrate import CalibrationPrompt

    sources, skipped = [], []
    for name, path in zip(names, data_paths):
        try:
            samples = list(load_dataset(name, data_path=path))[exclude_first:]
            random.Random(seed).shuffle(samples)
        except UserError as e:
            if required:
                raise
            skipped.append(f"{name} ({e})")
            continue
        sources.append((name, get_spec(name), iter(samples)))
    check(len(sources) > 0, "no calibration data available: " + "; ".join(skipped))
    every = max(2, round(1 / held_out)) if held_out > 0 else 0
    prompts, counts = [], {name: 0 for name, _, _ in sources}
    active = list(range(len(sources)))
    while len(prompts) < num_prompts and active:
        for j in list(active):
            if len(prompts) >= num_prompts:
                break
            name, spec, it = sources[j]
            for sample in it:
                ids = loaded.encode(sample.prompt, chat_template=chat_template)
                if 0 < len(ids) <= max_prompt_tokens:
                    n = counts[name]
                    counts[name] += 1
                    prompts.append(CalibrationPrompt(ids, name, sample.id, min(max_steps, spec.max_steps),
                                                     list(spec.stop_words),
                                                     bool(every) and (n + j) % every == every - 1))
                    break
            else:
                active.remove(j)
    return prompts, skipped


def add_ngram_table(args, loaded, prompts, config, store, started: float) -> int:
    """--ngram_table_only: the draft at --output gets ngrams.safetensors, and draft.json what was measured."""
    from skiplayer.draft_artifact import META_FILE, NGRAMS_FILE, read_meta, save_ngrams, write_meta
    from skiplayer.train.calibrate import generate_and_capture, ngram_summary, ngram_table

    out = Path(args.output)
    check((out / META_FILE).is_file(), f"--ngram_table_only adds a table to an existing draft: {out} has no "
          f"{META_FILE} (calibrate the draft first, or drop --ngram_table_only)")
    meta = read_meta(out)
    check(meta.get("fingerprint") == loaded.fingerprint, f"the draft at {out} was calibrated for other weights "
          f"({meta.get('model')}, {meta.get('dtype')}): pass the same --model and --dtype")
    sequences, _ = generate_and_capture(loaded.model, prompts, config.exit_layers, loaded.eos_token_ids,
                                        loaded.tokenizer, started + config.budget_minutes * 60.0,
                                        config.captured_prompt_positions(loaded.model), config.progress,
                                        config.generation_batch, store)
    check(any(s.prompt.held_out for s in sequences) and any(not s.prompt.held_out for s in sequences),
          f"the budget allowed only {len(sequences)} prompt(s), not enough for both the table and a held-out "
          f"check: raise --budget_minutes")
    table, report = ngram_table(sequences)
    save_ngrams(out, table)
    meta["ngram_table"] = {**report, "prompts": len(sequences),
                           "command": "skiplayer calibrate " + " ".join(shlex.quote(a) for a in _argv())}
    write_meta(out, meta)
    print(ngram_summary(report))
    print(f"wrote {out / NGRAMS_FILE}")
    return 0


def run(args) -> int:
    import torch

    from skiplayer.draft_artifact import check_output_dir, save_draft
    from skiplayer.model.load import load_model
    from skiplayer.train.calibrate import CalibrationConfig, calibrate
    from skiplayer.train.capture_store import CaptureStore

    layers = parse_layers(args.exit_layers)
    names = dataset_names(args.data)
    paths: list[str | None] = [None] * len(names)
    if args.data_path:
        given = [x.strip() or None for x in args.data_path.split(",")]
        check(len(given) == len(names), f"--data_path lists {len(given)} file(s) for {len(names)} dataset(s) in "
              f"--data: give one per dataset, comma-separated")
        paths = given
    check(args.num_prompts >= 2, f"--num_prompts must be >= 2 (got {args.num_prompts})")
    check(args.max_steps >= 1, f"--max_steps must be >= 1 (got {args.max_steps})")
    check(args.exclude_first >= 0, f"--exclude_first must be >= 0 (got {args.exclude_first})")
    check(0 < args.held_out < 1, f"--held_out must be between 0 and 1 (got {args.held_out})")
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    config = CalibrationConfig(
        exit_layers=layers, draft_vocab_size=args.draft_vocab_size, adapter_form=args.adapter_form,
        adapter_rank=args.adapter_rank,
        budget_minutes=args.budget_minutes, generation_share=args.generation_share,
        generation_batch=args.generation_batch, loss=args.loss,
        prompt_positions=args.prompt_positions, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        val_fraction=args.val_fraction, seed=args.seed, progress=not args.no_progress)

    t_load = time.monotonic()
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    config.validate(loaded.model.n_layers)
    started = time.monotonic()
    load_seconds = started - t_load
    default_mix = args.data == ",".join(DEFAULT_DATA)
    chat_template = not args.no_chat_template
    prompts, skipped = collect_prompts(loaded, names, paths, args.num_prompts, args.max_steps, args.seed,
                                       chat_template, args.held_out, args.max_prompt_tokens, required=not default_mix,
                                       exclude_first=args.exclude_first)
    for s in skipped:
        print(f"[skiplayer calibrate] skipping dataset {s}", file=sys.stderr)
    out_dir = check_output_dir(args.output)  # before generating: the saved outputs go below it
    data_dir = Path(args.calibration_data) if args.calibration_data else out_dir / "calibration-data"
    saved = CaptureStore.saved_settings(data_dir) or {}
    if isinstance(saved.get("prompt_positions"), int):  # rows with more of each prompt serve this form too
        config.capture_prompt_positions = saved["prompt_positions"]
    store = CaptureStore(data_dir, {
        "model": loaded.name, "fingerprint": loaded.fingerprint, "dtype": str(loaded.dtype).replace("torch.", ""),
        "capture_layers": [*sorted(layers), loaded.model.n_layers],
        "prompt_positions": config.captured_prompt_positions(loaded.model), "eos_token_ids": list(loaded.eos_token_ids)})
    if store.parts():
        print(f"[skiplayer calibrate] reusing the outputs saved in {store.dir} ({len(store.parts())} part files); "
              f"delete it to generate them again", file=sys.stderr)
    if args.ngram_table_only:
        return add_ngram_table(args, loaded, prompts, config, store, started)
    torch.manual_seed(args.seed)
    result = calibrate(loaded.model, prompts, config, loaded.eos_token_ids, loaded.tokenizer, started=started,
                       store=store)

    meta = {
        "model": loaded.name, "hf_path": loaded.hf_path, "fingerprint": loaded.fingerprint,
        "dtype": str(loaded.dtype).replace("torch.", ""), "n_layers": loaded.model.n_layers,
        "dim": loaded.model.args.dim, "full_vocab_size": loaded.model.args.vocab_size,
        "adapter_form": config.adapter_form, "loss": config.loss, "prompt_positions": config.prompt_positions,
        "acceptance": {str(e): round(a, 4) for e, a in result.after.items()},
        "agreement_before": {str(e): round(a, 4) for e, a in result.before.items()},
        "agreement_before_draft_vocab": {str(e): round(a, 4) for e, a in result.before_vocab.items()},
        "agreement_after": {str(e): round(a, 4) for e, a in result.after.items()},
        "draft_vocab_coverage": round(result.coverage, 4),
        "agreement_after_by_dataset": {name: {str(k): (round(v, 4) if isinstance(v, float) else v)
                                              for k, v in row.items()} for name, row in result.by_dataset.items()},
        "calibration_seconds": round(result.timings["total"], 3), "load_seconds": round(load_seconds, 1),
        "timings": {k: round(v, 1) for k, v in result.timings.items()},
        "data": {"datasets": [n for n in names if n not in {s.split(' ')[0] for s in skipped}],
                 "data_path": args.data_path, "chat_template": chat_template, "max_steps": args.max_steps,
                 "held_out": args.held_out, "seed": args.seed, **result.counts},
        "training": {"epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr,
                     "val_fraction": config.val_fraction, "budget_minutes": config.budget_minutes,
                     "generation_share": config.generation_share,
                     "history": {str(e): h for e, h in result.history.items()}},
        "command": "skiplayer calibrate " + " ".join(shlex.quote(a) for a in _argv()),
    }
    meta["ngram_table"] = result.ngram_report
    path = save_draft(args.output, result.adapters, result.vocab_ids, meta, result.ngrams)
    vocab = "full vocabulary" if result.vocab_ids is None else f"{len(result.vocab_ids)}-token draft vocabulary"
    print(f"top-1 agreement with the full model on held-out outputs ({vocab}, adapter rank {config.adapter_rank}, "
          f"loss {config.loss}):")
    print(result.table())
    t = result.timings
    print(f"calibration {t['total']:.0f} s (generate + capture {t['generate']:.0f} s: {result.counts['output_tokens']} "
          f"tokens from {result.counts['prompts_generated']} prompts; train {t['train']:.0f} s; measure "
          f"{t['measure']:.0f} s) + load {load_seconds:.0f} s")
    print(f"wrote {path} (use it with --draft {path})")
    return 0


def _argv() -> list[str]:
    argv = list(sys.argv[1:])
    return argv[1:] if argv and argv[0] == "calibrate" else argv
