"""One prepared check of our decoding on a GPU, with random-weight models of real shapes (no network, no files), and
with the default model's own weights when they were carried there (--payload, benchmarks/gpu_payload.py).

    PYTHONPATH=src python benchmarks/gpu_check.py --output_json runs/gpu_check.json          # on the GPU machine
    PYTHONPATH=src python benchmarks/gpu_check.py --payload gpu_payload --output_json runs/gpu_check.json  # + real
    python benchmarks/gpu_check.py --device cpu --quick [--tiny] --output_json /tmp/check.json  # same code path

Sections, each recorded in the JSON even when it fails (its error is kept and the next section runs):
  real         with --payload: the real weights and built-in draft, our CUDA-graph decoding against
               self-speculation (default configuration, chain of one, n-gram with block graphs) on gsm8k and chat
               prompts: decode tok/s, ratios, tokens per pass, identity
  hf_equality  our logits vs transformers' LlamaForCausalLM on the same random weights (float32 and --dtype)
  identity     greedy self-speculative (static exit, adaptive, n-gram/tree when available) and CUDA-graph decoding
               vs plain autoregressive decoding: identical token lists, first divergence, acceptance
  speed        autoregressive tok/s: ours eager, ours with the CUDA-graph step, HF generate (dynamic cache)
  verify_cost  v(n) = time of our forward over n positions / one position
  launches     kernel launches (cudaLaunchKernel, cudaGraphLaunch) and aten ops per decode step, GPU busy share
  hf_static    HF generate(cache_implementation="static") tok/s (it compiles: a child process under a time cap)

Models: "smollm2" (SmolLM2-135M's shape: hidden 576, 30 layers, 9/3 heads, vocab 49152, tied) and "llama1b"
(Llama-3.2-1B's shape with --llama1b_layers layers). Layers from the exit layer (8 of 30) on get their output
projections scaled by --deep_scale, so shallow exits agree with the full model often (drafts get accepted) but not
always; their greedy outputs vary (weights drawn with --init_std, larger than HF's 0.02, which repeats one token).
Only torch, transformers and our package are imported (PYTHONPATH=src is enough).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.errors import output_file
from skiplayer.model import cuda_graphs
from skiplayer.model.llama import Transformer
from skiplayer.policies import PolicyConfig

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True),
    "llama1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                    tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAUNCH_NAMES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
GRAPH_LAUNCH_NAMES = ("cudaGraphLaunch", "cuGraphLaunch")


def log(msg: str) -> None:
    print(msg, flush=True)


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------- models

def hf_config(shape: str, layers: int | None, std: float):
    import transformers
    fields = dict(SHAPES[shape])
    if layers:
        fields["num_hidden_layers"] = layers
    return transformers.LlamaConfig(**fields, max_position_embeddings=2048, rms_norm_eps=1e-5,
                                    initializer_range=std, bos_token_id=None, eos_token_id=None, pad_token_id=0)


_BUILT: dict[tuple, object] = {}


def build_hf(args, shape: str, layers: int | None, device: torch.device, dtype: torch.dtype = torch.float32):
    """A random LlamaForCausalLM on `device` (fixed seed, built in float32, then converted); the outputs of layers
    from the exit layer on are scaled down. Kept for later sections (the same weights everywhere)."""
    key = (shape, layers, str(device), dtype)
    if key not in _BUILT:
        if dtype == torch.float32:
            _BUILT[key] = _build_hf(args, shape, layers, device)
        else:
            _BUILT[key] = copy.deepcopy(build_hf(args, shape, layers, device)).to(dtype)
    return _BUILT[key]


def _build_hf(args, shape: str, layers: int | None, device: torch.device):
    import transformers
    config = hf_config(shape, layers, args.init_std)
    torch.manual_seed(args.seed)
    try:
        with torch.device(device):
            hf = transformers.LlamaForCausalLM(config)
        if any(t.device.type == "meta" for t in (*hf.parameters(), *hf.buffers())):
            raise RuntimeError("built on the meta device")
    except Exception:  # noqa: BLE001 - older torch/transformers: build on the CPU, then move
        torch.manual_seed(args.seed)
        hf = transformers.LlamaForCausalLM(config)
    hf = hf.to(device).float().eval().requires_grad_(False)
    n = config.num_hidden_layers
    deep_from = min(exit_layer(n) if args.deep_from is None else args.deep_from, n)
    with torch.no_grad():
        for layer in hf.model.layers[deep_from:]:
            layer.self_attn.o_proj.weight.mul_(args.deep_scale)
            layer.mlp.down_proj.weight.mul_(args.deep_scale)
    return hf


def ours_from(hf, dtype: torch.dtype, device: torch.device) -> Transformer:
    return Transformer.from_hf(hf, dtype=dtype, device=device)


def prompts(args, vocab: int) -> list[list[int]]:
    """Token prompts with repetition (a random segment repeated, then its start again): n-gram drafts find matches."""
    g = torch.Generator().manual_seed(args.seed + 1)
    out = []
    for i in range(args.n_prompts):
        seg = torch.randint(4, vocab, (8 + 3 * i,), generator=g).tolist()
        reps = max(2, args.prompt_len // len(seg))
        out.append((seg * reps + seg[:5])[:max(args.prompt_len, 2 * len(seg))])
    return out


def exit_layer(n_layers: int) -> int:
    return max(1, min(n_layers - 1, round(n_layers * 8 / 30)))


# --------------------------------------------------------------------------------------------------------- sections

def section_hf_equality(args, device, deadline) -> dict:
    out = {}
    for shape in args.models:
        layers = args.llama1b_layers if shape == "llama1b" else args.layers
        hf = build_hf(args, shape, layers, device)
        ids = prompts(args, hf.config.vocab_size)[0]
        for name in dict.fromkeys(["float32", args.dtype]):
            key = f"{shape}/{name}"
            try:
                dtype = DTYPES[name]
                hf_d = build_hf(args, shape, layers, device, dtype)
                ours = ours_from(hf, dtype, device)
                with torch.inference_mode():
                    ref = hf_d(torch.tensor([ids], device=device)).logits[0].float()
                    got = ours(torch.tensor(ids, device=device), 0, ours.new_cache(len(ids)))
                diff = (ref - got).abs()
                out[key] = {
                    "positions": len(ids), "layers": hf.config.num_hidden_layers,
                    "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                    "logit_scale": float(ref.abs().max()),
                    "argmax_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
                }
                r = out[key]
                log(f"[hf_equality] {key}: max|diff| {r['max_abs_diff']:.3g} (logits up to {r['logit_scale']:.3g}), "
                    f"argmax agreement {r['argmax_agreement']:.3f} over {len(ids)} positions")
                del ours
            except Exception as e:  # noqa: BLE001
                out[key] = error(e)
                log(f"[hf_equality] {key}: ERROR {out[key]['error']}")
        if deadline.left() < 0:
            out["skipped_rest"] = "time budget spent"
            break
    return out


def speculative_configs(args, n_layers: int) -> dict[str, dict]:
    E, k = exit_layer(n_layers), args.k
    configs = {"static": dict(exit_layer=E, num_speculations=k),
               "adaptive": dict(exit_layer=E, num_speculations=k, dynamic_early_exit_mode="adaptive")}
    fields = getattr(PolicyConfig, "__dataclass_fields__", {})
    if "draft_source" in fields:
        configs["ngram"] = dict(exit_layer=E, num_speculations=k, draft_source="ngram")
        configs["tree_self_ngram"] = dict(exit_layer=E, num_speculations=k, draft_source="both")
        configs["adaptive_tree"] = dict(exit_layer=E, num_speculations=k, draft_source="both",
                                        dynamic_early_exit_mode="adaptive")
    return configs


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_ours(model, ids, steps, graphs: bool, loaded=None, draft=None, **policy):
    """(tokens, stats) of greedy decoding, self-speculative when a policy is given; `loaded` (a LoadedModel) adds its
    EOS ids and tokenizer, as real generations stop."""
    saved = cuda_graphs.ENABLED
    cuda_graphs.ENABLED = graphs
    try:
        strategy = "self_speculative" if policy else "autoregressive"
        config = GenerationConfig(max_steps=steps, generation_strategy=strategy, policy=PolicyConfig(**policy))
        eos, tokenizer = (loaded.eos_token_ids, loaded.tokenizer) if loaded else ((), None)
        tokens, _, stats = generate_ids(model, ids, config, eos, tokenizer, draft=draft)
        return tokens, stats
    finally:
        cuda_graphs.ENABLED = saved


def graph_active(model) -> bool:
    steps = model.__dict__.get("_decode_graphs", {})
    return any(s.failed is None and s.step.graph is not None for s in steps.values())


def block_graphs_active(model) -> list[int]:
    """The verification block lengths replayed as CUDA graphs (n-gram rounds, model/cuda_graphs.BlockGraphs)."""
    runners = model.__dict__.get("_block_graphs", {}).values()
    return sorted({n for r in runners if not r.failed for n, g in r.graphs.items() if g[0] is not None})


@torch.inference_mode()
def step_vs_forward(model, ids: list[int], follow: list[int], device) -> dict:
    """Logits of the decode step autoregressive decoding uses (the CUDA graph on CUDA) vs model.forward, both fed
    the tokens `follow` after the prompt `ids`: how far apart the two are, whatever the tokens do."""
    step, cache = cuda_graphs.decode_step(model, len(ids) + len(follow) + 1)
    ref_cache = model.new_cache(len(ids) + len(follow) + 1)
    prompt = torch.tensor(ids, device=device)
    model(prompt, 0, cache)
    model(prompt, 0, ref_cache)
    worst, agree = 0.0, 0
    for i, token in enumerate(follow):
        pos = len(ids) + i
        expected = model(torch.tensor([token], device=device), pos, ref_cache)[-1]
        got = step(token, pos)
        worst = max(worst, float((expected - got).abs().max()))
        agree += int(expected.argmax()) == int(got.argmax())
    return {"max_abs_diff": worst, "argmax_agreement": agree / max(1, len(follow)), "steps": len(follow),
            "graph_active": graph_active(model)}


def section_identity(args, device, deadline) -> dict:
    shape = args.models[0]
    hf = build_hf(args, shape, args.layers, device)
    n_layers = hf.config.num_hidden_layers
    configs = speculative_configs(args, n_layers)
    out = {"model": shape, "layers": n_layers, "max_steps": args.identity_steps,
           "configs": {name: c for name, c in configs.items()}}
    if "ngram" not in configs:
        out["note"] = "PolicyConfig has no draft_source field: n-gram/tree drafts skipped"
    for name in dict.fromkeys(["float32", args.dtype]):
        dtype = DTYPES[name]
        model = ours_from(hf, dtype, device)
        res = out[name] = {}
        refs = []
        for ids in prompts(args, hf.config.vocab_size):
            refs.append(run_ours(model, ids, args.identity_steps, graphs=False)[0])
        res["reference_distinct_tokens"] = [len(set(r)) for r in refs]  # varied outputs, not one token repeated
        try:
            r = res["step_vs_forward"] = step_vs_forward(model, prompts(args, hf.config.vocab_size)[0], refs[0],
                                                         device)
            log(f"[identity] {name} decode step vs forward logits: max|diff| {r['max_abs_diff']:.3g}, argmax "
                f"agreement {r['argmax_agreement']:.3f} over {r['steps']} steps, graph active {r['graph_active']}")
        except Exception as e:  # noqa: BLE001
            res["step_vs_forward"] = error(e)
            log(f"[identity] {name} decode step vs forward: ERROR {res['step_vs_forward']['error']}")
        runs = {"cuda_graph_ar": dict(graphs=True)} | {n: dict(graphs=False, **c) for n, c in configs.items()}
        if "ngram" in configs:  # n-gram rounds verified through the block graphs
            runs["ngram_graphs"] = dict(graphs=True, **configs["ngram"])
            runs["adaptive_ngram_graphs"] = dict(graphs=True, **configs["ngram"], dynamic_early_exit_mode="adaptive")
        for run_name, kw in runs.items():
            if deadline.left() < 0:
                res[run_name] = {"skipped": "time budget spent"}
                continue
            try:
                same, diverge, drafted, accepted, passes, new = 0, [], 0, 0, 0, 0
                for ids, ref in zip(prompts(args, hf.config.vocab_size), refs):
                    tokens, stats = run_ours(model, ids, args.identity_steps, **kw)
                    same += tokens == ref
                    diverge.append(first_divergence(tokens, ref))
                    drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
                    passes, new = passes + stats.rounds, new + stats.new_tokens
                r = res[run_name] = {"identical": same, "total": len(refs), "first_divergence": diverge,
                                     "acceptance": accepted / drafted if drafted else None,
                                     "tokens_per_pass": (new - len(refs)) / passes if passes else None}
                if run_name == "cuda_graph_ar":
                    r["graph_active"] = graph_active(model)
                if run_name.endswith("ngram_graphs"):
                    r["block_graphs"] = block_graphs_active(model)
                acc = "" if r["acceptance"] is None else f", acceptance {r['acceptance']:.2f}"
                log(f"[identity] {name} {run_name}: {same}/{len(refs)} identical to autoregressive"
                    f"{acc}{'' if same == len(refs) else f', first divergence {diverge}'}"
                    + (f", graph active {r['graph_active']}" if "graph_active" in r else "")
                    + (f", block graphs {r['block_graphs']}" if "block_graphs" in r else ""))
            except Exception as e:  # noqa: BLE001
                res[run_name] = error(e)
                log(f"[identity] {name} {run_name}: ERROR {res[run_name]['error']}")
        del model
        free(device)
    return out


def timed(fn, device, repeats: int) -> tuple[float, list[float], object]:
    """Median wall seconds of fn() over `repeats` runs after one warm-up run (synchronised), the times, and the
    warm-up's result."""
    result = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, result


