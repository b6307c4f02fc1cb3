"""benchmarks/gpu_check.py runs its whole code path on the CPU with a tiny model: every section lands in the JSON and
greedy decoding agrees with itself everywhere (what the GPU run checks on real shapes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), SKIPLAYER_CUDA_GRAPHS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--tiny", "--verify_ns", "1,2,4", "--output_json", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for section in ("meta", "hf_equality", "identity", "speed", "verify_cost", "launches", "hf_static"):
        assert section in report, section
        assert "error" not in report[section], report[section]

    equality = report["hf_equality"]["tiny/float32"]
    assert equality["max_abs_diff"] < 1e-4 and equality["argmax_agreement"] == 1.0

    identity = report["identity"]["float32"]
    assert {"cuda_graph_ar", "static", "adaptive"} <= set(identity)
    assert min(identity.pop("reference_distinct_tokens")) > 1
    step = identity.pop("step_vs_forward")
    assert step["max_abs_diff"] == 0.0 and step["argmax_agreement"] == 1.0  # off CUDA the step is model.forward
    for name, run in identity.items():
        assert "error" not in run, (name, run)
        assert run["total"] == 2 and run["identical"] == run["total"], (name, run)
    assert identity["cuda_graph_ar"]["graph_active"] is False  # no CUDA here: the eager step ran
    assert identity["static"]["acceptance"] is not None

    speed = report["speed"]["tiny"]
    assert speed["ours_eager"]["tok_s"] > 0 and speed["hf_eager"]["tok_s"] > 0
    assert "skipped" in report["hf_static"]
    assert set(report["verify_cost"]["v"]) == {"1", "2", "4"} and report["verify_cost"]["v"]["1"] == 1.0
    assert report["launches"]["eager"]["aten_ops_per_step"] > 0
    assert "[identity] float32 static: 2/2 identical" in proc.stdout


def test_gpu_check_rejects_unknown_section():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--sections", "nope"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.returncode == 2 and "unknown section nope" in proc.stderr
    assert "Traceback" not in proc.stderr
