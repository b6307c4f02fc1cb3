"""CPU speed: weight precision (bf16 / fp16 / int8 weight-only), small-batch matmul kernels, optional torch.compile.

Why a kernel of our own. Decoding is memory-bound: every weight is read once per step. A verification pass over
k+1 <= 9 positions should cost about one step, but stock PyTorch kernels do not get there on AVX2 CPUs: MKL's
`F.linear` with 5 rows costs 1.7-2.6x one row in fp32, and bf16/fp16 `F.linear` with 5 rows costs 5-7x one row
(no native bf16 on AVX2; oneDNN converts), `aten._weight_int8pack_mm` is fast only on AVX-512. `small_linear` below
reads each weight row once and multiplies it with up to 6 input rows held in registers (fp32 accumulation; bf16,
fp16 and int8 weights are widened in registers), so T = 1..6 cost little more than one. Weights are stored with
pairs of rows interleaved (model/packing.py) so that each tile reads one sequential stream, and a range of decoder
layers runs as one native call (`decoder_layers`), without the Python overhead of ~12 small ops per layer. A block
of up to 16 positions runs that whole range inside one parallel region (the decoding team: threads meet at a
barrier between operations and each prepares the few input rows itself), not a region per product with the glue
between them on one thread.

It is also *batch invariant*: every output element is accumulated in the same order whatever the number of rows
and threads, so a position's logits are bit-identical in a one-token step and inside a verification block.
Speculative decoding then reproduces plain greedy decoding exactly, not just up to near-ties. The one exception is
a prompt's attention on AVX-512 CPUs (kernels/attention.h: a block of 64+ positions at position 0, deterministic,
within rounding of the one-row loops): both strategies run the same prefill, and verification blocks never start at 0.

The kernels' C++ is in kernels/ (common.h, ops.cpp; avx2.cpp for AVX2 + FMA + F16C; avx512.cpp, avx512_vnni.cpp and
amx.cpp for the GGUF block products on CPUs with AVX-512 / VNNI / AMX, model/gguf_blocks.py, and a prompt's attention,
chosen at run time). It is compiled once per
machine with `torch.utils.cpp_extension` (needs g++ and `ninja`, ~30-60 s, cached under ~/.cache/torch_extensions in a
folder named by the torch version, the flags and the sources: `kernel_build_name`); without AVX2, a compiler or ninja
everything falls back to stock PyTorch with a warning, and `SKIPLAYER_NATIVE_KERNELS=0` turns it off.

int8 is weight-only, symmetric, per output channel (scale = max|w| / 127): the format of
`torch.ops.aten._weight_int8pack_mm` and of torchao's `Int8WeightOnlyConfig`. Activations, norms, attention and the
KV cache stay in the model dtype; accumulation is fp32. Without the native kernels, int8 blocks of more than one
position (prefill) use `F.linear` on the dequantised weight.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import warnings

import torch
from torch import nn

from skiplayer.model.llama import Attention, FeedForward, Linear, RMSNorm, Transformer, mlp_residual
from skiplayer.model.packing import pack_pairs, unpack_pairs

QUANTIZE = (None, "int8")

# The kernels' C++ sources (kernels/): shared parts (common.h, ops.cpp: the op schemas) and one file per
# instruction-set family: avx2.cpp with the build flags (AVX2 + FMA + F16C); avx512.cpp, avx512_vnni.cpp and amx.cpp
# under their own target pragmas, called only where the CPU has those units (qblocks.h: their plain-C interface).
_KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
_KERNEL_SOURCES = ("ops.cpp", "avx2.cpp", "avx512.cpp", "avx512_vnni.cpp", "amx.cpp")  # compiled, in this order
_KERNEL_HEADERS = ("common.h", "qblocks.h", "tiles.h", "attention.h")  # included: part of the build key, not compiled on their own
_KERNEL_CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp")
_KERNEL_LDFLAGS = ("-fopenmp",)

_native: bool | None = None  # None: not tried yet


def native_kernels_available(build: bool = True) -> bool:
    """Compile (once per machine) and load `torch.ops.skiplayer.small_linear`; False, with one warning, when this
    machine cannot (no AVX2, no g++/ninja, build error) or SKIPLAYER_NATIVE_KERNELS=0."""
    global _native
    if _native is not None or not build:
        return bool(_native)
    _native = False
    if os.environ.get("SKIPLAYER_NATIVE_KERNELS", "1") == "0":
        return False
    if hasattr(torch.ops, "skiplayer") and hasattr(torch.ops.skiplayer, "small_linear"):
        _native = True
        return True
    reason = None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        reason = f"this CPU has no AVX2 ({torch.backends.cpu.get_cpu_capability()})"
    elif not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        reason = "no C++ compiler found"
    else:
        try:
            from torch.utils.cpp_extension import is_ninja_available, load
            if not is_ninja_available():
                reason = "ninja is not installed (pip install ninja)"
            else:
                name = kernel_build_name()
                _say_if_building(name)
                _remove_stale_lock(name)
                load(name, sources=[os.path.join(_KERNEL_DIR, s) for s in _KERNEL_SOURCES],
                     extra_cflags=list(_KERNEL_CFLAGS), extra_ldflags=list(_KERNEL_LDFLAGS),
                     is_python_module=False, verbose=False)
                _register_fake()
                _native = True
        except Exception as e:  # a failed build must not stop decoding: stock kernels still work
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    if reason:
        warnings.warn(f"skiplayer: native CPU kernels unavailable ({reason}); using stock PyTorch matmuls, "
                      f"verification passes will cost more", stacklevel=2)
    return _native


def kernel_build_name() -> str:
    """The extension's name, hence its build folder under ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR): keyed
    by the torch version, the compile flags and the sources, so that venvs with different torch versions (or
    checkouts with different kernels) each keep their own build instead of rebuilding each other's."""
    h = hashlib.sha256()
    for part in (torch.__version__, " ".join(_KERNEL_CFLAGS), " ".join(_KERNEL_LDFLAGS)):
        h.update(part.encode() + b"\0")
    for f in _KERNEL_HEADERS + _KERNEL_SOURCES:
        with open(os.path.join(_KERNEL_DIR, f), "rb") as fh:
            h.update(f.encode() + b"\0" + fh.read() + b"\0")
    return f"skiplayer_kernels_{h.hexdigest()[:16]}"