def hf_generate(hf, ids, steps, device, **extra):
    def run():
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = hf.generate(torch.tensor([ids], device=device), max_new_tokens=steps, min_new_tokens=steps,
                              do_sample=False, pad_token_id=0, **extra)
        return out.shape[1] - len(ids)
    return run


def section_speed(args, device, deadline) -> dict:
    out = {"dtype": args.dtype, "prompt_tokens": args.prompt_len, "new_tokens": args.speed_steps,
           "repeats": args.repeats}
    dtype = DTYPES[args.dtype]
    for shape in args.models:
        res = out[shape] = {}
        try:
            layers = args.llama1b_layers if shape == "llama1b" else args.layers
            model = ours_from(build_hf(args, shape, layers, device), dtype, device)
            hf = build_hf(args, shape, layers, device, dtype)
            ids = prompts(args, hf.config.vocab_size)[0][:args.prompt_len]
            res["layers"] = hf.config.num_hidden_layers
        except Exception as e:  # noqa: BLE001
            res["error"] = error(e)["error"]
            log(f"[speed] {shape}: ERROR building models {res['error']}")
            continue
        runs = {
            "ours_eager": lambda: run_ours(model, ids, args.speed_steps, graphs=False),
            "ours_cuda_graph": lambda: run_ours(model, ids, args.speed_steps, graphs=True),
            "hf_eager": hf_generate(hf, ids, args.speed_steps, device),
        }
        if "draft_source" in getattr(PolicyConfig, "__dataclass_fields__", {}):  # n-gram rounds, block graphs
            E = exit_layer(res["layers"])
            runs["ours_ngram_graphs"] = lambda: run_ours(model, ids, args.speed_steps, graphs=True, exit_layer=E,
                                                         draft_source="ngram", dynamic_early_exit_mode="adaptive")
        for name, fn in runs.items():
            if deadline.left() < 30:
                res[name] = {"skipped": "time budget spent"}
                continue
            try:
                seconds, times, result = timed(fn, device, args.repeats)
                r = res[name] = {"tok_s": args.speed_steps / seconds, "seconds": times}
                if name.startswith("ours"):
                    r["decode_tok_s"] = (result[1].new_tokens - 1) / (result[1].wall_time - result[1].prefill_time)
                if name == "ours_cuda_graph":
                    r["graph_active"] = graph_active(model)
                if name == "ours_ngram_graphs":  # acceptance on random weights says nothing; the pass costs do
                    r["tokens_per_pass"] = result[1].tokens_per_pass
                    r["block_graphs"] = block_graphs_active(model)
                log(f"[speed] {shape} {name}: {r['tok_s']:.1f} tok/s ({args.speed_steps} tokens, median of "
                    f"{args.repeats})" + (f", graph active {r['graph_active']}" if "graph_active" in r else "")
                    + (f", {r['tokens_per_pass']:.2f} tokens per pass, block graphs {r['block_graphs']}"
                       if "block_graphs" in r else ""))
            except Exception as e:  # noqa: BLE001
                res[name] = error(e)
                log(f"[speed] {shape} {name}: ERROR {res[name]['error']}")
        del hf, model
        free(device)
    return out


