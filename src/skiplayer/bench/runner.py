"""What every benchmark-like command shares: dataset options and their defaults, measuring one sample with one
strategy, crash-safe row files (append + fsync, torn last line dropped, per-rank part files merged by rank 0),
aggregating speed statistics, and the environment / command line recorded with each run."""
from __future__ import annotations

import copy
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.errors import UserError
from skiplayer.model.optimize import describe_weights

QUICK_DATASET = "human_eval"

# Fields of GenerationStats summed over turns / samples.
_SUMMED = ("prompt_tokens", "new_tokens", "drafted", "accepted", "rounds", "probe_heads", "wall_time",
           "prefill_time", "time_draft_layers", "time_draft_heads", "time_verify", "time_overhead",
           "self_candidates", "self_accepted", "ngram_candidates", "ngram_accepted", "table_candidates",
           "table_accepted", "sibling_candidates", "sibling_accepted")
TIME_SPLIT = {"prefill": "prefill_time", "draft_layers": "time_draft_layers", "draft_heads": "time_draft_heads",
              "verify": "time_verify", "other": "time_overhead"}


# ---------------------------------------------------------------------------------------------- options

def add_dataset_arguments(p, multi: bool = False, quick_samples: int = 5, quick_steps: int = 64,
                          quick_extra: str = "") -> None:
    from skiplayer.data.datasets import DATASETS
    g = p.add_argument_group("dataset")
    names = ", ".join(DATASETS)
    if multi:
        g.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                       help=f"datasets to sweep (default {QUICK_DATASET} in quick mode); one of: {names}")
    else:
        g.add_argument("--dataset", default=None, metavar="NAME",
                       help=f"one of: {names}. Without --dataset a quick run: {QUICK_DATASET}, {quick_samples} "
                            f"samples, --max_steps {quick_steps}{quick_extra} unless given")
    g.add_argument("--data_path", default=None,
                   help="JSONL / JSON file with the rows (default: the dataset's package, shared file or HF cache)")
    g.add_argument("--num_samples", type=int, default=None,
                   help=f"first N samples (default: all rows; {quick_samples} in quick mode)")
    g.add_argument("--n_shot", type=int, default=0, help="few-shot demonstrations per prompt (default 0)")
    g.add_argument("--template", default=None, help="prompt template with {message} and row fields")
    g.add_argument("--random_shuffle", action="store_true", help="shuffle the rows (with --seed) before taking N")
    g.add_argument("--prompt_field", default=None, help="custom_jsonl: prompt field (default prompt)")
    g.add_argument("--response_field", default=None, help="custom_jsonl: reference field (default response)")
    g.add_argument("--all_turns", action="store_true",
                   help="multi-turn datasets (spec_bench, chat_format): generate every user turn in turn")
    p.set_defaults(max_steps=None, _quick_samples=quick_samples, _quick_steps=quick_steps)


def set_help(p, dest: str, text: str) -> None:
    """Reword the help of a shared option whose default this command changes."""
    for action in p._actions:
        if action.dest == dest:
            action.help = text


def add_run_arguments(p, kind: str) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=None,
                   help=f"where results go (default runs/{kind}-<dataset>-<timestamp>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --output_dir after its last complete sample (same settings)")
    g.add_argument("--execute_code", action="store_true",
                   help="HumanEval pass@1: RUNS THE MODEL-WRITTEN CODE on this machine (a subprocess with a "
                        "timeout, not a sandbox); off by default")
    g.add_argument("--warmup", type=int, default=1,
                   help="short warm-up generations per strategy before timing (default %(default)s; 0 = none)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: available cores // number of torchrun processes)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    set_help(p, "max_steps", "maximum new tokens (default: the dataset's own, e.g. 512 for human_eval; "
                             f"{p.get_default('_quick_steps')} in the quick run)")
    set_help(p, "stop_words", "stop when the text contains one of these (default: the dataset's own; "
                              "give the flag with no words for none)")


def check_run_args(args) -> None:
    """Option errors that need no model or data, reported before anything loads."""
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0 (got {args.warmup})")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1 (got {args.threads})")
    if args.resume and not args.output_dir:
        raise UserError("--resume needs --output_dir: the directory of the run to continue")


