"""Command-line options shared by every command that runs a model (names follow LayerSkip's generate.py /
benchmark.py), and their translation into configs."""
from __future__ import annotations

import argparse

from skiplayer.decoding.generate import STRATEGIES, GenerationConfig
from skiplayer.decoding.sampling import SamplingConfig
from skiplayer.model.gguf_blocks import GGUF_ACTIVATIONS
from skiplayer.model.load import ALIASES, DEFAULT_MODEL, DTYPES
from skiplayer.policies import BEST_POLICY, DRAFT_SOURCES, MODES, POLICY_CHOICES, PolicyConfig, unset_policy_defaults

# auto: float16 for the Llama family (fp32 accumulation in the native kernels: on the 2-core AVX2 machine 1.3x the
# tok/s of float32 with the same greedy output on the measured prompts, benchmarks/verify_cost.py --quality), float32
# for Gemma 3, which overflows float16 (model/load.py auto_dtype).
DEFAULT_DTYPE = "auto"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"HF model directory or hub id (downloaded by HF unless --offline), a .gguf file, or an alias: "
                        f"{', '.join(ALIASES)} (default {DEFAULT_MODEL})")
    g.add_argument("--offline", action="store_true",
                   help="no downloads: hub models and datasets come from the local HF cache only (as HF_HUB_OFFLINE=1)")
    g.add_argument("--dtype", default=DEFAULT_DTYPE, choices=["auto", *DTYPES],
                   help="weight and activation dtype; auto (default): float16, float32 for Gemma 3 (it overflows "
                        "float16)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default %(default)s)")
    g.add_argument("--quantize", default="auto", choices=["auto", "gguf", "int8", "none"],
                   help="weights: gguf (a .gguf model's own Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K blocks, unexpanded), int8 "
                        "(weight-only, per output channel), none (floats in --dtype); auto: gguf for a .gguf model where the "
                        "native kernels build, else none. Activations stay in --dtype")
    g.add_argument("--gguf_activations", default="auto", choices=list(GGUF_ACTIVATIONS),
                   help="with --quantize gguf, how the block kernels take activations: int8 (one int8 value per "
                        "element and a scale per 32, as llama.cpp: integer dot products on AVX-512 VNNI and AVX2), "
                        "int8x2 (two int8 parts, ~16 bits, on AMX / VNNI; fp32 on AVX2); auto: int8x2 on AMX, "
                        "else int8")
    g.add_argument("--prefill", default="auto", choices=["auto", "bfloat16", "native"],
                   help="how the prompt runs: bfloat16 (oneDNN matmuls + flash attention), native (the decoding "
                        "kernels); auto: bfloat16 on CPUs with AMX, else native")
    g.add_argument("--compile", action="store_true", help="torch.compile the cache-free half of each block")
    g.add_argument("--draft", default=None, help="calibrated draft artifact from `skiplayer calibrate`; 'none' for "
                   "no draft (default: the built-in draft of the default model, when the package ships one)")
    g.add_argument("--no_chat_template", action="store_true", help="feed prompts as plain text even for chat models")


