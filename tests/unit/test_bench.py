"""skiplayer benchmark / sweep / correctness on a tiny random Llama saved with a word-level tokenizer: valid
summary.json + samples.jsonl, kill -9 and --resume (no lost or duplicated rows), torchrun with 2 ranks equals one
process, sweep grid + resume, correctness exit codes, one-line errors; plus the row-file and parsing helpers."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from skiplayer.bench import runner
from skiplayer.bench.report import pareto_front
from skiplayer.bench.runner import RowStore, append_row, first_difference, read_rows
from skiplayer.bench.sweep import parse_list
from skiplayer.cli import main
from skiplayer.errors import UserError, output_file
from tests.conftest import tiny_hf_model

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(93)]


def save_tiny_model(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    tiny_hf_model("llama", n_layers=6).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_data(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(f"w{rng.randrange(4, 93)}" for _ in range(rng.randrange(3, 10)))
            response = " ".join(f"w{rng.randrange(4, 93)}" for _ in range(4))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return {"model": save_tiny_model(root / "model"), "data": write_data(root / "data.jsonl", 12), "root": root}


def bench_args(tiny, out: Path, *extra: str, n: int = 4) -> list[str]:
    return ["benchmark", "--model", str(tiny["model"]), "--dataset", "custom_jsonl", "--data_path", str(tiny["data"]),
            "--num_samples", str(n), "--max_steps", "8", "--exit_layer", "3", "--num_speculations", "3",
            "--threads", "1", "--warmup", "1", "--no_progress", "--output_dir", str(out), *extra]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


# ---------------------------------------------------------------------------------------------- benchmark

def test_benchmark_writes_summary_and_samples(tiny, capsys):
    out = tiny["root"] / "run"
    assert main(bench_args(tiny, out)) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    # One headline speedup (with its decoding-only part), the plain figures, equality; the rest is in summary.json.
    assert len([line for line in lines if "speedup" in line]) == 1
    assert "mean of per-sample" not in printed and "per-sample mean" not in printed
    for label in ("autoregressive", "self_speculative", "speedup", "acceptance", "tokens per pass",
                  "outputs identical", "rougeL", "bleu"):
        assert any(line.startswith(label + " ") for line in lines), label
    assert any(line.startswith("outputs identical") and line.endswith(" 4/4") for line in lines)
    assert "exact_match" not in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "benchmark" and summary["status"] == "complete" and summary["samples"] == 4
    assert {"configuration", "environment", "metrics", "speed", "speedup", "equality", "command"} <= set(summary)
    assert {"torch", "transformers", "cpu", "threads", "device", "dtype", "git_commit"} <= set(summary["environment"])
    ss = summary["speed"]["self_speculative"]
    for key in ("acceptance_rate", "tokens_per_round", "tokens_per_second_mean", "tokens_per_second_total",
                "time_per_token", "exit_layer_histogram", "mean_exit_layer", "time_split"):
        assert key in ss
    assert ss["exit_layer_histogram"] == {"3": ss["drafted"]} and ss["mean_exit_layer"] == 3
    assert set(summary["speedup"]) >= {"total", "mean_of_rates"} and summary["speedup"]["total"] > 0
    assert "rougeL" in summary["metrics"]["self_speculative"] and "rougeL" in summary["metrics"]["autoregressive"]
    assert summary["equality"] == {"compared": 4, "identical": 4, "mismatches": 0, "mismatch_ids": []}
    got = rows(out)
    assert [r["id"] for r in got] == [f"custom_jsonl/{i}" for i in range(4)]
    for r in got:
        assert r["equals_autoregressive"] is True and r["first_difference"] is None
        assert set(r["results"]) == {"self_speculative", "autoregressive"}
        assert r["output"] == r["results"]["autoregressive"]["output"]
        assert {"prompt", "reference", "metrics"} <= set(r)
    assert [r["order"][0] for r in got] == ["self_speculative", "autoregressive"] * 2   # alternating first
    # A finished run is not silently overwritten; --resume of a complete run measures nothing more.
    assert main(bench_args(tiny, out)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(bench_args(tiny, out, "--resume")) == 0
    assert [r["id"] for r in rows(out)] == [f"custom_jsonl/{i}" for i in range(4)]


def test_resume_drops_torn_line_and_refuses_other_settings(tiny, capsys):
    out = tiny["root"] / "torn"
    assert main(bench_args(tiny, out, n=3)) == 0
    full = rows(out)
    lines = (out / "samples.jsonl").read_text().splitlines()
    # Kill after sample 1 while sample 2 was being written: two complete lines and half of the third.
    (out / "samples.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])
    assert main(bench_args(tiny, out, "--resume", "--exit_layer", "2")) == 2
    assert "settings differ" in capsys.readouterr().err
    assert main(bench_args(tiny, out, "--resume", n=3)) == 0
    again = rows(out)
    assert [r["id"] for r in again] == [r["id"] for r in full]
    assert [r["output"] for r in again] == [r["output"] for r in full]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 3 and summary["resumed"]


SLOW_MAIN = """
import sys, time
import skiplayer.bench.benchmark as b
measure = b.measure_sample
def slow(*args, **kwargs):
    row = measure(*args, **kwargs)
    time.sleep(0.4)
    return row