def _say_if_building(name: str) -> None:
    try:
        from torch.utils.cpp_extension import _get_build_directory
        if not os.path.exists(os.path.join(_get_build_directory(name, False), f"{name}.so")):
            print("[skiplayer] compiling native CPU kernels (once per machine, about a minute)", file=sys.stderr,
                  flush=True)
    except Exception:
        pass


def _remove_stale_lock(name: str, max_age_s: float = 600.0) -> None:
    """torch's extension builder waits forever on a lock file left by a build that was killed; a lock older than
    any real build (about a minute) is such a leftover."""
    try:
        import time
        from torch.utils.cpp_extension import _get_build_directory
        lock = os.path.join(_get_build_directory(name, False), "lock")
        if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > max_age_s:
            os.remove(lock)
    except OSError:
        pass


def _register_fake() -> None:
    """Shapes for torch.compile / meta tensors."""
    @torch.library.register_fake("skiplayer::small_linear")
    def _(x, w, scale, bias, float_out, packed=False, prompt=False):
        return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32 if float_out else x.dtype)

    @torch.library.register_fake("skiplayer::rms_norm")
    def _(x, w, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("skiplayer::silu_mul")
    def _(gate_up):
        return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))

    @torch.library.register_fake("skiplayer::gelu_tanh_mul")
    def _(gate_up):
        return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))

    @torch.library.register_fake("skiplayer::decoder_layers")
    def _(x, weights, scales, qkv_bias, cos, sin, k, v, first, start, n_heads, n_kv_heads, eps, packed, keep,
          tree, layer_norms, windows, cos_local, sin_local, gelu):
        return [torch.empty_like(x) for _ in range(len(keep) + 1)]

    @torch.library.register_fake("skiplayer::rope_cache_attention")
    def _(qkv, cos, sin, kc, vc, start, n_heads, n_kv_heads, attend, tree=None, window=0):
        return qkv.new_empty((qkv.shape[0] if attend else 0, n_heads * kc.shape[2]))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight ≈ q * scale[:, None]; scale in fp32."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _relayout(module: nn.Module, packed: bool) -> None:
    """Replace module.weight by its pair-packed (or, from packed, row-major) copy."""
    w = module.weight.detach()
    module.weight = nn.Parameter(pack_pairs(w) if packed else unpack_pairs(w), requires_grad=False)