def section_hf_static(args, device: torch.device, deadline) -> dict:
    """HF generate with a static cache (torch.compile + CUDA graphs) on the first model, in a child process killed
    (with its compile workers: its own process group) after the cap. Last, so its compile cannot starve the rest."""
    shape = args.models[0]
    if device.type != "cuda" and not args.hf_static_on_cpu:
        log("[hf_static] skipped on CPU")
        return {"skipped": "not run on CPU (compile time)"}
    cap = min(args.hf_static_cap, deadline.left() + args.hf_static_extra)
    if cap < 30:
        log(f"[hf_static] skipped: {cap:.0f} s left for it")
        return {"skipped": f"time budget spent ({cap:.0f} s left for it)"}
    cmd = [sys.executable, os.path.abspath(__file__), "--hf_static_child", shape, "--device", str(device),
           "--dtype", args.dtype, "--seed", str(args.seed), "--init_std", str(args.init_std),
           "--deep_scale", str(args.deep_scale), "--prompt_len", str(args.prompt_len), "--speed_steps",
           str(args.speed_steps), "--repeats", str(args.repeats), "--layers", str(args.layers or 0)]
    if args.deep_from is not None:
        cmd += ["--deep_from", str(args.deep_from)]
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        # files, not pipes: compile workers that outlive a killed child would keep pipes open
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            rc = None
        try:  # the child's process group: it and any compile workers it started
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    base = {"model": shape, "dtype": args.dtype, "new_tokens": args.speed_steps, "cap_seconds": cap,
            "child_seconds": time.perf_counter() - t}
    if rc is None:
        log(f"[hf_static] {shape}: not finished within {cap:.0f} s (compile), skipped")
        return base | {"skipped": f"not finished within {cap:.0f} s", "stderr_tail": err[-2000:]}
    lines = [line for line in out.splitlines() if line.startswith("HF_STATIC ")]
    if rc != 0 or not lines:
        log(f"[hf_static] {shape}: child failed (rc {rc}): {err.strip().splitlines()[-1:] or ''}")
        return base | {"error": f"rc {rc}", "stderr_tail": err[-3000:]}
    r = base | json.loads(lines[-1][len("HF_STATIC "):])
    log(f"[hf_static] {shape} {args.dtype}: {r['tok_s']:.1f} tok/s ({args.speed_steps} tokens) after a "
        f"{r['first_call_seconds']:.1f} s first call (compile)")
    return r