def dataset_names(args, multi: bool = False) -> tuple[list[str], bool]:
    """The datasets asked for, and whether this is the quick default run (no dataset named)."""
    given = args.datasets if multi else ([args.dataset] if args.dataset else None)
    return (given, False) if given else ([QUICK_DATASET], True)


def dataset_settings(args, name: str, quick: bool) -> dict:
    """Per-dataset settings: num_samples, max_steps and stop words default to the quick run or the DatasetSpec."""
    from skiplayer.data.datasets import get_spec
    spec = get_spec(name)
    num_samples = args.num_samples if args.num_samples is not None else (args._quick_samples if quick else None)
    max_steps = args.max_steps if args.max_steps is not None else (args._quick_steps if quick else spec.max_steps)
    stop_words = list(args.stop_words) if args.stop_words is not None else list(spec.stop_words)
    return {"dataset": name, "data_path": args.data_path, "num_samples": num_samples, "n_shot": args.n_shot,
            "seed": args.seed, "random_shuffle": args.random_shuffle, "template": args.template,
            "prompt_field": args.prompt_field, "response_field": args.response_field, "all_turns": args.all_turns,
            "max_steps": max_steps, "stop_words": stop_words, "metric": spec.metric}


def load_samples(settings: dict, offline: bool = False):
    """The dataset's samples (`offline`: no downloads, see datasets.hf_rows), with ids made unique."""
    from skiplayer.data.datasets import load_dataset
    samples = load_dataset(settings["dataset"], settings["data_path"], settings["num_samples"], settings["n_shot"],
                           settings["seed"], settings["random_shuffle"], settings["template"],
                           settings["prompt_field"], settings["response_field"], settings["all_turns"],
                           offline=offline)
    seen: dict[str, int] = {}
    for sample in samples:   # resume and merging key rows by id: make ids unique
        n = seen.get(sample.id, 0)
        seen[sample.id] = n + 1
        if n:
            sample.id = f"{sample.id}#{n}"
    return samples


def config_dict(config: GenerationConfig) -> dict:
    return asdict(config)


def with_strategy(config: GenerationConfig, strategy: str, **fields) -> GenerationConfig:
    return copy.deepcopy(config).set(generation_strategy=strategy, **fields)


def output_dir(args, kind: str, label: str, dist) -> Path:
    """--output_dir, or runs/<kind>-<label>-<timestamp> (rank 0's timestamp on every rank)."""
    if args.output_dir:
        return Path(args.output_dir)
    if args.resume:
        raise UserError("--resume needs --output_dir: the directory of the run to continue")
    return Path(dist.broadcast(str(Path("runs") / f"{kind}-{label}-{time.strftime('%Y%m%d-%H%M%S')}")))


# ---------------------------------------------------------------------------------------------- measuring

def use_chat_template(args, dataset: str) -> bool:
    """Chat template unless turned off or the dataset is a completion task (HumanEval, LM continuation)."""
    from skiplayer.data.datasets import DATASETS
    spec = DATASETS.get(dataset)
    return not args.no_chat_template and not (spec is not None and spec.completion)


def measure(loaded, sample, config: GenerationConfig, chat_template: bool = True, draft=None) -> dict:
    """Generate for one sample (every turn when it has several) and return output text, token ids and speed."""
    messages: list[dict] = []
    outputs, token_ids, speeds = [], [], []
    for i, turn in enumerate([sample.prompt, *sample.turns]):
        messages.append({"role": "user", "content": turn})
        prompt_ids = loaded.encode(turn if i == 0 else list(messages), chat_template=chat_template)
        try:
            ids, stop, stats = generate_ids(loaded.model, prompt_ids, config, loaded.eos_token_ids,
                                            loaded.tokenizer, draft=draft)
        except UserError as e:
            raise UserError(f"sample {sample.id}: {e}") from None
        text = stop.cut_text(loaded.decode(ids))
        messages.append({"role": "assistant", "content": text})
        outputs.append(text)
        token_ids.extend(ids)
        speeds.append(stats_dict(stats))
    result = {"output": outputs[0] if len(outputs) == 1 else "\n\n".join(outputs),
              "token_ids": token_ids, "speed": sum_speed(speeds)}
    if len(outputs) > 1:
        result["turn_outputs"] = outputs
    return result