def _set_packed(lin: Linear, packed: bool) -> None:
    if lin.packed != packed:
        _relayout(lin, packed)
        lin.packed = packed


def _set_head_packed(model: Transformer, packed: bool) -> None:
    if model.head_packed != packed:
        _relayout(model.tok_embeddings if model.output is None else model.output, packed)
        model.head_packed = packed


def _quantize_linear(lin: Linear) -> None:
    q, scale = quantize_int8(lin.weight)
    lin.weight = nn.Parameter(q, requires_grad=False)
    lin.scale = scale


def optimize_model(model: Transformer, quantize: str | None = None, compile: bool | str = False,
                   native_rows: int | None = None, kernels: str = "auto", prefill: str = "auto") -> Transformer:
    """Speed up `model` in place (and return it) without changing what it computes beyond the chosen precision.

    quantize: None, or "int8" (weight-only per-channel int8 for every layer matrix and the LM head; the embedding
        table, norms, attention and KV cache keep the model dtype).
    kernels: "auto" (native small-batch kernels when they can be built, else stock PyTorch with a warning),
        "native" (error if they cannot be built) or "torch" (stock PyTorch only).
    native_rows: blocks of up to this many positions use the native kernel (default: every block; then the weights
        are stored pair-packed, model/packing.py, which the kernel streams ~1.3x faster, and each layer runs as one
        native call). A limit keeps row-major weights and F.linear above it (231-token fp32 prefill of the default
        model: packed native 0.58-0.60 s, MKL above 16 rows 0.61-0.63 s; half weights: F.linear ~4x slower).
    prefill: how a long prompt block runs (model/prefill.py): "bfloat16" (oneDNN matmuls and flash attention),
        "native" (the decoding kernels), or "auto" (bfloat16 where the CPU has AMX; SKIPLAYER_PREFILL overrides).
    compile: False, True or "auto" ("auto" = False: see below). True compiles the cache-free half of every block
        (norm, feed-forward, residual: llama.mlp_residual) with torch.compile, one dynamic-shape graph for all layers;
        the native matmuls stay opaque custom ops inside it. Measured on the 2-core AVX2 machine (benchmarks/): with
        the native kernels almost all of a step is matmul, so compiling gains nothing measurable, and inductor's own
        matmuls with freezing (weight prepacking) stayed well behind them for 2-9 rows.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    if kernels not in ("auto", "native", "torch"):
        raise ValueError(f"kernels must be 'auto', 'native' or 'torch', got {kernels!r}")
    for mod in model.modules():  # row-major again first: quantisation and the choices below see plain weights
        if isinstance(mod, Linear):
            _set_packed(mod, False)
    _set_head_packed(model, False)
    if kernels == "torch" and any(isinstance(m, Linear) and m.weight.dtype == torch.uint8 for m in model.modules()):
        raise ValueError("GGUF block weights need the native kernels: use kernels='auto' or 'native'")
    if quantize == "int8":
        if model.lm_head is None:  # the head gets its own quantised copy; head_weight (and the embedding) stay float
            model.lm_head = Linear(model.args.dim, model.args.vocab_size, bias=False, device="meta")
            model.lm_head.weight = nn.Parameter(model.head_weight.detach(), requires_grad=False)
        for mod in model.modules():  # model.output (untied head) stays float as head_weight; lm_head replaces it
            if isinstance(mod, Linear) and mod is not model.output and mod.weight.is_floating_point():
                _quantize_linear(mod)
    on_cpu = model.head_weight.device.type == "cpu"
    use_native = kernels != "torch" and on_cpu and native_kernels_available()
    if kernels == "native" and not use_native:
        raise RuntimeError("native kernels requested but unavailable (see the warning above)")
    rows = (sys.maxsize if native_rows is None else native_rows) if use_native else 0
    model.native_rows = rows
    pack = rows == sys.maxsize  # the packed layout only where every block size runs the native kernel
    # The float head (tied embedding table or model.output) when it is the one decoding reads (an int8 lm_head
    # replaces it otherwise): Transformer.embed and head_rows read rows of it in either layout.
    _set_head_packed(model, pack and model.lm_head is None and model.args.dim % 8 == 0)
    for mod in model.modules():
        if isinstance(mod, Linear):
            mod.native_rows = rows
            # model.output is head_weight, packed below with the tied case; GGUF blocks keep the file's layout.
            _set_packed(mod, pack and mod is not model.output and mod.in_features % 8 == 0
                        and mod.weight.dtype != torch.uint8)
        elif isinstance(mod, (RMSNorm, FeedForward)):
            mod.native = use_native
        elif isinstance(mod, Attention):
            mod.native = use_native and mod.head_dim % 8 == 0
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    compiled = _compiled_mlp() if compile is True else None
    for block in model.layers:
        if compiled is not None:
            block.mlp = compiled
        elif "mlp" in block.__dict__:
            del block.mlp  # back to the eager class attribute
        at, ff = block.attention, block.feed_forward
        a = model.args  # decoder_layers takes Gemma's q/k and sandwich norms together, and SwiGLU or GeGLU
        one_call = (at.native and compiled is None and at.wqkv.packed == at.wo.packed == ff.w13.packed == ff.w2.packed
                    and a.qk_norm == a.sandwich_norms and a.hidden_act in ("silu", "gelu_tanh"))
        gemma = [at.q_norm.weight, at.k_norm.weight, block.post_attention_norm.weight, block.post_ffn_norm.weight] \
            if one_call and a.qk_norm else []  # Gemma 3's variations (ModelArgs), which decoder_layers also takes
        block.native_args = ([block.attention_norm.weight, at.wqkv.weight, at.wo.weight, block.ffn_norm.weight,
                              ff.w13.weight, ff.w2.weight], [at.wqkv.scale, at.wo.scale, ff.w13.scale, ff.w2.scale],
                             [at.wqkv.bias], gemma, [at.window] if a.sliding_layers else []) \
            if one_call else None
    from skiplayer.model.prefill import Bfloat16Prefill, choose
    wide = choose(prefill) == "bfloat16" and model.args.llama_layers  # it runs Llama layers only
    model.wide_prefill = Bfloat16Prefill(model) if on_cpu and wide else None
    model.native_stack = None
    if all(block.native_args is not None for block in model.layers):
        model.native_stack = tuple([x for block in model.layers for x in block.native_args[i]] for i in range(5))
    return model.eval().requires_grad_(False)


_compiled = None


def _compiled_mlp():
    """torch.compile of llama.mlp_residual with dynamic block sizes: one graph for all layers and T (weights are
    graph inputs, so no per-layer specialisation; inductor freezing does not apply to it)."""
    global _compiled
    if _compiled is None:
        import torch._dynamo
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled = torch.compile(mlp_residual, dynamic=True)
    return _compiled


def describe_weights(model: Transformer) -> str:
    """How the layer matrices and head are stored, for summaries: 'float16', 'int8', or the GGUF block layouts
    ('GGUF blocks Q4, Q8 (AMX tiles)', '(tiles layout, VNNI, ...)' on CPUs with AVX-512 VNNI and no AMX, '(tiles
    layout, AVX2, int8 activations)' on AVX2 alone)."""
    kinds = _weight_kinds(model)
    blocks = sorted(k for k in kinds if k.startswith("Q"))
    if not blocks:
        return "/".join(sorted(kinds))
    names = sorted({k.split()[0] for k in blocks})
    rest = sorted(kinds - set(blocks))
    kernel = _block_kernel(blocks)[0]
    return (f"GGUF blocks {', '.join(names)}" + (f" ({kernel})" if kernel else "")
            + (f" + {'/'.join(rest)}" if rest else ""))