b.measure_sample = slow
from skiplayer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_and_resume_loses_and_duplicates_nothing(tiny):
    out = tiny["root"] / "killed"
    n = 10
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MAIN, *bench_args(tiny, out, n=n)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300  # generous: a loaded machine starts python + torch slowly
    while time.time() < deadline and proc.poll() is None:
        if (out / "samples.jsonl").exists() and len(read_rows(out / "samples.jsonl")[0]) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    before = [json.loads(line)["id"] for line in (out / "samples.jsonl").read_text().splitlines()
              if line.strip().endswith("}")]
    assert 3 <= len(before) < n
    assert main(bench_args(tiny, out, "--resume", n=n)) == 0
    resumed = rows(out)
    reference = tiny["root"] / "uninterrupted"
    assert main(bench_args(tiny, reference, n=n)) == 0
    expected = rows(reference)
    assert [r["id"] for r in resumed] == [r["id"] for r in expected]        # none lost, none twice, in order
    assert [r["output"] for r in resumed] == [r["output"] for r in expected]
    assert json.loads((out / "summary.json").read_text())["samples"] == n


def test_torchrun_two_ranks_equal_one_process(tiny):
    one, two = tiny["root"] / "one", tiny["root"] / "two"
    assert main(bench_args(tiny, one, n=5)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "skiplayer", *bench_args(tiny, two, n=5)]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (two / "parts").exists()
    a, b = rows(one), rows(two)
    assert [r["id"] for r in b] == [r["id"] for r in a]
    assert [r["output"] for r in b] == [r["output"] for r in a]
    assert [r["results"]["self_speculative"]["speed"]["accepted"] for r in b] == \
        [r["results"]["self_speculative"]["speed"]["accepted"] for r in a]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["environment"]["world_size"] == 2 and summary["samples"] == 5
    assert summary["command"].startswith("torchrun --nproc_per_node=2")


