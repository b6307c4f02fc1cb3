"""Decode speed and verification cost of our forward per weight precision, against the machine's memory bandwidth.

    python benchmarks/verify_cost.py [--dtypes float32,bfloat16,float16] [--quantize none,int8] [--repeats 5]
        [--kernels auto|torch] [--compile] [--hf] [--quality] [--output_json out.json]
        [--update_doc docs/performance.md]

For every configuration (dtype x quantize):
  tok/s   greedy autoregressive decoding (model.forward(token, pos, cache) + argmax), --tokens new tokens per prompt
  GB/s    weight bytes read per token x tok/s, and that as a share of the streaming bandwidth measured here
          (`.sum()` over a 512 MB tensor): the physical limit of a memory-bound decode step
  v(n)    time of one verification pass over n positions (all layers + LM head) / time of one decode step, the
          median of ratios of passes timed back to back (a one-position pass, then the n-position one; every n once
          per repeat). Such a pass is compute-bound, so the fp32 matmul GFLOP/s measured at each repeat is printed
          beside its v(5): the compute a shared VM gave that repeat.
--hf adds HF `generate` (greedy, fp32) on the same prompts as the reference speed. --quality compares every
configuration with fp32: greedy token agreement over the prompts, max |logit error| (teacher-forced on fp32's
tokens), and how often the argmax of a position differs between a one-token step and the same position inside a
5-position block (batch-size-dependent kernels flip near-ties), over a few hundred positions of text.
All timed runs are interleaved (each configuration once per repeat, rotating order) and medians are reported, so
machine noise hits all configurations alike; `uptime` load is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from skiplayer.errors import output_file
from skiplayer.bench.stamp import cpu_description
from skiplayer.model.load import load_hf, load_model
from skiplayer.model.optimize import optimize_model, weight_bytes_per_token

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "Tell me about the history of Rome.",
]
TEXT = (  # public-domain prose (Jerome K. Jerome, Three Men in a Boat) for the T=1 vs T=5 argmax test
    "There were four of us - George, and William Samuel Harris, and myself, and Montmorency. We were sitting in my "
    "room, smoking, and talking about how bad we were - bad from a medical point of view I mean, of course. We were "
    "all feeling seedy, and we were getting quite nervous about it. Harris said he felt such extraordinary fits of "
    "giddiness come over him at times, that he hardly knew what he was doing; and then George said that he had fits "
    "of giddiness too, and hardly knew what he was doing. With me, it was my liver that was out of order. I knew it "
    "was my liver that was out of order, because I had just been reading a patent liver-pill circular, in which were "
    "detailed the various symptoms by which a man could tell when his liver was out of order. I had them all. It is "
    "a most extraordinary thing, but I never read a patent medicine advertisement without being impelled to the "
    "conclusion that I am suffering from the particular disease therein dealt with in its most virulent form. The "
    "diagnosis seems in every case to correspond exactly with all the sensations that I have ever felt. I remember "
    "going to the British Museum one day to read up the treatment for some slight ailment of which I had a touch - "
    "hay fever, I fancy it was. I got down the book, and read all I came to read; and then, in an unthinking moment, "
    "I idly turned the leaves, and began to indolently study diseases, generally. I forget which was the first "
    "distemper I plunged into - some fearful, devastating scourge, I know - and, before I had glanced half down the "
    "list of premonitory symptoms, it was borne in upon me that I had fairly got it."
)


def load_avg() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def cpu_name() -> str:
    return cpu_description()


def stream_gbps(repeats: int) -> float:
    """Streaming read bandwidth: .sum() over a 512 MB fp32 tensor (median of repeats)."""
    x = torch.ones(128 * 1024 * 1024)
    x.sum()
    times = []
    for _ in range(max(3, repeats)):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


def matmul_gflops(repeats: int = 5) -> float:
    """Floating-point throughput the CPU gives us right now: fp32 torch.mm (256x576 @ 576x576, in cache), median of
    repeats. A pass over several positions is compute-bound, and on this VM the FMA rate of a core moved by up to
    30% within minutes while its clock stayed put (other tenants share the cores' FMA units, presumably)."""
    a, b = torch.randn(256, 576), torch.randn(576, 576)
    a @ b
    times = []
    for _ in range(max(3, repeats)):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 256 * 576 * 576 / statistics.median(times) / 1e9


def decode_loop(model, prompt_ids: list[int], n_new: int) -> tuple[list[int], float]:
    """Plain greedy decoding; returns the new tokens and the seconds spent after the prefill."""
    cache = model.new_cache(len(prompt_ids) + n_new + 1)
    with torch.inference_mode():
        tok = model.forward(torch.tensor(prompt_ids), 0, cache)[-1].argmax()
        pos, out = len(prompt_ids), [int(tok)]
        t = time.perf_counter()
        for _ in range(n_new - 1):
            tok = model.forward(tok.view(1), pos, cache)[-1].argmax()
            pos += 1
            out.append(int(tok))
        return out, time.perf_counter() - t


def verify_times(model, context: int, max_n: int, reps: int = 5) -> dict[int, list[tuple[float, float]]]:
    """Per n = 1..max_n, `reps` pairs (seconds of a one-position forward, seconds of a forward over n positions run
    right after it), both at `context` (all layers + head, cache rolled back). Paired, so that v(n) is a ratio of
    two passes a few milliseconds apart: load drifts on a shared machine hit both alike."""
    cache = model.new_cache(context + max_n + 1)
    tokens = torch.arange(context + max_n) % model.args.vocab_size

    def once(n: int) -> float:
        cache.rollback(context)
        t = time.perf_counter()
        model.forward(tokens[context:context + n], context, cache)
        return time.perf_counter() - t

    with torch.inference_mode():
        model.forward(tokens[:context], 0, cache)
        once(1)
        pairs = {n: [] for n in range(1, max_n + 1)}
        for _ in range(reps):  # every n once per repeat: a slow spell of a shared machine does not land on one n
            for n in pairs:
                t1 = once(1)
                pairs[n].append((t1, once(n)))
        return pairs


def hf_decode(hf, prompt_ids: list[int], n_new: int) -> float:
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids])
        t = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t)