def int8_activations(model: Transformer) -> bool:
    """Whether the model's block products take x as one int8 value per element (llama.cpp's 8-bit activations):
    the `int8` GGUF activations on the VNNI or AVX2 tiles kernels or the AVX2 rows kernel."""
    blocks = [k for k in _weight_kinds(model) if k.startswith("Q")]
    return bool(blocks) and _block_kernel(blocks)[1]


def _weight_kinds(model: Transformer) -> set[str]:
    """The storage of every layer matrix and of the head: a block layout ('Q4', 'Q8 tiles', ...) or a dtype."""
    from skiplayer.model.gguf_blocks import kernel_format
    return {kernel_format(m.weight, m.in_features) if m.weight.dtype == torch.uint8
            else str(m.weight.dtype).replace("torch.", "")
            for m in model.modules() if isinstance(m, Linear) and m is not model.output}


def _block_kernel(blocks: list[str]) -> tuple[str, bool]:
    """(the kernel that runs these block layouts, as summaries name it, or '' for the fp32 rows kernels; whether it
    takes 8-bit activations), from the process-wide kernel_isa and GGUF activations."""
    one, isa = torch.ops.skiplayer.activation_int8_parts(0) == 1, torch.ops.skiplayer.kernel_isa("")
    if any(k.endswith("tiles") for k in blocks):
        if isa == "amx" and not one:
            return "AMX tiles", False
        if isa == "avx2":  # Q4 tiles with int8 activations (gguf_blocks.tiles_available)
            return "tiles layout, AVX2, int8 activations", True
        return f"tiles layout, VNNI, {'int8' if one else 'int8x2'} activations", one
    if one and isa == "avx2":
        return "AVX2, int8 activations", True
    return "", False


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every layer matrix, the norms and the LM head (not the embedding
    table, of which one row is read)."""
    total = 0
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(("tok_embeddings", "rope_")) or (model.lm_head is not None and name.startswith("output.")):
            continue  # the embedding table (one row read), rope tables, a float head replaced by lm_head
        total += p.numel() * p.element_size()
    if model.lm_head is None:  # tied head: the embedding table is read as the head
        total += model.head_weight.numel() * model.head_weight.element_size()
    return total


def keep_weights_cached(weights: list[torch.Tensor]) -> bool:
    """Have the native products prefetch these GGUF block weights into the caches, where one-token steps and short
    passes stream the rest of the model past them: for weights read again every few milliseconds (a draft's layers
    and reduced head). Only when they fit in half the last-level cache, where the rest of the step's traffic leaves
    them; otherwise (or without the native kernels) nothing is kept. Replaces the earlier choice; returns whether
    these are kept."""
    blocks = [w for w in weights if w is not None and w.dtype == torch.uint8 and w.device.type == "cpu"]
    if not native_kernels_available(build=False):
        return False
    fits = bool(blocks) and 2 * sum(w.numel() for w in blocks) <= last_level_cache_bytes()
    torch.ops.skiplayer.keep_weights_cached(blocks if fits else [])
    return fits


@functools.lru_cache(maxsize=None)
def last_level_cache_bytes() -> int:
    """Size of the CPU's last-level data cache as Linux reports it for CPU 0 (0 where it does not)."""
    root, best = "/sys/devices/system/cpu/cpu0/cache", (0, 0)
    try:
        for index in (n for n in os.listdir(root) if n.startswith("index")):
            with open(os.path.join(root, index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(root, index, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(root, index, "size")) as f:
                size = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            if kind in ("Data", "Unified") and level > best[0]:
                best = (level, int(size.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        return 0
    return best[1]
