"""`skiplayer report RUN_DIR...`: plots and a markdown page from `skiplayer benchmark` / `skiplayer sweep` runs.

Writes, next to the markdown file given with --output (image links are relative to it, so the page can live in
docs/): <stem>_figures/acceptance_vs_speed.png (acceptance rate vs tokens/s, with each mode's pareto front),
speedup_by_dataset.png (best speedup per dataset and mode), exit_depth_histogram.png (share of drafted tokens
per exit layer), and the markdown: the plots, a table of every run / grid point, and the exact command lines.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from skiplayer.bench.runner import primary_metric
from skiplayer.errors import UserError

AR = "autoregressive"
FIGSIZE, DPI = (8, 5), 100          # every plot is 800 x 500 pixels


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="benchmark/sweep output directories (or their summary.json files, or a folder of runs)")
    p.add_argument("--output", default=None,
                   help="markdown file to write (default RUN_DIR/report.md for one run, else ./report.md); "
                        "the figures go to <stem>_figures/ next to it")
    p.add_argument("--figures_dir", default=None, help="where the PNGs go (default <output stem>_figures)")
    p.add_argument("--title", default="skiplayer benchmark report", help="page title")


# ---------------------------------------------------------------------------------------------- reading runs

def find_summaries(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            candidates = [path]
        elif (path / "summary.json").is_file():
            candidates = [path / "summary.json"]
        elif path.is_dir():
            candidates = sorted(path.glob("*/summary.json"))
        else:
            raise UserError(f"{raw} not found: pass benchmark/sweep output directories")
        if not candidates:
            raise UserError(f"{raw} holds no summary.json: pass a `skiplayer benchmark` or `sweep` output directory")
        found += [c for c in candidates if c not in found]
    return found


def load_summary(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable summary.json ({e})") from None
    if not isinstance(summary, dict) or summary.get("kind") not in ("benchmark", "sweep"):
        raise UserError(f"{path}: not a summary.json of `skiplayer benchmark` or `skiplayer sweep`")
    summary["_path"] = str(path)
    summary["_name"] = path.parent.name
    return summary


def rows_of(summary: dict) -> list[dict]:
    """Table rows of one run: one per strategy of a benchmark, one per grid point (+ baseline) of a sweep."""
    run, command = summary["_name"], summary.get("command", "")
    rows = []
    if summary["kind"] == "benchmark":
        if "speed" not in summary:
            return []
        conf = summary["configuration"]
        policy = conf["generation"]["policy"]
        for name in conf["strategies"]:
            speed = summary["speed"].get(name) or {}
            if not speed.get("samples"):
                continue
            metric, value = primary_metric(summary.get("metrics", {}).get(name, {}))
            ss = name != AR
            up = (summary.get("speedup") or {}).get("total") if ss else (1.0 if summary.get("speedup") else None)
            rows.append({"run": run, "kind": "benchmark", "dataset": conf["dataset"], "strategy": name,
                         "mode": policy["dynamic_early_exit_mode"] if ss else "-",
                         "E": policy["exit_layer"] if ss else None, "k": policy["num_speculations"] if ss else None,
                         "p": policy["layer_skip_proportion"] if ss else None,
                         "acceptance": speed.get("acceptance_rate"), "tps": speed.get("tokens_per_second_total"),
                         "source": policy.get("draft_source", "self") if ss else None,
                         "per_pass": speed.get("tokens_per_pass") if ss else None,
                         "from_self": speed.get("self_accepted"), "from_ngram": _from_ngrams(speed),
                         "speedup": up, "metric": metric, "metric_value": value, "samples": speed.get("samples"),
                         "histogram": speed.get("exit_layer_histogram") or {}, "command": command})
    else:
        for name, base in (summary.get("autoregressive") or {}).items():
            speed = base.get("speed") or {}
            if not speed.get("samples"):
                continue
            metric, value = primary_metric(base.get("metrics") or {})
            rows.append({"run": run, "kind": "sweep", "dataset": name, "strategy": AR, "mode": "-", "E": None,
                         "k": None, "p": None, "acceptance": None, "tps": speed.get("tokens_per_second_total"),
                         "speedup": 1.0, "metric": metric, "metric_value": value, "samples": speed.get("samples"),
                         "histogram": {}, "command": command})
        for p in summary.get("points") or []:
            if not p.get("samples"):
                continue
            rows.append({"run": run, "kind": "sweep", "dataset": p["dataset"], "strategy": "self_speculative",
                         "mode": p["mode"], "E": p["exit_layer"], "k": p["num_speculations"],
                         "p": p["layer_skip_proportion"], "acceptance": p.get("acceptance_rate"),
                         "tps": p.get("tokens_per_second_total"), "speedup": p.get("speedup_total"),
                         "metric": p.get("metric"), "metric_value": p.get("metric_value"), "samples": p["samples"],
                         "histogram": p.get("exit_layer_histogram") or {}, "command": command})
    return rows


# ---------------------------------------------------------------------------------------------- plots

def _from_ngrams(speed: dict) -> int | None:
    """Accepted n-gram candidates, from the context and from the draft's table (older summaries lack the latter)."""
    if speed.get("ngram_accepted") is None:
        return None
    return speed["ngram_accepted"] + (speed.get("table_accepted") or 0)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated when both coordinates are better larger, sorted by the first coordinate."""
    front = []
    for x, y in sorted(set(points), key=lambda q: (-q[0], -q[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)   # no bbox_inches="tight": the size stays FIGSIZE * DPI
    plt.close(fig)
    return path


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_acceptance_vs_speed(rows: list[dict], path: Path) -> Path:
    plt, fig, ax = _figure()
    ss = [r for r in rows if r["strategy"] != AR and r["acceptance"] is not None and r["tps"]]
    modes = sorted({r["mode"] for r in ss})
    datasets = sorted({r["dataset"] for r in ss})
    markers = "osD^v<>pP*Xh"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for mi, mode in enumerate(modes):
        color = colors[mi % len(colors)]
        for di, dataset in enumerate(datasets):
            pts = [(r["acceptance"], r["tps"]) for r in ss if r["mode"] == mode and r["dataset"] == dataset]
            if not pts:
                continue
            ax.scatter(*zip(*pts), color=color, marker=markers[di % len(markers)], alpha=0.6)
            # tokens/s are comparable within one dataset only: one front per mode and dataset
            front = pareto_front(pts)
            ax.plot(*zip(*front), color=color, linewidth=1.2, linestyle="--", marker=markers[di % len(markers)],
                    markersize=10, markerfacecolor="none")
    ar_lines: dict = {}
    for dataset in datasets:
        ar = [r["tps"] for r in rows if r["strategy"] == AR and r["dataset"] == dataset and r["tps"]]
        if ar:
            ar_lines.setdefault(round(sum(ar) / len(ar), 6), []).append(dataset)
    for value, names in ar_lines.items():
        ax.axhline(value, color="gray", linewidth=0.8, linestyle=":")
        ax.annotate(f"autoregressive ({', '.join(names)})", (0.01, value), xycoords=("axes fraction", "data"),
                    fontsize=7, color="gray", va="bottom")
    if not ss:
        _no_data(ax, "no self-speculative runs")
    else:  # colour = mode, marker = dataset: two short legends outside the axes instead of one per pair
        from matplotlib.lines import Line2D
        by_mode = [Line2D([], [], color=colors[i % len(colors)], marker="o", linestyle="", label=m)
                   for i, m in enumerate(modes)]
        by_dataset = [Line2D([], [], color="gray", marker=markers[i % len(markers)], linestyle="", label=d)
                      for i, d in enumerate(datasets)]
        first = ax.legend(handles=by_mode, title="mode", fontsize=7, title_fontsize=8, loc="upper left",
                          bbox_to_anchor=(1.01, 1.0))
        ax.add_artist(first)
        ax.legend(handles=by_dataset, title="dataset", fontsize=7, title_fontsize=8, loc="lower left",
                  bbox_to_anchor=(1.01, 0.0))
    ax.set_xlabel("acceptance rate")
    ax.set_ylabel("tokens / s (total tokens / total time)")
    ax.set_title("acceptance vs throughput (dashed, circled: pareto front per mode and dataset)")
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def plot_speedup_bars(rows: list[dict], path: Path) -> Path:
    plt, fig, ax = _figure()
    ss = [r for r in rows if r["strategy"] != AR and r["speedup"] is not None]
    datasets = sorted({r["dataset"] for r in ss})
    modes = sorted({r["mode"] for r in ss})
    width = min(0.8 / max(1, len(modes)), 0.3)
    for mi, mode in enumerate(modes):
        values = []
        for dataset in datasets:
            vals = [r["speedup"] for r in ss if r["mode"] == mode and r["dataset"] == dataset]
            values.append(max(vals) if vals else 0.0)
        xs = [i + (mi - (len(modes) - 1) / 2) * width for i in range(len(datasets))]
        bars = ax.bar(xs, values, width=width, label=mode)
        ax.bar_label(bars, labels=[f"{v:.2f}x" if v else "" for v in values], fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(datasets)), datasets, rotation=15 if len(datasets) > 4 else 0)
    ax.set_ylabel("speedup vs autoregressive (best configuration)")
    ax.set_title("speedup per dataset and dynamic-exit mode")
    if ss:
        ax.legend(fontsize=8, title="mode")
    else:
        _no_data(ax, "no speedup measured (run with --compare_autoregressive)")
    return _save(plt, fig, path)


def plot_exit_histogram(rows: list[dict], path: Path, limit: int = 8) -> Path:
    plt, fig, ax = _figure()
    series = [r for r in rows if r["histogram"]]
    # Per (dataset, mode) keep the fastest configuration so that sweeps do not flood the plot.
    best: dict = {}
    for r in series:
        key = (r["run"] if r["kind"] == "benchmark" else "", r["dataset"], r["mode"])
        if key not in best or (r["speedup"] or 0) > (best[key]["speedup"] or 0):
            best[key] = r
    chosen = list(best.values())[:limit]
    top = max((int(k) for r in chosen for k in r["histogram"]), default=1)
    width = 0.8 / max(1, len(chosen))
    for i, r in enumerate(chosen):
        hist = {int(k): v for k, v in r["histogram"].items()}
        total = sum(hist.values())
        layers = list(range(1, top + 1))
        xs = [layer + (i - (len(chosen) - 1) / 2) * width for layer in layers]
        ax.bar(xs, [hist.get(layer, 0) / total for layer in layers], width=width,
               label=f"{r['dataset']} {r['mode']} E={r['E']} k={r['k']}")
    ax.set_ylim(0, 1.05)
    if chosen:
        ax.legend(fontsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        _no_data(ax, "no exit telemetry (no self-speculative runs)")
    ax.set_xlabel("exit layer of drafted tokens")
    ax.set_ylabel("share of drafted tokens")
    ax.set_title("exit-depth histogram")
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


# ---------------------------------------------------------------------------------------------- markdown

def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v).replace("|", "\\|")


def markdown(title: str, rows: list[dict], summaries: list[dict], figures: list[tuple[str, Path]],
             md_path: Path) -> str:
    lines = [f"# {title}", "",
             f"Generated by `skiplayer report` from {len(summaries)} run(s) on {time.strftime('%Y-%m-%d %H:%M')}. "
             "Speedup = total tokens / total time of the strategy over that of autoregressive decoding, measured "
             "in the same process on the same samples; tok/s = total tokens / total time.", ""]
    for caption, path in figures:
        rel = Path(os.path.relpath(path, md_path.parent)).as_posix()
        lines += [f"![{caption}]({rel})", ""]
    lines += ["## Runs", "",
              "| run | dataset | strategy / mode / drafts | E | k | p | samples | acceptance | tokens/pass | "
              "accepted self / ngram | tok/s | speedup | task metric |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        strategy = AR if r["strategy"] == AR else f"self_speculative / {r['mode']} / {r.get('source') or 'self'}"
        sources = "-" if r.get("from_self") is None else f"{r['from_self']} / {r.get('from_ngram') or 0}"
        metric = "-" if r["metric"] is None else f"{r['metric']} {_fmt(r['metric_value'])}"
        speedup = "-" if r["speedup"] is None else f"{_fmt(r['speedup'])}x"
        lines.append(f"| {_fmt(r['run'])} | {_fmt(r['dataset'])} | {strategy} | {_fmt(r['E'])} | {_fmt(r['k'])} | "
                     f"{_fmt(r['p'], 2)} | {_fmt(r['samples'])} | {_fmt(r['acceptance'])} | "
                     f"{_fmt(r.get('per_pass'), 2)} | {sources} | {_fmt(r['tps'], 1)} | "
                     f"{speedup} | {metric} |")
    lines += ["", "## Environment and commands", ""]
    for s in summaries:
        env = s.get("environment") or {}
        conf = s.get("configuration") or {}
        lines += [f"**{s['_name']}** ({s['kind']}, {s.get('status', '?')}): model `{conf.get('model')}`, "
                  f"torch {env.get('torch')}, {env.get('device', '?')} ({env.get('cpu', env.get('gpu', '?'))}), "
                  f"{env.get('threads')} threads x {env.get('world_size', 1)} process(es), "
                  f"commit `{env.get('git_commit')}`", "", "```sh"]
        if conf.get("draft"):
            from skiplayer.draft_artifact import calibrate_command
            made = conf.get("draft_command") or calibrate_command(conf["draft"])  # older runs: read the artifact
            lines.append(f"{made or '# (calibrate command not recorded)'}   # makes --draft {conf['draft']}")
        lines.append(s.get("command", "(unknown)"))
        lines += [f"{cmd}   # resumed" for cmd in s.get("resumed") or []]
        lines += ["```", ""]
    return "\n".join(lines)


def build_report(paths: list[str], output: str | None = None, title: str = "skiplayer benchmark report",
                 figures_dir: str | None = None) -> tuple[Path, list[Path]]:
    summaries = [load_summary(p) for p in find_summaries(paths)]
    rows = [row for s in summaries for row in rows_of(s)]
    if output:
        md_path = Path(output)
    elif len(summaries) == 1:
        md_path = Path(summaries[0]["_path"]).parent / "report.md"
    else:
        md_path = Path("report.md")
    if md_path.suffix.lower() != ".md":
        raise UserError(f"--output {output}: give a markdown file path ending in .md")
    fig_dir = Path(figures_dir) if figures_dir else md_path.parent / f"{md_path.stem}_figures"
    try:
        fig_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {fig_dir}: {e.strerror}") from None
    figures = [("Acceptance rate vs throughput", plot_acceptance_vs_speed(rows, fig_dir / "acceptance_vs_speed.png")),
               ("Speedup per dataset and mode", plot_speedup_bars(rows, fig_dir / "speedup_by_dataset.png")),
               ("Exit-depth histogram", plot_exit_histogram(rows, fig_dir / "exit_depth_histogram.png"))]
    md_path.write_text(markdown(title, rows, summaries, figures, md_path), encoding="utf-8")
    return md_path, [path for _, path in figures]


def run(args) -> int:
    md_path, pngs = build_report(args.runs, args.output, args.title, args.figures_dir)
    print(f"wrote {md_path} and {len(pngs)} figures in {pngs[0].parent}", file=sys.stderr)
    return 0