def hf_static_child(args, device) -> None:
    dtype = DTYPES[args.dtype]
    hf = build_hf(args, args.hf_static_child, args.layers, device, dtype)
    ids = prompts(args, hf.config.vocab_size)[0][:args.prompt_len]
    run = hf_generate(hf, ids, args.speed_steps, device, cache_implementation="static")
    t = time.perf_counter()
    run()
    sync(device)
    first = time.perf_counter() - t
    run()  # a second warm-up: recompiles for the decode shape happen here if at all
    seconds, times, _ = timed(run, device, args.repeats)
    print("HF_STATIC " + json.dumps({"tok_s": args.speed_steps / seconds, "seconds": times,
                                     "first_call_seconds": first}), flush=True)


def section_verify_cost(args, device, deadline) -> dict:
    dtype = DTYPES[args.dtype]
    shape = args.models[0]
    model = ours_from(build_hf(args, shape, args.layers, device), dtype, device)
    context = args.prompt_len
    ns = [n for n in args.verify_ns if context + n <= 2048]
    cache = model.new_cache(context + max(ns))
    tokens = torch.arange(context + max(ns), device=device) % model.args.vocab_size
    ms = {}
    with torch.inference_mode():
        model(tokens[:context], 0, cache)
        for n in ns:
            if deadline.left() < 10:
                break

            def fn(n=n):
                model(tokens[context:context + n], context, cache)
                cache.rollback(context)
            seconds, _, _ = timed(fn, device, args.cost_repeats)
            ms[n] = seconds * 1e3
        graph_ms = None
        if device.type == "cuda":
            step, gcache = cuda_graphs.decode_step(model, context + 1)
            model(tokens[:context], 0, gcache)
            seconds, _, _ = timed(lambda: (step(1, context), gcache.rollback(context)), device, args.cost_repeats)
            graph_ms = seconds * 1e3 if graph_active(model) else None
    one = ms[1]
    out = {"model": shape, "dtype": args.dtype, "context": context, "ms": {str(n): v for n, v in ms.items()},
           "v": {str(n): v / one for n, v in ms.items()}, "graph_step_ms": graph_ms}
    log(f"[verify_cost] {shape} {args.dtype}: one position {one:.2f} ms; v(n) "
        + ", ".join(f"{n}:{v / one:.2f}" for n, v in ms.items())
        + ("" if graph_ms is None else f"; CUDA-graph step {graph_ms:.2f} ms"))
    return out