def test_bad_input_is_one_line(tiny, tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "w5", "response": "w6"}\n{"prompt": \n')
    assert main(["benchmark", "--model", str(tiny["model"]), "--dataset", "custom_jsonl", "--data_path", str(broken),
                 "--output_dir", str(tmp_path / "x"), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.jsonl line 2" in err
    assert main(bench_args(tiny, tmp_path / "y", "--exit_layer", "9")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--exit_layer" in err
    assert main(["sweep", "--model", str(tiny["model"]), "--datasets", "custom_jsonl", "--data_path",
                 str(tiny["data"]), "--exit_layers", "2:x", "--output_dir", str(tmp_path / "z")]) == 2
    assert "--exit_layers" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(bench_args(tiny, blocker / "out")) == 2   # an output folder that cannot be made
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(blocker) in err and "Traceback" not in err


def render_summary(dataset="gsm8k", metric="gsm8k", execute_code=False, sample=False, metrics=None,
                   strategies=("self_speculative", "autoregressive")) -> dict:
    """A summary.json-shaped dict for benchmark.render: SS 60 tokens in 4 s, AR 60 tokens in 6 s."""
    def speed(new_tokens, wall, accepted, drafted, rounds):
        return {"samples": 2, "new_tokens": new_tokens, "tokens_per_second_total": new_tokens / wall,
                "tokens_per_second_mean": 99.0, "time_per_token": wall / new_tokens, "accepted": accepted,
                "drafted": drafted, "rounds": rounds, "acceptance_rate": accepted / drafted if drafted else None,
                "tokens_per_round": new_tokens / rounds, "tokens_per_pass": 1 + accepted / rounds,
                "mean_exit_layer": 3.0, "time_split_fraction": {"prefill": 0.1, "verify": 0.9}}
    return {"configuration": {"dataset": dataset, "metric": metric, "model": "tiny", "n_layers": 6,
                              "dtype": "float16", "max_steps": 32, "strategies": list(strategies),
                              "execute_code": execute_code,
                              "generation": {"sampling": {"sample": sample},
                                             "policy": {"exit_layer": 3, "num_speculations": 3,
                                                        "dynamic_early_exit_mode": "none",
                                                        "layer_skip_proportion": 0.0}}},
            "samples": 2, "skipped": [],
            "speed": {"self_speculative": speed(60, 4.0, 30, 40, 28), "autoregressive": speed(60, 6.0, 0, 0, 60)},
            "speedup": {"total": 1.5, "mean_of_rates": 1.7, "per_sample_mean": 1.8, "per_sample_median": 1.6,
                        "decode": 1.6} if len(strategies) > 1 else None,
            "equality": ({"compared": 0 if sample else 2, "identical": 0 if sample else 1,
                          "mismatches": 0 if sample else 1, "mismatch_ids": [] if sample else ["gsm8k/1"]}
                         if len(strategies) > 1 else None),
            "metrics": {s: dict(metrics or {"accuracy": 0.5}) for s in strategies}}


def test_render_plain_summary():
    from skiplayer.bench.benchmark import render
    text = render(render_summary())
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[3:]] == ["autoregressive", "self_speculative", "speedup", "acceptance",
                                                       "tokens", "outputs", "accuracy", "time"]
    assert "10.0 tok/s (60 tokens, 100.0 ms/token)" in lines[3] and "15.0 tok/s" in lines[4]
    assert lines[5].split(None, 1)[1] == "1.500x (decoding only 1.600x)"   # total only: not 1.7 / 1.8 / 1.6 median
    assert "1.70" not in text and "1.80" not in text
    assert lines[6].endswith("0.750") and lines[7].split(None, 3)[3].startswith("2.07 ")   # 30/40; 1 + 30/28
    assert lines[8].endswith("1/2 (MISMATCH: gsm8k/1)")
    assert lines[9].endswith("0.500 (self_speculative), 0.500 (autoregressive)")


def test_render_task_metrics_fit_the_task():
    from skiplayer.bench.benchmark import render
    code_scores = {"rougeL": 0.4, "bleu": 0.2, "exact_match": 0.0}
    off = render(render_summary("human_eval", "human_eval", metrics=code_scores))
    assert "pass@1" in off and "off (--execute_code)" in off
    assert not any(name in off for name in ("rougeL", "bleu", "exact_match"))
    on = render(render_summary("human_eval", "human_eval", execute_code=True, metrics={**code_scores, "pass@1": 0.25}))
    assert any(line.startswith("pass@1") and "0.250 (self_speculative)" in line for line in on.splitlines())
    assert not any(name in on for name in ("rougeL", "bleu", "exact_match", "--execute_code"))
    mbpp = render(render_summary("mbpp", "text", metrics=code_scores))
    assert "pass@1" in mbpp and not any(name in mbpp for name in ("rougeL", "bleu", "exact_match"))
    text = render(render_summary("xsum_summarization", "text", metrics=code_scores))
    assert "rougeL" in text and "bleu" in text and "exact_match" not in text
    nq = render(render_summary("nq_open", "nq_open", metrics={"exact_match": 0.5, "f1": 0.6}))
    assert "exact_match" in nq and "f1" in nq


def test_render_sampling_and_single_strategy():
    from skiplayer.bench.benchmark import render
    sampled = render(render_summary(sample=True))
    assert "outputs identical  not compared (sampling)" in sampled and "| sampling" in sampled
    alone = render(render_summary(strategies=("self_speculative",)))
    assert "not measured (--no_compare_autoregressive)" in alone and "outputs identical" not in alone
    ar = render(render_summary(strategies=("autoregressive",)))
    assert "speedup" not in ar and "acceptance" not in ar and "tokens per pass" not in ar and "10.0 tok/s" in ar


def test_multi_turn_and_autoregressive_only(tiny, tmp_path):
    data = tmp_path / "spec.jsonl"
    data.write_text("".join(json.dumps({"question_id": i, "category": "x", "turns": ["w5 w6 w7", "w8 w9"]}) + "\n"
                            for i in range(2)))
    out = tmp_path / "turns"
    assert main(["benchmark", "--model", str(tiny["model"]), "--dataset", "spec_bench", "--data_path", str(data),
                 "--all_turns", "--max_steps", "5", "--exit_layer", "2", "--threads", "1", "--no_progress",
                 "--generation_strategy", "autoregressive", "--output_dir", str(out)]) == 0
    got = rows(out)
    assert [r["id"] for r in got] == ["spec_bench/0", "spec_bench/1"]
    assert all(len(r["results"]["autoregressive"]["turn_outputs"]) == 2 and "equals_autoregressive" not in r
               for r in got)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["speedup"] is None and summary["configuration"]["strategies"] == ["autoregressive"]
    assert main(["benchmark", "--model", str(tiny["model"]), "--resume"]) == 2   # --resume needs --output_dir


@pytest.mark.parametrize("command", ["benchmark", "sweep", "correctness", "report"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: skiplayer " + command in text
    if command == "benchmark":
        assert "--execute_code" in text and "RUNS THE MODEL-WRITTEN CODE" in text and "--resume" in text


# ---------------------------------------------------------------------------------------------- sweep

def test_sweep_grid_resume_and_outputs(tiny, capsys):
    out = tiny["root"] / "sweep"
    base = ["sweep", "--model", str(tiny["model"]), "--datasets", "custom_jsonl", "--data_path", str(tiny["data"]),
            "--num_samples", "3", "--max_steps", "6", "--num_speculations_list", "2", "--threads", "1",
            "--warmup", "0", "--no_progress", "--output_dir", str(out)]
    assert main(base + ["--exit_layers", "1,3"]) == 0
    records = read_rows(out / "records.jsonl")[0]
    assert len(records) == 3 * 3   # 3 samples x (AR + 2 grid points)
    assert main(base + ["--exit_layers", "1:5:2", "--resume"]) == 0   # grid grows: only E=5 runs
    records = read_rows(out / "records.jsonl")[0]
    assert len(records) == 3 * 4
    assert len({(r["dataset"], r["id"], r["point"]) for r in records}) == len(records)
    csv_lines = (out / "sweep.csv").read_text().splitlines()
    assert csv_lines[0].startswith("dataset,mode,exit_layer,num_speculations") and len(csv_lines) == 4
    best = json.loads((out / "best.json").read_text())
    assert best["custom_jsonl"]["exit_layer"] in (1, 3, 5) and "--exit_layer" in best["custom_jsonl"]["flags"]
    assert (out / "heatmap_custom_jsonl_none_p0.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "sweep" and all(p["mismatches"] == 0 for p in summary["points"])
    assert "best for custom_jsonl" in capsys.readouterr().out

    from matplotlib import image

    from skiplayer.bench.report import build_report
    if not (tiny["root"] / "run" / "summary.json").exists():   # this test run alone
        assert main(bench_args(tiny, tiny["root"] / "run")) == 0
    md, pngs = build_report([str(tiny["root"] / "run"), str(out)], str(tiny["root"] / "docs" / "results.md"))
    text = md.read_text()
    assert "| run | dataset |" in text and "| sweep | custom_jsonl | self_speculative / none / self | 5 |" in text
    assert "](results_figures/acceptance_vs_speed.png)" in text and "skiplayer benchmark" in text
    for png in pngs:
        assert image.imread(png).shape[:2] == (500, 800)


# ---------------------------------------------------------------------------------------------- correctness

def correctness_args(tiny, out: Path) -> list[str]:
    return ["correctness", "--model", str(tiny["model"]), "--dataset", "custom_jsonl", "--data_path",
            str(tiny["data"]), "--num_samples", "3", "--max_steps", "8", "--exit_layer", "2", "--num_speculations",
            "3", "--threads", "1", "--output", str(out)]


def test_correctness_exit_codes(tiny, tmp_path, monkeypatch, capsys):
    assert main(correctness_args(tiny, tmp_path / "ok.json")) == 0
    report = json.loads((tmp_path / "ok.json").read_text())
    assert report["mismatches"] == 0 and report["samples"] == 3 and report["mismatch_percentage"] == 0.0
    assert all(s["match"] and s["first_difference"] is None for s in report["per_sample"])

    from skiplayer.bench import correctness
    real = correctness.measure

    def broken(loaded, sample, config, *args):   # test-only: corrupt the second self-speculative token
        result = real(loaded, sample, config, *args)
        if config.generation_strategy == "self_speculative" and sample.id.endswith("/1"):
            result["token_ids"][1] = (result["token_ids"][1] + 1) % 97
        return result
    monkeypatch.setattr(correctness, "measure", broken)
    assert main(correctness_args(tiny, tmp_path / "bad.json")) == 1
    report = json.loads((tmp_path / "bad.json").read_text())
    assert report["mismatches"] == 1 and report["per_sample"][1]["first_difference"] == 1
    assert abs(report["mismatch_percentage"] - 100 / 3) < 1e-9
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------- helpers

def test_parse_list_ranges():
    assert parse_list(["4:16:4"]) == [4, 8, 12, 16]
    assert parse_list(["1:3", "8,10", "3"]) == [1, 2, 3, 8, 10]
    assert parse_list(["0.0,0.25"], float) == [0.0, 0.25]
    for bad in (["a"], ["4:2"], ["1:5:0"], ["1:2:3:4"]):
        with pytest.raises(UserError):
            parse_list(bad)


def test_row_files(tmp_path):
    path = tmp_path / "rows.jsonl"
    append_row(path, {"id": "a", "index": 0})
    append_row(path, {"id": "b", "index": 1})
    with open(path, "ab") as f:
        f.write(b'{"id": "c", "ind')
    got, dropped = read_rows(path)
    assert [r["id"] for r in got] == ["a", "b"] and dropped == 1
    # Part files of two ranks (one with a duplicate of a merged row) merge in order, once each.
    store = RowStore(tmp_path, "rows", key=lambda r: r["id"], order=lambda r: r["index"], rank=1, world_size=2)
    store.append({"id": "d", "index": 3})
    store.append({"id": "b", "index": 1})
    RowStore(tmp_path, "rows", key=lambda r: r["id"], order=lambda r: r["index"], rank=0,
             world_size=2).append({"id": "c", "index": 2})
    merged = store.consolidate()
    assert [r["id"] for r in merged] == ["a", "b", "c", "d"]
    assert [r["id"] for r in read_rows(path)[0]] == ["a", "b", "c", "d"] and not (tmp_path / "parts").exists()


def test_small_helpers():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert pareto_front([(0.1, 5), (0.5, 3), (0.4, 2), (0.2, 6)]) == [(0.2, 6), (0.5, 3)]
    fast = {"new_tokens": 10, "wall_time": 1.0, "tokens_per_second": 10.0}
    slow = {"new_tokens": 10, "wall_time": 2.0, "tokens_per_second": 5.0}
    full = {k: 0 for k in runner._SUMMED}
    up = runner.speedup([({**full, **fast}, {**full, **slow}), ({**full, **slow}, {**full, **slow})])
    assert up["total"] == pytest.approx(20 / 3 / 5) and up["per_sample_mean"] == pytest.approx(1.5)
    assert up["mean_of_rates"] == pytest.approx(7.5 / 5)
    # Decoding only: a 0.5 s prefill made the first token of each sample, on both sides.
    fast_d = {**full, "new_tokens": 11, "wall_time": 1.5, "prefill_time": 0.5, "tokens_per_second": 11 / 1.5}
    slow_d = {**full, "new_tokens": 11, "wall_time": 2.5, "prefill_time": 0.5, "tokens_per_second": 11 / 2.5}
    assert runner.speedup([(fast_d, slow_d)])["decode"] == pytest.approx((10 / 1.0) / (10 / 2.0))


def test_output_file_makes_its_folder_at_parse_time_and_refuses_bad_paths_in_one_line(tmp_path, capsys):
    import argparse
    p = argparse.ArgumentParser(prog="bench")
    p.add_argument("--output_json", type=output_file)
    target = tmp_path / "runs" / "deeper" / "out.json"
    assert p.parse_args(["--output_json", str(target)]).output_json == str(target)
    assert target.parent.is_dir() and not target.exists()  # the folder now, the file only when the run ends
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--output_json", str(blocker / "out.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bench: error: argument --output_json: cannot create the folder") and "Traceback" not in err