def warm_up(loaded, samples, configs: Iterable[GenerationConfig], times: int, chat_template: bool, draft) -> None:
    """A few short generations of each strategy so first-sample timings hold no one-off costs."""
    if times <= 0 or not samples:
        return
    for config in configs:
        short = copy.deepcopy(config)
        short.max_steps = min(config.max_steps, 16)
        for _ in range(times):
            try:
                measure(loaded, samples[0], short, chat_template, draft)
            except UserError:
                return   # e.g. prompt too long: the real measurement reports it


def stats_dict(stats) -> dict:
    """The compact speed record of one generation (per-token telemetry is reduced to a histogram)."""
    d = {name: getattr(stats, name) for name in _SUMMED}
    d["exit_layer_histogram"] = {str(k): v for k, v in stats.exit_layer_histogram().items()}
    d["rank_candidates"] = {str(k): v for k, v in sorted(stats.rank_candidates.items())}
    d["rank_accepted"] = {str(k): v for k, v in sorted(stats.rank_accepted.items())}
    return derive(d)


def derive(d: dict) -> dict:
    """Add rates and means that follow from the summed fields."""
    d["acceptance_rate"] = d["accepted"] / d["drafted"] if d["drafted"] else None
    d["tokens_per_round"] = d["new_tokens"] / d["rounds"] if d["rounds"] else None
    # Tokens each verification pass yields: the accepted drafts + the verified one (the prefill's token excluded).
    d["tokens_per_pass"] = 1 + d["accepted"] / d["rounds"] if d["rounds"] else None
    d["tokens_per_second"] = d["new_tokens"] / d["wall_time"] if d["wall_time"] else 0.0
    d["time_per_token"] = d["wall_time"] / d["new_tokens"] if d["new_tokens"] else None
    hist = d.get("exit_layer_histogram") or {}
    n = sum(hist.values())
    d["mean_exit_layer"] = sum(int(k) * v for k, v in hist.items()) / n if n else None
    seen, ok = d.get("rank_candidates") or {}, d.get("rank_accepted") or {}
    d["acceptance_by_rank"] = {r: ok.get(r, 0) / n for r, n in seen.items() if n}  # self-draft, by draft-head rank
    return d


def merge_histograms(hists: Iterable[dict]) -> dict:
    total: dict[int, int] = {}
    for hist in hists:
        for k, v in (hist or {}).items():
            total[int(k)] = total.get(int(k), 0) + int(v)
    return {str(k): total[k] for k in sorted(total)}


def sum_speed(speeds: list[dict]) -> dict:
    d = {name: sum(s.get(name, 0) for s in speeds) for name in _SUMMED}  # rows of older runs lack newer fields
    d["exit_layer_histogram"] = merge_histograms(s.get("exit_layer_histogram") for s in speeds)
    d["rank_candidates"] = merge_histograms(s.get("rank_candidates") for s in speeds)
    d["rank_accepted"] = merge_histograms(s.get("rank_accepted") for s in speeds)
    return derive(d)


def aggregate_speed(speeds: list[dict]) -> dict:
    """Speed of a strategy over samples: rates both as the mean of per-sample rates and as total / total."""
    if not speeds:
        return {"samples": 0}
    d = sum_speed(speeds)
    d["samples"] = len(speeds)
    d["tokens_per_second_total"] = d.pop("tokens_per_second")
    d["tokens_per_second_mean"] = statistics.fmean(s["tokens_per_second"] for s in speeds)
    wall = d["wall_time"]
    d["time_split"] = {name: d[field] for name, field in TIME_SPLIT.items()}
    d["time_split_fraction"] = {name: (d[field] / wall if wall else 0.0) for name, field in TIME_SPLIT.items()}
    return d