def count_profile(prof, steps: int, wall: float) -> dict:
    launches = graph_launches = aten = 0
    busy_us = 0.0
    for e in prof.events():
        name = e.name
        if name in LAUNCH_NAMES:
            launches += 1
        elif name in GRAPH_LAUNCH_NAMES:
            graph_launches += 1
        elif name.startswith("aten::"):
            aten += 1
        if "CUDA" in str(getattr(e, "device_type", "")):  # kernels, copies and sets that ran on the GPU
            busy_us += e.time_range.elapsed_us()
    return {"kernel_launches_per_step": launches / steps, "graph_launches_per_step": graph_launches / steps,
            "aten_ops_per_step": aten / steps, "gpu_busy_ms_per_step": busy_us / 1e3 / steps,
            "profiled_step_ms": wall * 1e3 / steps, "gpu_busy_share": busy_us / 1e6 / wall if wall else None}


def section_launches(args, device, deadline) -> dict:
    from torch.profiler import ProfilerActivity, profile
    dtype = DTYPES[args.dtype]
    shape = args.models[0]
    model = ours_from(build_hf(args, shape, args.layers, device), dtype, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    context, steps = args.prompt_len, args.profile_steps
    out = {"model": shape, "dtype": args.dtype, "steps": steps}
    for name, graphs in (("eager", False), ("cuda_graph", True)):
        saved = cuda_graphs.ENABLED
        cuda_graphs.ENABLED = graphs
        try:
            with torch.inference_mode():
                step, cache = cuda_graphs.decode_step(model, context + steps + 4)
                model(torch.arange(context, device=device) % model.args.vocab_size, 0, cache)
                for i in range(3):  # warm-up (and capture)
                    step(5, context + i)
                cache.rollback(context)
                sync(device)
                with profile(activities=activities) as prof:
                    t = time.perf_counter()
                    for i in range(steps):
                        int(step(5 + i, context + i).argmax())  # the host reads each token, as decoding does
                    sync(device)
                    wall = time.perf_counter() - t
            r = out[name] = count_profile(prof, steps, wall)
            r["graph_active"] = graph_active(model) if graphs else False
            log(f"[launches] {name}: {r['kernel_launches_per_step']:.0f} kernel launches + "
                f"{r['graph_launches_per_step']:.0f} graph launches per step, {r['aten_ops_per_step']:.0f} aten ops, "
                f"GPU busy {r['gpu_busy_ms_per_step']:.2f} of {r['profiled_step_ms']:.2f} ms "
                f"(profiled), graph active {r['graph_active']}")
        except Exception as e:  # noqa: BLE001
            out[name] = error(e)
            log(f"[launches] {name}: ERROR {out[name]['error']}")
        finally:
            cuda_graphs.ENABLED = saved
    return out


def section_real(args, device, deadline) -> dict:
    """The default model's own weights and built-in draft, carried with benchmarks/gpu_payload.py (--payload): our
    autoregressive decoding (the CUDA-graph step) against self-speculation with the draft (the default
    configuration, a chain of one) and n-gram drafting (verification blocks as CUDA graphs), on the payload's gsm8k
    and chat prompts: decode tok/s, ratios, tokens per pass, identity with autoregressive decoding."""
    if not args.payload:
        log("[real] skipped: no --payload (benchmarks/gpu_payload.py packs the real weights)")
        return {"skipped": "no --payload"}
    import dataclasses

    from gpu_payload import unpack

    from skiplayer.draft_artifact import resolve_draft
    from skiplayer.model.load import load_model
    path, site, prompts, manifest = unpack(Path(args.payload), Path(tempfile.gettempdir()) / "skiplayer_payload")
    sys.path.insert(0, str(site))  # the gguf package, for transformers' reader
    loaded = load_model(str(path), dtype="auto", device=str(device))  # the CLI's: the draft's weights (float16)
    loaded = dataclasses.replace(loaded, name=manifest["model"])  # the alias: its built-in draft
    draft = resolve_draft(None, loaded, say=log)
    E = max(draft.exit_layers) if draft else exit_layer(loaded.model.n_layers)
    configs = {"autoregressive": {},
               "default": dict(exit_layer=E, num_speculations=2, draft_source="both",
                               dynamic_early_exit_mode="adaptive"),
               "chain k=1": dict(exit_layer=E, num_speculations=1),
               "ngram adaptive": dict(exit_layer=E, draft_source="ngram", dynamic_early_exit_mode="adaptive")}
    steps = args.speed_steps
    out = {"model": manifest["model"], "sha256": manifest["sha256"], "dtype": str(loaded.dtype), "draft": bool(draft),
           "exit_layer": E, "new_tokens": steps, "configs": configs}

    def run(ids, policy):
        return run_ours(loaded.model, ids, steps, cuda_graphs.ENABLED, loaded, draft, **policy)

    for workload, texts in prompts.items():
        encoded = [loaded.encode(t) for t in (texts[:2] if args.quick else texts)]
        res = out[workload] = {}
        ref = [run(ids, {})[0] for ids in encoded]
        for name, policy in configs.items():
            if deadline.left() < 20:
                res[name] = {"skipped": "time budget spent"}
                continue
            tokens = seconds = passes = same = 0
            for ids, expected in zip(encoded, ref):
                # each prompt twice, the second timed: graphs are kept per cache size (prompt length), so the first
                # run of a prompt may capture; cost profiles are measured once
                for _ in range(2):
                    sync(device)
                    got, stats = run(ids, policy)
                    same += got == expected
                tokens, passes = tokens + stats.new_tokens - 1, passes + stats.rounds
                seconds += stats.wall_time - stats.prefill_time
            res[name] = {"decode_tok_s": tokens / seconds, "identical": same, "total": 2 * len(encoded),
                         "tokens_per_pass": tokens / passes if policy else 1.0}
        base = res["autoregressive"]["decode_tok_s"]
        for name, r in res.items():
            if "decode_tok_s" in r:
                r["vs_autoregressive"] = r["decode_tok_s"] / base
                log(f"[real] {workload} {name}: {r['decode_tok_s']:.1f} tok/s decoding, {r['vs_autoregressive']:.2f}x, "
                    f"{r['tokens_per_pass']:.2f} tokens per pass, {r['identical']}/{r['total']} identical")
    out["block_graphs"] = block_graphs_active(loaded.model)
    out["graph_active"] = graph_active(loaded.model)
    return out


# ------------------------------------------------------------------------------------------------------------- main

def error(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-3000:]}