def quality(ref, model, prompts_ids: list[list[int]], text_ids: list[int], n_new: int, block: int = 5) -> dict:
    """Agreement with the fp32 reference and T=1 vs T=block argmax stability."""
    agree = total = 0
    max_err = 0.0
    with torch.inference_mode():
        for ids in prompts_ids:
            ref_out, _ = decode_loop(ref, ids, n_new)
            out, _ = decode_loop(model, ids, n_new)
            first_diff = next((i for i, (a, b) in enumerate(zip(ref_out, out)) if a != b), len(ref_out))
            agree += first_diff  # tokens identical before the first divergence
            total += len(ref_out)
            seq = torch.tensor(ids + ref_out)
            err = (ref.forward(seq, 0, ref.new_cache(len(seq))) - model.forward(seq, 0, model.new_cache(len(seq))))
            max_err = max(max_err, err[len(ids) - 1:].abs().max().item())
        # T=1 steps vs blocks of `block` positions over the same text, after an 8-token prefix.
        seq, start = torch.tensor(text_ids), 8
        c1, c5 = model.new_cache(len(seq)), model.new_cache(len(seq))
        model.forward(seq[:start], 0, c1)
        model.forward(seq[:start], 0, c5)
        one = torch.cat([model.forward(seq[p:p + 1], p, c1) for p in range(start, len(seq))])
        five = torch.cat([model.forward(seq[p:p + block], p, c5) for p in range(start, len(seq), block)])
        flips = int((one.argmax(-1) != five.argmax(-1)).sum())
        identical = bool(torch.equal(one, five))
    return {"prefix_agreement": agree / total, "max_abs_logit_err": max_err, "flips_T1_vs_T5": flips,
            "positions": len(seq) - start, "logits_bit_identical_T1_T5": identical}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated weight dtypes")
    p.add_argument("--quantize", default="none,int8", help="comma-separated: none, int8 (int8 is run on the first "
                   "dtype only, as its activation dtype)")
    p.add_argument("--kernels", default="auto", choices=["auto", "native", "torch"])
    p.add_argument("--compile", action="store_true", help="optimize_model(compile=True)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--max_n", type=int, default=9)
    p.add_argument("--context", type=int, default=64, help="positions in the cache before the verification pass")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--hf", action="store_true", help="also time HF generate (greedy, fp32) as the reference")
    p.add_argument("--quality", action="store_true", help="agreement with fp32 and T=1 vs T=5 argmax flips")
    p.add_argument("--output_json", default=None, type=output_file)
    p.add_argument("--update_doc", "--update_readme", dest="update_doc", default=None, metavar="docs/performance.md",
                   help="also write the printed tables, with this command, between the verify_cost markers of this "
                   "markdown file (--update_readme: the former name)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dtypes = [d for d in args.dtypes.split(",") if d]
    configs = []  # (label, dtype, quantize)
    for q in [q for q in args.quantize.split(",") if q]:
        for d in (dtypes if q == "none" else dtypes[:1]):
            configs.append((d if q == "none" else f"{d}+{q}", d, None if q == "none" else q))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load_avg()}", flush=True)
    models, lm = {}, None
    for label, d, q in configs:
        lm = load_model(args.model, dtype=d, quantize=q, compile=args.compile)
        # load_model already optimised it with the default kernels; repacking every weight again only for the
        # same choice moved them to new allocations (and cost time)
        models[label] = lm.model if args.kernels == "auto" else optimize_model(lm.model, q, args.compile,
                                                                               kernels=args.kernels)
    prompts_ids = [lm.encode(pr) for pr in PROMPTS]
    hf = load_hf(lm.hf_path, torch.float32)[0] if args.hf else None

    bw = stream_gbps(args.repeats)
    gflops = []  # per repeat
    tok_s = {k: [] for k in models}
    vt = {k: {n: [] for n in range(1, args.max_n + 1)} for k in models}
    n5 = min(5, args.max_n)
    v5_per_repeat = {k: [] for k in models}  # v(n5) of each repeat, to read against gflops
    hf_tok_s = []
    names = list(models) + (["hf"] if hf is not None else [])
    for r in range(args.repeats):  # interleaved: every configuration once per repeat, rotating order
        gflops.append(matmul_gflops())
        for k in names[r % len(names):] + names[:r % len(names)]:
            if k == "hf":
                hf_tok_s.append(statistics.median(hf_decode(hf, ids, args.tokens) for ids in prompts_ids))
                continue
            n_tok = secs = 0
            for ids in prompts_ids:
                out, s = decode_loop(models[k], ids, args.tokens)
                n_tok, secs = n_tok + len(out) - 1, secs + s
            tok_s[k].append(n_tok / secs)
            for n, pairs in verify_times(models[k], args.context, args.max_n).items():
                vt[k][n] += pairs
                if n == n5:
                    v5_per_repeat[k].append(statistics.median(tn / t1 for t1, tn in pairs))
        print(f"repeat {r + 1}/{args.repeats} done, load {load_avg()}, fp32 matmul {gflops[-1]:.0f} GFLOP/s",
              flush=True)
    bw_end = stream_gbps(args.repeats)

    rows = {}
    for k, m in models.items():
        wb = weight_bytes_per_token(m)
        ts = statistics.median(tok_s[k])
        step = statistics.median(t1 for t1, _ in vt[k][1])
        rows[k] = {"tok_s": ts, "tok_s_all": tok_s[k], "weight_MB": wb / 1e6, "eff_GBps": wb * ts / 1e9,
                   "share_of_stream": wb * ts / 1e9 / max(bw, bw_end),
                   "step_ms": step * 1e3, "v5_per_repeat": v5_per_repeat[k],
                   "v": {n: statistics.median(tn / t1 for t1, tn in vt[k][n]) for n in range(1, args.max_n + 1)}}
    hf_med = statistics.median(hf_tok_s) if hf_tok_s else None
    if args.quality:
        ref = models.get("float32") or optimize_model(load_model(args.model, dtype="float32").model,
                                                                 kernels=args.kernels)
        text_ids = lm.tokenizer(TEXT)["input_ids"][:300]
        for k, m in models.items():
            rows[k]["quality"] = quality(ref, m, prompts_ids, text_ids, args.tokens)

    cpu = cpu_name()
    out = [f"CPU: {cpu}, {torch.get_num_threads()} threads"]
    out.append(f"streaming read: {bw:.1f} GB/s (start), {bw_end:.1f} GB/s (end); load now {load_avg()}; "
          f"{args.tokens} new tokens x {len(PROMPTS)} prompts, {args.repeats} repeats, kernels={args.kernels}, "
          f"compile={args.compile}")
    out.append(f"fp32 matmul in cache (compute available to a verification pass), per repeat: "
               f"{', '.join(f'{g:.0f}' for g in gflops)} GFLOP/s")
    if hf_med:
        out.append(f"HF generate fp32: {hf_med:.1f} tok/s (runs: {', '.join(f'{x:.1f}' for x in hf_tok_s)})")
    vcols = " | ".join(f"v({n})" for n in range(2, args.max_n + 1))
    out.append("")
    out.append(f"| config | tok/s | x HF | weights MB | GB/s | % stream | step ms | {vcols} |")
    out.append("|---" * (7 + args.max_n - 1) + "|")
    for k, r in rows.items():
        xhf = f"{r['tok_s'] / hf_med:.2f}" if hf_med else "-"
        vs = " | ".join(f"{r['v'][n]:.2f}" for n in range(2, args.max_n + 1))
        out.append(f"| {k} | {r['tok_s']:.1f} | {xhf} | {r['weight_MB']:.0f} | {r['eff_GBps']:.1f} | "
                   f"{100 * r['share_of_stream']:.0f}% | {r['step_ms']:.1f} | {vs} |")
    out.append("")
    out.append(f"v({n5}) per repeat, beside that repeat's fp32 matmul GFLOP/s:")
    for k, r in rows.items():
        out.append(f"- {k}: " + ", ".join(f"{v:.2f} ({g:.0f})" for v, g in zip(r["v5_per_repeat"], gflops)))
    if args.quality:
        out.append("")
        out.append("| config | greedy prefix agreement with fp32 | max abs logit err | T=1 vs T=5 argmax flips | "
                   "logits bit-identical T=1/T=5 |")
        out.append("|---|---|---|---|---|")
        for k, r in rows.items():
            qd = r["quality"]
            out.append(f"| {k} | {100 * qd['prefix_agreement']:.1f}% | {qd['max_abs_logit_err']:.3g} | "
                       f"{qd['flips_T1_vs_T5']}/{qd['positions']} | {qd['logits_bit_identical_T1_T5']} |")
    print("\n" + "\n".join(out))
    if args.update_doc:
        update_doc(args.update_doc, out)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "cpu": cpu, "stream_GBps": [bw, bw_end], "matmul_GFLOPs": gflops,
                       "hf_tok_s": hf_tok_s, "configs": rows,
                       "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}, f, indent=1)


DOC_START, DOC_END = "<!-- verify_cost:start -->", "<!-- verify_cost:end -->"


def update_doc(path: str, lines: list[str]) -> None:
    """Replace the text between the markers with the command and its tables (numbers come from this run only)."""
    import shlex
    import sys

    text = open(path).read()
    if DOC_START not in text or DOC_END not in text:
        raise SystemExit(f"{path} has no '{DOC_START}' ... '{DOC_END}' markers: add them where the tables go")
    head, rest = text.split(DOC_START, 1)
    tail = rest.split(DOC_END, 1)[1]
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/verify_cost.py", *sys.argv[1:]])
    body = [f"Generated by `{command}` on {time.strftime('%Y-%m-%d')}:", "", *lines]
    with open(path, "w") as f:
        f.write(head + DOC_START + "\n" + "\n".join(body) + "\n" + DOC_END + tail)


if __name__ == "__main__":
    main()