def speedup(pairs: list[tuple[dict, dict]]) -> dict:
    """Speedup of a strategy over autoregressive from per-sample (strategy speed, AR speed) pairs."""
    pairs = [(s, a) for s, a in pairs if s and a]
    if not pairs:
        return {"total": None, "mean_of_rates": None, "per_sample_mean": None, "per_sample_median": None,
                "decode": None}
    ss, ar = aggregate_speed([s for s, _ in pairs]), aggregate_speed([a for _, a in pairs])
    ratios = [s["tokens_per_second"] / a["tokens_per_second"] for s, a in pairs if a["tokens_per_second"]]

    def div(x, y):
        return x / y if y else None

    def decode_rate(d):  # tokens after the first of each sample / time after the prefill (which made the first)
        return div(d["new_tokens"] - d["samples"], d["wall_time"] - d["prefill_time"])
    return {"total": div(ss["tokens_per_second_total"], ar["tokens_per_second_total"]),          # Σtok/Σt ratio
            "mean_of_rates": div(ss["tokens_per_second_mean"], ar["tokens_per_second_mean"]),  # mean rate ratio
            "per_sample_mean": statistics.fmean(ratios) if ratios else None,
            "per_sample_median": statistics.median(ratios) if ratios else None,
            # Prefill excluded: it is the same work for both, so this is the part speculation changes.
            "decode": div(decode_rate(ss), decode_rate(ar))}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """First position where two token sequences differ (the shorter length if one is a prefix), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def score(metric: str, output: str, sample, execute_code: bool) -> dict:
    from skiplayer.metrics.tasks import score as task_score
    return task_score(metric, output, sample, execute_code=execute_code)


# ---------------------------------------------------------------------------------------------- row files

def read_rows(path: Path) -> tuple[list[dict], int]:
    """Rows of a JSONL file written by `append_row`; returns (rows, dropped lines). A line cut short by a kill
    (not valid JSON, or not an object) is dropped; every earlier line was complete when written (fsync)."""
    if not path.exists():
        return [], 0
    rows, dropped = [], 0
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            dropped += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            dropped += 1
    return rows, dropped


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line and make it durable before returning (a kill afterwards cannot lose it)."""
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


