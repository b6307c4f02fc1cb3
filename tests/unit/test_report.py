"""skiplayer report on hand-made benchmark and sweep summaries (no model): PNGs of the right size that matplotlib
reads back, a markdown table with every run, image links relative to the markdown file, the command lines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from skiplayer.bench.report import build_report, pareto_front, rows_of
from skiplayer.cli import main


def speed(tps: float, acceptance: float | None = None, hist: dict | None = None) -> dict:
    return {"samples": 4, "new_tokens": 100, "wall_time": 100 / tps, "tokens_per_second_total": tps,
            "tokens_per_second_mean": tps, "acceptance_rate": acceptance, "exit_layer_histogram": hist or {}}


def benchmark_summary(mode: str, exit_layer: int, tps: float, dataset: str = "human_eval") -> dict:
    policy = {"exit_layer": exit_layer, "num_speculations": 4, "dynamic_early_exit_mode": mode,
              "layer_skip_proportion": 0.0}
    return {"kind": "benchmark", "status": "complete",
            "command": f"skiplayer benchmark --dataset {dataset} --exit_layer {exit_layer}",
            "configuration": {"dataset": dataset, "model": "smollm2-135m", "strategies": ["self_speculative",
                                                                                         "autoregressive"],
                              "generation": {"policy": policy}},
            "environment": {"torch": "2.13", "device": "cpu", "cpu": "test cpu", "threads": 2, "world_size": 1,
                            "git_commit": "abc"},
            "samples": 4, "metrics": {"self_speculative": {"rougeL": 0.25}, "autoregressive": {"rougeL": 0.25}},
            "speed": {"self_speculative": speed(tps, 0.6, {str(exit_layer): 30, "2": 10}),
                      "autoregressive": speed(20.0)},
            "speedup": {"total": tps / 20.0, "mean_of_rates": tps / 20.0}}


def sweep_summary() -> dict:
    points = []
    for e in (2, 4):
        for k in (2, 4):
            points.append({"dataset": "gsm8k", "mode": "none", "exit_layer": e, "num_speculations": k,
                           "layer_skip_proportion": 0.0, "samples": 3, "acceptance_rate": 0.1 * e + 0.01 * k,
                           "tokens_per_second_total": 10 + e + k, "speedup_total": (10 + e + k) / 12,
                           "metric": "accuracy", "metric_value": 0.5, "exit_layer_histogram": {str(e): 9}})
    return {"kind": "sweep", "status": "complete", "command": "skiplayer sweep --datasets gsm8k --exit_layers 2:4:2",
            "configuration": {"model": "smollm2-135m", "draft": "drafts/d",
                              "draft_command": "skiplayer calibrate --exit_layers 2,4 --output drafts/d"},
            "environment": {"torch": "2.13"}, "points": points, "autoregressive": {"gsm8k": {"speed": speed(12.0), "metrics": {"accuracy": 0.5}}}}


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    dirs = []
    for name, summary in [("bench-a", benchmark_summary("none", 8, 26.0)),
                          ("bench-b", benchmark_summary("confidence", 12, 30.0, "cnn_dm_summarization")),
                          ("sweep-c", sweep_summary())]:
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(summary))
        dirs.append(d)
    return dirs


def test_report_plots_and_markdown(runs, tmp_path):
    from matplotlib import image
    md, pngs = build_report([str(d) for d in runs], str(tmp_path / "docs" / "results.md"), title="Results")
    assert md == tmp_path / "docs" / "results.md"
    assert [p.name for p in pngs] == ["acceptance_vs_speed.png", "speedup_by_dataset.png", "exit_depth_histogram.png"]
    for png in pngs:
        assert png.parent == tmp_path / "docs" / "results_figures" and png.stat().st_size > 5000
        pixels = image.imread(png)
        assert pixels.shape[:2] == (500, 800) and pixels.std() > 0   # the right size, not blank
    text = md.read_text()
    assert text.startswith("# Results")
    assert "![Acceptance rate vs throughput](results_figures/acceptance_vs_speed.png)" in text
    assert ("| run | dataset | strategy / mode / drafts | E | k | p | samples | acceptance | tokens/pass | "
            "accepted self / ngram | tok/s | speedup | task metric |" in text)
    assert ("| bench-a | human_eval | self_speculative / none / self | 8 | 4 | 0.00 | 4 | 0.600 | - | - | 26.0 | "
            "1.300x | rougeL 0.250 |" in text)
    assert "| bench-b | cnn_dm_summarization | self_speculative / confidence / self | 12 |" in text
    assert text.count("| sweep-c | gsm8k |") == 5   # baseline + 4 grid points
    assert "skiplayer benchmark --dataset human_eval --exit_layer 8" in text
    assert "skiplayer sweep --datasets gsm8k --exit_layers 2:4:2" in text
    # a run with a calibrated draft names the command that made it, right before its own
    assert "skiplayer calibrate --exit_layers 2,4 --output drafts/d   # makes --draft drafts/d\nskiplayer sweep" in text


def test_report_command_and_errors(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(runs[0].parent)]) == 0   # a folder of runs; default output ./report.md
    assert "| sweep-c |" in (tmp_path / "report.md").read_text()
    assert main(["report", str(runs[0])]) == 0           # one run: RUN_DIR/report.md
    assert (runs[0] / "report_figures" / "exit_depth_histogram.png").exists()
    out = tmp_path / "one.md"
    assert main(["report", str(runs[0]), "--output", str(out)]) == 0
    assert (tmp_path / "one_figures" / "speedup_by_dataset.png").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("skiplayer report: error:") and "not found" in err[-1]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{not json")
    assert main(["report", str(tmp_path / "bad")]) == 2
    assert "not a readable summary.json" in capsys.readouterr().err


def test_rows_and_pareto():
    rows = rows_of({**benchmark_summary("none", 8, 26.0), "_name": "r"})
    assert [(r["strategy"], r["speedup"]) for r in rows] == [("self_speculative", 1.3), ("autoregressive", 1.0)]
    assert pareto_front([(0.9, 1.0), (0.5, 2.0), (0.4, 1.5), (0.9, 0.5)]) == [(0.5, 2.0), (0.9, 1.0)]