def add_generation_arguments(p: argparse.ArgumentParser, max_steps: int = 128) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--generation_strategy", default="autoregressive", choices=STRATEGIES)
    g.add_argument("--max_steps", type=int, default=max_steps, help="maximum new tokens (default %(default)s)")
    g.add_argument("--exit_layer", type=int, default=None,
                   help="draft exit layer E, max depth for dynamic modes (default: the draft's exit layer, else 8)")
    g.add_argument("--num_speculations", type=int, default=None,
                   help="(maximum) draft tokens per round k (default 2 with none of --exit_layer, --draft_source, "
                        "--dynamic_early_exit_mode given, else 4)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_k", type=int, default=0, help="0 = off")
    g.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop_words", nargs="*", default=None, help="stop when the text contains one of these")
    g.add_argument("--stop_token_ids", nargs="*", type=int, default=[], help="extra token ids that end generation")
    t = p.add_argument_group("draft sources (token trees)")
    t.add_argument("--draft_source", default=None, choices=DRAFT_SOURCES,
                   help="self: the model's first E layers (LayerSkip); ngram: prompt lookup in prompt + output (no "
                        "draft layers); both: merged into one token tree verified in one pass (default both with "
                        "none of --exit_layer, --num_speculations, --dynamic_early_exit_mode given, else self)")
    t.add_argument("--ngram_tokens", type=int, default=4, help="longest n-gram run drafted per round (default 4)")
    t.add_argument("--ngram_table", choices=["on", "off"], default="on",
                   help="on (default): where prompt + output has no match, or a shorter one than the table's, n-gram "
                        "drafts come from the draft's table of what the model wrote in calibration (when the draft has "
                        "one); off: prompt lookup only")
    t.add_argument("--ngram_max", type=int, default=3,
                   help="longest suffix matched in the context, then shorter ones down to 1 token (default 3)")
    t.add_argument("--tree_width", type=int, default=1,
                   help="draft candidates per drafted position: the draft head's ranks 2..W join the tree as "
                        "siblings of the chain (1 = a chain; default %(default)s)")
    t.add_argument("--tree_budget", type=int, default=None,
                   help="most tree nodes per round beside the pending token; the siblings with the highest draft "
                        "path probability fill it (default: all)")
    d = p.add_argument_group("dynamic early exit")
    d.add_argument("--dynamic_early_exit_mode", default=None,
                   help=f"one of: {', '.join(MODES)} (default adaptive with none of --exit_layer, --num_speculations, "
                        f"--draft_source given, else none)")
    d.add_argument("--layer_skip_proportion", type=float, default=0.0,
                   help="skip each draft layer in [1, E) with this probability (0..1)")
    d.add_argument("--min_exit_layer", type=int, default=1)
    d.add_argument("--consistent_tokens_count", type=int, default=4)
    d.add_argument("--random_exit_low", type=int, default=None)
    d.add_argument("--random_exit_high", type=int, default=None)
    d.add_argument("--confidence_threshold", type=float, default=0.9)
    d.add_argument("--stop_threshold", type=float, default=None)
    d.add_argument("--future_ema", type=float, default=0.5, help="logits_future: weight of the newest round")


def fill_policy_defaults(args, best: bool = False) -> None:
    """Set the policy flags left unset (None): BEST_POLICY where `best`, else as `unset_policy_defaults` says for the
    flags given (policies/__init__.py). Before the draft sets --exit_layer (load_from_args)."""
    given = [key for key in POLICY_CHOICES if getattr(args, key, None) is not None]
    for key, value in (BEST_POLICY if best else unset_policy_defaults(given)).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def policy_config(args) -> PolicyConfig:
    fill_policy_defaults(args)
    return PolicyConfig(
        exit_layer=8 if args.exit_layer is None else args.exit_layer, num_speculations=args.num_speculations,
        dynamic_early_exit_mode=args.dynamic_early_exit_mode, layer_skip_proportion=args.layer_skip_proportion,
        min_exit_layer=args.min_exit_layer, consistent_tokens_count=args.consistent_tokens_count,
        random_exit_low=args.random_exit_low, random_exit_high=args.random_exit_high,
        confidence_threshold=args.confidence_threshold, stop_threshold=args.stop_threshold,
        future_ema=args.future_ema, seed=args.seed, draft_source=args.draft_source, ngram_tokens=args.ngram_tokens,
        ngram_max=args.ngram_max, ngram_table=args.ngram_table == "on", tree_width=args.tree_width,
        tree_budget=args.tree_budget)


def generation_config(args, **overrides) -> GenerationConfig:
    config = GenerationConfig(
        max_steps=args.max_steps, generation_strategy=args.generation_strategy,
        sampling=SamplingConfig(args.sample, args.temperature, args.top_k, args.top_p),
        policy=policy_config(args), seed=args.seed, stop_words=list(args.stop_words or []),
        stop_token_ids=list(args.stop_token_ids))
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def load_from_args(args):
    """Load the model (and draft artifact) named on the command line."""
    from skiplayer.model.load import load_model
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, quantize=getattr(args, "quantize", None),
                        prefill=getattr(args, "prefill", "auto"),
                        gguf_activations=getattr(args, "gguf_activations", "auto"),
                        compile=getattr(args, "compile", False), offline=getattr(args, "offline", False))
    if hasattr(args, "draft_source"):  # a command with generation flags: decide the unset ones on what was given
        fill_policy_defaults(args)
    draft = None
    if getattr(args, "generation_strategy", "self_speculative") == "self_speculative" or getattr(args, "draft", None):
        from skiplayer.draft_artifact import resolve_draft
        draft = resolve_draft(getattr(args, "draft", None), loaded)  # unset: the built-in draft, if any
        if draft is not None and getattr(args, "exit_layer", 0) is None:
            args.exit_layer = draft.exit_layers[0]  # draft where the draft was calibrated
    return loaded, draft