class RowStore:
    """Rows of one run in DIR/<name>.jsonl (one process) or DIR/parts/<name>.rank<R>.jsonl (under torchrun,
    merged by rank 0). Rows are keyed by `key(row)`; merging orders them by `order(row)` and drops duplicates,
    so a resumed run never holds a row twice."""

    def __init__(self, out_dir: Path, name: str, key: Callable[[dict], object], order: Callable[[dict], object],
                 rank: int = 0, world_size: int = 1):
        self.dir, self.name, self.key, self.order = Path(out_dir), name, key, order
        self.rank, self.world_size = rank, world_size
        self.main = self.dir / f"{name}.jsonl"
        self.parts_dir = self.dir / "parts"

    def part_files(self) -> list[Path]:
        return sorted(self.parts_dir.glob(f"{self.name}.rank*.jsonl")) if self.parts_dir.exists() else []

    def has_rows(self) -> bool:
        return any(read_rows(p)[0] for p in [self.main, *self.part_files()])

    def load(self) -> dict:
        """Every complete row of the main file and of any part files (a later duplicate replaces nothing)."""
        rows: dict = {}
        for path in [self.main, *self.part_files()]:
            for row in read_rows(path)[0]:
                try:
                    rows.setdefault(self.key(row), row)
                except (KeyError, TypeError):
                    continue   # not one of our rows
        return rows

    def consolidate(self) -> list[dict]:
        """(rank 0 only) Merge part files into the main file, in order, torn lines dropped; remove the parts."""
        rows = sorted(self.load().values(), key=self.order)
        parts = self.part_files()
        write_atomic(self.main, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        for part in parts:
            part.unlink()
        if self.parts_dir.exists() and not any(self.parts_dir.iterdir()):
            self.parts_dir.rmdir()
        return rows

    @property
    def target(self) -> Path:
        if self.world_size == 1:
            return self.main
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        return self.parts_dir / f"{self.name}.rank{self.rank}.jsonl"

    def append(self, row: dict) -> None:
        append_row(self.target, row)


def check_output_dir(out_dir: Path, store: RowStore, resume: bool, configuration: dict, summary: Path,
                     ignore: Iterable[str] = ()) -> bool:
    """Refuse to mix results: an existing run needs --resume, and --resume needs the same settings.
    Returns True when resuming a run that has rows."""
    has_rows = store.has_rows()
    if not resume:
        if has_rows or summary.exists():
            raise UserError(f"{out_dir} already holds a run: pass --resume to continue it, "
                            f"or choose another --output_dir")
        return False
    if summary.exists():
        try:
            old = json.loads(summary.read_text()).get("configuration", {})
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None:
            skip = VOLATILE | set(ignore)
            differing = sorted(k for k in set(old) | set(configuration)
                               if k not in skip and _jsonable(old.get(k)) != _jsonable(configuration.get(k)))
            if differing:
                raise UserError(f"--resume: settings differ from the run in {out_dir} ({', '.join(differing)}); "
                                f"use the same flags or another --output_dir")
    return has_rows


VOLATILE = {"warmup", "threads", "output_dir", "resume", "no_progress", "world_size"}


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------------------- run records

def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(loaded=None, world_size: int = 1) -> dict:
    import torch
    import transformers

    from skiplayer.bench.distributed import available_cores
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "platform": platform.platform(), "cpu": cpu_name(), "cores": available_cores(),
           "threads": torch.get_num_threads(), "world_size": world_size, "git_commit": git_commit(),
           "hostname": platform.node()}
    if loaded is not None:
        env["device"] = str(loaded.device)
        env["dtype"] = str(loaded.dtype).replace("torch.", "")
        if str(loaded.device).startswith("cuda"):
            env["gpu"] = torch.cuda.get_device_name(torch.device(loaded.device))
    return env


def command_line(args) -> dict:
    """The command that produced a run: sys.argv as typed (prefixed with torchrun under torchrun); when the
    command was called in-process (not from the command line), a reconstruction from the parsed options."""
    argv = list(sys.argv)
    command = getattr(args, "command", None)
    if command and command in argv[1:]:
        prog = argv[0]
        exe = "python -m skiplayer" if prog.endswith("__main__.py") or prog == "-m" else "skiplayer"
        words = exe.split() + argv[argv.index(command, 1):]
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1:
            words = ["torchrun", f"--nproc_per_node={world}", "-m", "skiplayer"] + words[len(exe.split()):]
        return {"command": shlex.join(words), "argv": argv}
    words = ["skiplayer", command or "?"]
    for key, value in sorted(vars(args).items()):
        if key.startswith("_") or key == "command" or value in (None, False, [], ""):
            continue
        flag = f"--{key}"
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return {"command": shlex.join(words), "argv": None}


def model_record(loaded, args, draft=None) -> dict:
    return {"model": args.model, "model_name": loaded.name, "hf_path": loaded.hf_path,
            "fingerprint": loaded.fingerprint, "n_layers": loaded.model.n_layers,
            "dtype": str(loaded.dtype).replace("torch.", ""), "weights": describe_weights(loaded.model),
            "draft": getattr(args, "draft", None),
            "draft_command": draft.meta.get("command") if draft is not None else None,
            "chat_template": bool(loaded.has_chat_template and not args.no_chat_template)}


def format_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(out)


def primary_metric(metrics: dict) -> tuple[str | None, float | None]:
    """The one task metric shown in tables: pass@1 / accuracy / exact match / ROUGE-L, whichever exists."""
    for name in ("pass@1", "accuracy", "f1", "rougeL", "rouge-l", "rouge_l", "exact_match", "bleu"):
        if name in (metrics or {}):
            return name, metrics[name]
    if metrics:
        name = sorted(metrics)[0]
        return name, metrics[name]
    return None, None