def free(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def meta(args, device) -> dict:
    import transformers
    m = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
         "device": str(device), "cpu_count": os.cpu_count(), "args": {k: v for k, v in vars(args).items()}}
    if device.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(device)
        m["cuda"] = torch.version.cuda
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        m["commit"] = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                     timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git there
        m["commit"] = None
    return m


SECTIONS = {"real": section_real, "hf_equality": section_hf_equality, "identity": section_identity, "speed": section_speed,
            "verify_cost": section_verify_cost, "launches": section_launches, "hf_static": section_hf_static}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="model dtype for speed and the second identity run (default float16 on CUDA, float32 on CPU)")
    p.add_argument("--quick", action="store_true", help="few layers, steps and repeats (a minute on a CPU)")
    p.add_argument("--tiny", action="store_true", help="a tiny model instead of the real shapes (tests)")
    p.add_argument("--models", default=None, help="comma list of smollm2, llama1b (default both on CUDA)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    p.add_argument("--layers", type=int, default=None, help="layers of the first model (default: its own)")
    p.add_argument("--llama1b_layers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init_std", type=float, default=None, help="weight init std (default 0.05; tiny: 0.15)")
    p.add_argument("--deep_scale", type=float, default=0.06)
    p.add_argument("--deep_from", type=int, default=None, help="first scaled layer (default: the exit layer)")
    p.add_argument("--k", type=int, default=4, help="num_speculations")
    p.add_argument("--n_prompts", type=int, default=4)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--identity_steps", type=int, default=48)
    p.add_argument("--speed_steps", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cost_repeats", type=int, default=10)
    p.add_argument("--verify_ns", default="1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,32,64")
    p.add_argument("--profile_steps", type=int, default=8)
    p.add_argument("--hf_static_cap", type=float, default=200.0, help="seconds for HF's static-cache run (compiles)")
    p.add_argument("--hf_static_extra", type=float, default=60.0,
                   help="seconds HF's static run may go past --budget_s")
    p.add_argument("--hf_static_on_cpu", action="store_true")
    p.add_argument("--budget_s", type=float, default=380.0,
                   help="sections are skipped past this many seconds (hf_static may use --hf_static_extra more)")
    p.add_argument("--output_json", default=None, type=output_file)
    p.add_argument("--payload", default=None,
                   help="folder written by benchmarks/gpu_payload.py pack: the real weights for the 'real' section")
    p.add_argument("--hf_static_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    args.init_std = args.init_std or (0.15 if args.tiny else 0.05)
    if args.models is None:
        args.models = "tiny" if args.tiny else ("smollm2,llama1b" if cuda else "smollm2")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in SHAPES]
    if bad:
        p.error(f"unknown model shape {bad[0]}: use {', '.join(SHAPES)}")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section {bad[0]}: use {', '.join(SECTIONS)}")
    args.verify_ns = [int(n) for n in args.verify_ns.split(",")]
    if args.layers == 0:
        args.layers = None
    if args.quick and not args.hf_static_child:
        args.layers = args.layers or (None if args.tiny else 4)
        args.llama1b_layers = min(args.llama1b_layers, 2)
        args.n_prompts, args.prompt_len = min(args.n_prompts, 2), min(args.prompt_len, 32)
        args.identity_steps, args.speed_steps = min(args.identity_steps, 12), min(args.speed_steps, 12)
        args.repeats, args.cost_repeats, args.profile_steps = 1, 2, min(args.profile_steps, 3)
        args.verify_ns = [n for n in args.verify_ns if n in (1, 2, 4, 8)]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device: use --device cpu", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    if args.hf_static_child:
        hf_static_child(args, device)
        return 0
    deadline = Deadline(args.budget_s)
    t0 = time.perf_counter()
    report = {"meta": meta(args, device)}
    log(f"gpu_check on {report['meta'].get('gpu', device)}: torch {torch.__version__}, "
        f"transformers {report['meta']['transformers']}, models {args.models}, dtype {args.dtype}")

    def save():
        report["total_seconds"] = time.perf_counter() - t0
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump(report, f, indent=1, default=str)

    for name in args.sections:
        if deadline.left() < 0:
            report[name] = {"skipped": "time budget spent"}
            log(f"[{name}] skipped: time budget spent")
            continue
        t = time.perf_counter()
        try:
            report[name] = SECTIONS[name](args, device, deadline)
        except Exception as e:  # noqa: BLE001 - record it and go on with the next section
            report[name] = error(e)
            log(f"[{name}] ERROR {report[name]['error']}")
        if isinstance(report[name], dict):
            report[name]["section_seconds"] = time.perf_counter() - t
        free(device)
        save()
    save()
    log(f"done in {time.perf_counter() - t0:.0f} s" + (f"; JSON in {args.output_json}" if args.output_json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
