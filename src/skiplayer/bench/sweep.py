"""`skiplayer sweep`: self-speculative decoding over a grid of exit layer E x speculations k x dynamic-exit mode
x layer-skip proportion p, on one or more datasets, against an autoregressive baseline.

Per dataset and sample the baseline runs once and every grid point runs once, in the same process, in an order
that rotates from sample to sample (so no configuration is always measured first or last). Every measurement is
one line of DIR/records.jsonl (fsynced); --resume skips the measurements already there, so finished grid points
are never run again and a grid extended on resume only runs the new points. At the end: DIR/sweep.csv (one row
per dataset and grid point), DIR/heatmap_<dataset>_<mode>_p<p>.png (speedup over E x k), DIR/best.json (fastest
configuration per dataset) and DIR/summary.json (everything, for `skiplayer report`).

Lists: --exit_layers 4 8 12, or 4,8,12, or ranges START:STOP[:STEP] with STOP included (4:16:4 = 4 8 12 16).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

from skiplayer.bench import distributed
from skiplayer.bench.runner import (
    use_chat_template,
    RowStore, aggregate_speed, check_output_dir, check_run_args, command_line, config_dict, dataset_names,
    dataset_settings, environment, format_table, load_samples, measure, model_record, output_dir, primary_metric, score,
    speedup, warm_up, with_strategy, write_atomic, write_json,
)
from skiplayer.errors import UserError, check

AR = "autoregressive"
QUICK_EXIT_LAYERS = "4:16:4"
QUICK_SPECULATIONS = "2,4,6"


@dataclass(frozen=True)
class Point:
    mode: str
    exit_layer: int
    num_speculations: int
    layer_skip_proportion: float

    @property
    def key(self) -> str:
        return f"mode={self.mode},E={self.exit_layer},k={self.num_speculations},p={self.layer_skip_proportion:g}"

    def fields(self) -> dict:
        return {"dynamic_early_exit_mode": self.mode, "exit_layer": self.exit_layer,
                "num_speculations": self.num_speculations, "layer_skip_proportion": self.layer_skip_proportion}


def parse_list(values, kind=int, flag: str = "--exit_layers") -> list:
    """'4 8', '4,8', '4:16:4' (stop included) or a mix, in order, without duplicates."""
    out: list = []
    for value in values or []:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if ":" in part and kind is int:
                    bits = [int(b) for b in part.split(":")]
                    check(len(bits) in (2, 3), f"{flag}: range '{part}' must be START:STOP or START:STOP:STEP")
                    start, stop, step = bits[0], bits[1], bits[2] if len(bits) == 3 else 1
                    check(step > 0, f"{flag}: range '{part}' needs a positive step")
                    check(start <= stop, f"{flag}: range '{part}' is empty (START > STOP)")
                    items = list(range(start, stop + 1, step))
                else:
                    items = [kind(part)]
            except ValueError:
                raise UserError(f"{flag}: '{part}' is not a {'number' if kind is float else 'whole number'} "
                                f"(use values like 4 8, 4,8 or 4:16:4)") from None
            out += [x for x in items if x not in out]
    return out


EPILOG = """outputs (DIR = --output_dir):
  DIR/records.jsonl  one line per measurement (dataset, sample, grid point or autoregressive); --resume skips them
  DIR/sweep.csv      one row per dataset and grid point: acceptance, tokens/s, speedup, task metric
  DIR/heatmap_<dataset>_<mode>_p<p>.png   speedup over exit layer x speculations
  DIR/best.json      fastest configuration per dataset;  DIR/summary.json  everything (for skiplayer report)

example:
  skiplayer sweep --datasets gsm8k human_eval --num_samples 20 --exit_layers 4:16:4 --num_speculations_list 2:8:2
