"""CLI: one-line errors for bad input (no traceback), JSON output, README commands match CI."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "skiplayer", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tests.conftest import save_tiny_model
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("args,needle", [
    (["--model", "/no/such/model", "--prompt", "hi"], "not found"),
    (["--prompt", "hi", "--generation_strategy", "self_speculative", "--exit_layer", "0"], "--exit_layer"),
    (["--prompt", "hi", "--generation_strategy", "self_speculative", "--exit_layer", "4"], "--exit_layer"),
    (["--prompt", "hi", "--generation_strategy", "self_speculative", "--num_speculations", "0", "--exit_layer", "1"],
     "--num_speculations"),
    (["--prompt", "   "], "empty prompt"),
    (["--prompt", "hi", "--dtype", "float64"], "invalid choice"),
])
def test_bad_input_one_line_no_traceback(tiny_model_dir, args, needle):
    if "--model" not in args:
        args = ["--model", str(tiny_model_dir), *args]
    r = cli("generate", *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert needle in r.stderr
    assert len([line for line in r.stderr.strip().splitlines() if "error" in line]) == 1


def test_non_llama_architecture_is_refused(tmp_path):
    import transformers
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    r = cli("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert r.returncode == 2 and "gpt2" in r.stderr and "Traceback" not in r.stderr


def test_generate_json_output(tiny_model_dir):
    r = cli("generate", "--model", str(tiny_model_dir), "--prompt", "a b c", "--max_steps", "6", "--output_format",
            "json", "--generation_strategy", "self_speculative", "--exit_layer", "2", "--num_speculations", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"text", "token_ids", "stats", "memory"}
    assert out["memory"]["peak_rss_mb"] > 50  # python + torch alone take more than that
    assert len(out["token_ids"]) == out["stats"]["new_tokens"] <= 6
    for key in ("drafted", "accepted", "acceptance_rate", "rounds", "tokens_per_round", "wall_time",
                "tokens_per_second", "time_per_token", "exit_layers"):
        assert key in out["stats"]


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(python3 -m venv .*pytest.*)$", ci, re.M).group(1)
    assert command in readme


@pytest.mark.parametrize("given,expected", [
    ([], {"draft_source": "both", "dynamic_early_exit_mode": "adaptive", "num_speculations": 2}),
    (["--exit_layer", "8"], {"draft_source": "self", "dynamic_early_exit_mode": "none", "num_speculations": 4}),
    (["--num_speculations", "6"], {"draft_source": "self", "dynamic_early_exit_mode": "none", "num_speculations": 6}),
    (["--draft_source", "ngram"], {"draft_source": "ngram", "dynamic_early_exit_mode": "none", "num_speculations": 4}),
    (["--dynamic_early_exit_mode", "adaptive"], {"draft_source": "self", "dynamic_early_exit_mode": "adaptive",
                                                 "num_speculations": 4}),
])
def test_unset_policy_flags_take_the_best_configuration_unless_layerskip_flags_are_given(given, expected):
    import argparse
    from skiplayer.options import add_generation_arguments, policy_config
    p = argparse.ArgumentParser()
    add_generation_arguments(p)
    policy = policy_config(p.parse_args(given))
    assert {key: getattr(policy, key) for key in expected} == expected


def test_sweep_keeps_layerskip_defaults():
    import argparse
    from skiplayer.bench.sweep import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([])
    assert (args.draft_source, args.dynamic_early_exit_mode, args.num_speculations) == ("self", "none", 4)