"""


def add_arguments(p) -> None:
    from skiplayer.bench.runner import add_dataset_arguments, add_run_arguments
    from skiplayer.options import add_generation_arguments, add_model_arguments
    from skiplayer.policies import LAYERSKIP_POLICY
    from skiplayer.policies import MODES
    add_model_arguments(p)
    add_dataset_arguments(p, multi=True, quick_samples=3, quick_steps=32)
    add_generation_arguments(p)
    g = p.add_argument_group("grid (each list overrides the single-valued generation flag)")
    g.add_argument("--exit_layers", nargs="+", default=None, metavar="E",
                   help=f"exit layers: 4 8 12, 4,8,12 or START:STOP[:STEP] with STOP included "
                        f"(default {QUICK_EXIT_LAYERS})")
    g.add_argument("--num_speculations_list", nargs="+", default=None, metavar="K",
                   help=f"draft lengths k, same forms (default {QUICK_SPECULATIONS})")
    g.add_argument("--modes", nargs="+", default=None, metavar="MODE",
                   help=f"dynamic_early_exit_mode values (default --dynamic_early_exit_mode); one of: "
                        f"{', '.join(MODES)}")
    g.add_argument("--layer_skip_proportions", nargs="+", default=None, metavar="P",
                   help="layer skip proportions in [0, 1] (default --layer_skip_proportion)")
    add_run_arguments(p, "sweep")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    # a grid of LayerSkip's self-draft chains: policy flags left unset keep LayerSkip's defaults (--modes adaptive,
    # --draft_source both for the measured-best configuration)
    p.set_defaults(generation_strategy="self_speculative", max_steps=None, **LAYERSKIP_POLICY)


def grid(args) -> list[Point]:
    exits = parse_list(args.exit_layers or [QUICK_EXIT_LAYERS], int, "--exit_layers")
    ks = parse_list(args.num_speculations_list or [QUICK_SPECULATIONS], int, "--num_speculations_list")
    modes = parse_list(args.modes or [args.dynamic_early_exit_mode], str, "--modes")
    ps = parse_list(args.layer_skip_proportions or [args.layer_skip_proportion], float, "--layer_skip_proportions")
    check(exits and ks and modes and ps, "empty grid: give at least one value to each list")
    return [Point(m, e, k, p) for m in modes for p in ps for e in exits for k in ks]


def run(args) -> int:
    from skiplayer.options import generation_config, load_from_args

    names, quick = dataset_names(args, multi=True)
    check(len(set(names)) == len(names), "--datasets: a dataset is named twice")
    settings = {name: dataset_settings(args, name, quick) for name in names}
    points = grid(args)
    check_run_args(args)
    check(not args.sample, "sweep measures greedy decoding only (the equality check needs it): drop --sample")
    dist, device = distributed.init(args.device, args.threads)
    try:
        args.device = device
        samples = {name: load_samples(s, args.offline) for name, s in settings.items()}
        loaded, draft = load_from_args(args)
        n_layers = loaded.model.n_layers
        bad = sorted({pt.exit_layer for pt in points if not 1 <= pt.exit_layer < n_layers})
        check(not bad, f"--exit_layers {' '.join(map(str, bad))} out of range for this {n_layers}-layer model: "
                       f"use values in 1..{n_layers - 1} (e.g. --exit_layers 1:{n_layers - 1})")
        base = {}
        for name, s in settings.items():
            config = generation_config(args, max_steps=s["max_steps"], stop_words=s["stop_words"])
            base[name] = config
            for pt in points:
                with_strategy(config, "self_speculative", **pt.fields()).validate(n_layers)
        out_dir = output_dir(args, "sweep", "-".join(names), dist)
        args.output_dir = str(out_dir)
        configuration = {"datasets": settings, **model_record(loaded, args, draft),
                         "generation": config_dict(base[names[0]]),
                         "grid": {"exit_layers": sorted({p.exit_layer for p in points}),
                                  "num_speculations": sorted({p.num_speculations for p in points}),
                                  "modes": list(dict.fromkeys(p.mode for p in points)),
                                  "layer_skip_proportions": sorted({p.layer_skip_proportion for p in points})},
                         "execute_code": args.execute_code, "warmup": args.warmup}
        return _run(args, dist, loaded, draft, samples, base, points, configuration, out_dir)
    finally:
        dist.close()


def _record_key(row: dict) -> tuple:
    return (row["dataset"], row["id"], row["point"])


def _run(args, dist, loaded, draft, samples: dict, base: dict, points: list[Point], configuration: dict,
         out_dir: Path) -> int:
    datasets = list(samples)
    rank_of = {name: i for i, name in enumerate(datasets)}
    store = RowStore(out_dir, "records", key=_record_key,
                     order=lambda r: (rank_of.get(r["dataset"], 1 << 30), r.get("index", 0), r.get("slot", 0)),
                     rank=dist.rank, world_size=dist.world_size)
    summary_path = out_dir / "summary.json"
    # The grid may grow on resume: compare everything but the grid itself.
    check_output_dir(out_dir, store, args.resume, configuration, summary_path, ignore={"grid"})
    head = {"kind": "sweep", "status": "running", **command_line(args), "output_dir": str(out_dir),
            "configuration": configuration}
    if args.resume:
        from skiplayer.bench.benchmark import keep_first_command
        head = keep_first_command(head, summary_path)
    dist.barrier()
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        store.consolidate()
        write_json(summary_path, {**head, "environment": environment(loaded, dist.world_size)})
    dist.barrier()
    done = set(store.load())
    units = ["AR", *points]
    work = []   # (dataset, sample index, sample, [(slot, unit) still to run])
    for name in datasets:
        for i, sample in enumerate(samples[name]):
            order = [(slot, units[slot]) for slot in _rotation(len(units), i)]
            todo = [(slot, u) for slot, u in order if (name, sample.id, _unit_key(u)) not in done]
            if todo:
                work.append((name, i, sample, todo))
    mine = dist.shard(work)
    if dist.is_main and done:
        print(f"[skiplayer] resuming {out_dir}: {len(done)} measurements done", file=sys.stderr)

    chat = {name: use_chat_template(args, name) for name in datasets}
    configs = {name: {pt.key: with_strategy(base[name], "self_speculative", **pt.fields()) for pt in points}
               for name in datasets}
    for name in datasets:
        first = [s for d, _, s, _ in mine if d == name][:1]
        warm_up(loaded, first, [with_strategy(base[name], AR), *list(configs[name].values())[:1]], args.warmup,
                chat[name], draft)
    progress = None
    if not args.no_progress and dist.is_main and mine:
        from tqdm import tqdm
        progress = tqdm(total=sum(len(t) for *_, t in mine), desc="sweep", unit="run", file=sys.stderr,
                        dynamic_ncols=True)
    for name, i, sample, todo in mine:
        metric = configuration["datasets"][name]["metric"]
        for slot, unit in todo:
            config = with_strategy(base[name], AR) if unit == "AR" else configs[name][unit.key]
            row = {"dataset": name, "index": i, "id": sample.id, "point": _unit_key(unit), "slot": slot}
            if unit != "AR":
                row.update(unit.fields())
            try:
                result = measure(loaded, sample, config, chat[name], draft)
            except UserError as e:
                row["skipped"] = str(e)
            else:
                ids = result.pop("token_ids")
                row.update(output=result["output"], num_tokens=len(ids), tokens_sha1=_digest(ids),
                           speed=result["speed"], metrics=score(metric, result["output"], sample, args.execute_code))
            store.append(row)
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(f"{name} {sample.id} {_unit_key(unit)}", refresh=False)
    if progress is not None:
        progress.close()
    dist.barrier()
    if dist.is_main:
        rows = store.consolidate()
        result = summarize(rows, samples, points)
        summary = {**head, "environment": environment(loaded, dist.world_size), **result}
        summary["status"] = "complete" if all(p["complete"] for p in result["points"]) else "incomplete"
        write_json(summary_path, summary)
        write_atomic(out_dir / "sweep.csv", to_csv(result["points"]))
        write_json(out_dir / "best.json", result["best"])
        heatmaps = write_heatmaps(result["points"], out_dir)
        print(render(result))
        print(f"\nresults: {out_dir / 'sweep.csv'}, {out_dir / 'best.json'}, {len(heatmaps)} heatmap(s), "
              f"{summary_path}")
    dist.barrier()
    return 0


def _unit_key(unit) -> str:
    return AR if unit == "AR" else unit.key


def _rotation(n: int, i: int) -> list[int]:
    start = i % n
    return list(range(start, n)) + list(range(start))


def _digest(ids: list[int]) -> str:
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()


def summarize(rows: list[dict], samples: dict, points: list[Point]) -> dict:
    """Per dataset: the AR baseline and every grid point aggregated over the samples measured for both."""
    from skiplayer.metrics.tasks import aggregate
    by = {}
    for r in rows:
        if "speed" in r:
            by.setdefault((r["dataset"], r["point"]), {})[r["id"]] = r
    out_points, baselines, best = [], {}, {}
    for name, items in samples.items():
        ar = by.get((name, AR), {})
        baselines[name] = {"samples": len(ar), "speed": aggregate_speed([r["speed"] for r in ar.values()]),
                           "metrics": aggregate([r["metrics"] for r in ar.values()])}
        for pt in points:
            ss = by.get((name, pt.key), {})
            ids = [s.id for s in items if s.id in ss and s.id in ar]
            speed = aggregate_speed([ss[i]["speed"] for i in ids])
            metrics = aggregate([ss[i]["metrics"] for i in ids])
            up = speedup([(ss[i]["speed"], ar[i]["speed"]) for i in ids])
            ar_speed = aggregate_speed([ar[i]["speed"] for i in ids])
            metric_name, metric_value = primary_metric(metrics)
            out_points.append({
                "dataset": name, "mode": pt.mode, "exit_layer": pt.exit_layer, "num_speculations": pt.num_speculations,
                "layer_skip_proportion": pt.layer_skip_proportion, "point": pt.key, "samples": len(ids),
                "complete": len(ids) == len(items),
                "acceptance_rate": speed.get("acceptance_rate"), "tokens_per_round": speed.get("tokens_per_round"),
                "tokens_per_second_mean": speed.get("tokens_per_second_mean"),
                "tokens_per_second_total": speed.get("tokens_per_second_total"),
                "ar_tokens_per_second_mean": ar_speed.get("tokens_per_second_mean"),
                "ar_tokens_per_second_total": ar_speed.get("tokens_per_second_total"),
                "speedup_total": up["total"], "speedup_mean_of_rates": up["mean_of_rates"],
                "speedup_per_sample_mean": up["per_sample_mean"], "speedup_decode": up["decode"],
                "mean_exit_layer": speed.get("mean_exit_layer"),
                "mismatches": sum(ss[i]["tokens_sha1"] != ar[i]["tokens_sha1"] for i in ids),
                "metric": metric_name, "metric_value": metric_value, "metrics": metrics,
                "exit_layer_histogram": speed.get("exit_layer_histogram", {}),
                "time_split_fraction": speed.get("time_split_fraction", {})})
        ranked = [p for p in out_points if p["dataset"] == name and p["speedup_total"] is not None]
        if ranked:
            top = max(ranked, key=lambda p: (p["complete"], p["speedup_total"], p["acceptance_rate"] or 0))
            best[name] = {k: top[k] for k in ("mode", "exit_layer", "num_speculations", "layer_skip_proportion",
                                              "samples", "speedup_total", "speedup_mean_of_rates", "speedup_decode",
                                              "acceptance_rate",
                                              "tokens_per_second_total", "ar_tokens_per_second_total",
                                              "mean_exit_layer", "mismatches", "metric", "metric_value")}
            best[name]["flags"] = (f"--exit_layer {top['exit_layer']} --num_speculations {top['num_speculations']} "
                                   f"--dynamic_early_exit_mode {top['mode']} "
                                   f"--layer_skip_proportion {top['layer_skip_proportion']:g}")
    return {"points": out_points, "autoregressive": baselines, "best": best,
            "skipped": [{"dataset": r["dataset"], "id": r["id"], "point": r["point"], "reason": r["skipped"]}
                        for r in rows if "skipped" in r]}


CSV_COLUMNS = ["dataset", "mode", "exit_layer", "num_speculations", "layer_skip_proportion", "samples", "complete",
               "acceptance_rate", "tokens_per_round", "tokens_per_second_mean", "tokens_per_second_total",
               "ar_tokens_per_second_mean", "ar_tokens_per_second_total", "speedup_total", "speedup_mean_of_rates",
               "speedup_per_sample_mean", "speedup_decode", "mean_exit_layer", "mismatches", "metric", "metric_value"]


def to_csv(points: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for p in points:
        writer.writerow({k: ("" if p.get(k) is None else p.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def write_heatmaps(points: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per (dataset, mode, p): speedup (total tokens / total time) over exit layer x speculations."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    groups: dict = {}
    for p in points:
        groups.setdefault((p["dataset"], p["mode"], p["layer_skip_proportion"]), []).append(p)
    for (dataset, mode, prop), items in groups.items():
        exits = sorted({p["exit_layer"] for p in items})
        ks = sorted({p["num_speculations"] for p in items})
        grid_values = np.full((len(exits), len(ks)), np.nan)
        for p in items:
            if p["speedup_total"] is not None:
                grid_values[exits.index(p["exit_layer"]), ks.index(p["num_speculations"])] = p["speedup_total"]
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(ks) + 2.5), max(3.0, 0.55 * len(exits) + 1.8)), dpi=100)
        finite = grid_values[np.isfinite(grid_values)]
        spread = max(abs(finite.max() - 1), abs(finite.min() - 1), 0.05) if finite.size else 1.0
        image = ax.imshow(grid_values, cmap="RdYlGn", vmin=1 - spread, vmax=1 + spread, aspect="auto", origin="lower")
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_yticks(range(len(exits)), [str(e) for e in exits])
        ax.set_xlabel("num_speculations k")
        ax.set_ylabel("exit_layer E")
        ax.set_title(f"speedup vs autoregressive: {dataset}, mode {mode}, p={prop:g}", fontsize=9)
        for (r, c), v in np.ndenumerate(grid_values):
            ax.text(c, r, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(image, ax=ax, label="speedup (x)")
        fig.tight_layout()
        path = out_dir / f"heatmap_{_safe(dataset)}_{_safe(mode)}_p{prop:g}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def render(result: dict) -> str:
    headers = ["dataset", "mode", "E", "k", "p", "n", "accept", "tok/round", "tok/s", "AR tok/s", "speedup",
               "decode only", "mismatch", "metric"]
    rows = [[p["dataset"], p["mode"], p["exit_layer"], p["num_speculations"], p["layer_skip_proportion"],
             p["samples"], p["acceptance_rate"], p["tokens_per_round"], p["tokens_per_second_total"],
             p["ar_tokens_per_second_total"], p["speedup_total"], p.get("speedup_decode"), p["mismatches"],
             None if p["metric"] is None else f"{p['metric']} {p['metric_value']:.3f}"] for p in result["points"]]
    lines = [format_table(headers, rows), ""]
    for name, b in result["best"].items():
        decode = f", {b['speedup_decode']:.3f}x decoding only" if b.get("speedup_decode") else ""
        lines.append(f"best for {name}: {b['flags']} -> {b['speedup_total']:.3f}x "
                     f"(acceptance {b['acceptance_rate'] or 0:.2f}{decode})")
    return "\n".join(lines)
