"""model/optimize.py: weight precisions, int8, native kernels (exactness and batch invariance), torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from skiplayer.model.llama import Transformer
from skiplayer.model.optimize import native_kernels_available, optimize_model, quantize_int8, weight_bytes_per_token
from skiplayer.model.packing import pack_pairs, packed_rows, unpack_pairs
from tests.conftest import tiny_hf_model

native = pytest.mark.skipif(not native_kernels_available(), reason="native CPU kernels cannot be built here")
TOKENS = torch.randint(0, 97, (14,), generator=torch.Generator().manual_seed(0))
# Max |logit error| against fp32 as a share of the fp32 logits' max |value| (tiny random models, logits ~ 5-10).
TOLERANCE = {(torch.float32, None): 1e-5, (torch.bfloat16, None): 0.05, (torch.float16, None): 0.01,
             (torch.float32, "int8"): 0.05, (torch.bfloat16, "int8"): 0.08}


def logits_steps(model, tokens, prefix):
    """Logits of a prefix block, then one token per step; and the cache."""
    cache = model.new_cache(32)
    with torch.inference_mode():
        out = [model(tokens[:prefix], 0, cache)]
        out += [model(tokens[p:p + 1], p, cache) for p in range(prefix, len(tokens))]
    return torch.cat(out), cache


def test_native_kernels_build_where_they_can():
    """The native tests skip when the kernels are unavailable, so a compile error in the kernel source must fail
    here instead of turning them all into skips on a machine that has AVX2, a C++ compiler and ninja."""
    import os
    import shutil
    from torch.utils.cpp_extension import is_ninja_available
    if os.environ.get("SKIPLAYER_NATIVE_KERNELS", "1") == "0":
        pytest.skip("native kernels turned off (SKIPLAYER_NATIVE_KERNELS=0)")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512") or not shutil.which("g++") \
            or not is_ninja_available():
        pytest.skip("this machine cannot build the native kernels")
    assert native_kernels_available(), "the native kernels failed to build (see the warning above)"


@pytest.mark.parametrize("dtype,quantize", list(TOLERANCE))
@pytest.mark.parametrize("kernels", ["torch", pytest.param("native", marks=native)])
def test_precisions_close_to_fp32(dtype, quantize, kernels):
    ref = Transformer.from_hf(tiny_hf_model("llama", seed=5))
    with torch.inference_mode():
        expected = ref(TOKENS, 0, ref.new_cache(32))
    model = optimize_model(Transformer.from_hf(tiny_hf_model("llama", seed=5), dtype=dtype), quantize, kernels=kernels)
    got, _ = logits_steps(model, TOKENS, 6)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    err = (got - expected).abs().max() / expected.abs().max()
    assert err <= TOLERANCE[dtype, quantize], f"{dtype} {quantize} {kernels}: relative error {err:.4f}"


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, "int8"])
def test_small_linear_matches_reference(dtype):
    op = torch.ops.skiplayer.small_linear
    g = torch.Generator().manual_seed(1)
    for M, K, N in [(1, 64, 96), (5, 72, 33), (9, 21, 7), (17, 40, 50)]:  # K and N tails, M chunking
        x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
        if dtype == "int8":
            q, s = quantize_int8(w)
            got, ref = op(x, q, s, b, False), F.linear(x, q.float() * s[:, None], b)
        else:
            wd = w.to(dtype)
            got, ref = op(x, wd, None, b, True), F.linear(x, wd.float(), b)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
        # batch invariance: every row equals the same row computed alone
        rows = torch.cat([op(x[i:i + 1], q if dtype == "int8" else wd, s if dtype == "int8" else None, b, True)
                          for i in range(M)])
        assert torch.equal(op(x, q if dtype == "int8" else wd, s if dtype == "int8" else None, b, True), rows)


@native
@pytest.mark.parametrize("M", [1, 5])
def test_small_linear_same_result_for_any_thread_count(M):
    """Threads share the weight rows dynamically (each starts on its own share, then takes blocks left in others):
    every row is computed exactly once, and which thread computes it does not change a bit."""
    op = torch.ops.skiplayer.small_linear
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(M, 64, generator=g), torch.randn(1001, 64, generator=g).half()  # 63 blocks, odd last row
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 7):
            torch.set_num_threads(threads)
            results.append(op(x, w, None, None, True))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(results[0], F.linear(x, w.float()), rtol=1e-5, atol=1e-4)
    assert all(torch.equal(r, results[0]) for r in results[1:])


@native
@pytest.mark.parametrize("dtype,quantize", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, "int8")])
@pytest.mark.parametrize("arch,tie", [("llama", False), ("qwen2", True)])
def test_native_block_equals_steps_bitwise(dtype, quantize, arch, tie):
    """A verification block gives bit-identical logits and KV entries to one-token steps (batch invariance)."""
    model = optimize_model(Transformer.from_hf(tiny_hf_model(arch, tie=tie, seed=2), dtype=dtype), quantize)
    steps, c1 = logits_steps(model, TOKENS, 4)
    c2 = model.new_cache(32)
    with torch.inference_mode():
        model(TOKENS[:4], 0, c2)
        blocks = torch.cat([model(TOKENS[p:p + 5], p, c2) for p in range(4, len(TOKENS), 5)])
    assert torch.equal(steps[4:], blocks)
    n = len(TOKENS)
    assert c1.lengths == c2.lengths == [n] * model.n_layers
    assert torch.equal(c1.k[:, :, :n], c2.k[:, :, :n]) and torch.equal(c1.v[:, :, :n], c2.v[:, :, :n])


@native
@pytest.mark.parametrize("dtype,quantize", [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None),
                                           (torch.float32, "int8")])
def test_prefill_uses_native_kernel_bitwise(dtype, quantize):
    """Long prompt blocks run through the native kernel too (packed weights have no F.linear path), so a 24-token
    prefill equals one-token steps bit for bit."""
    model = optimize_model(Transformer.from_hf(tiny_hf_model("llama", seed=3), dtype=dtype), quantize)
    tokens = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(3))
    steps, _ = logits_steps(model, tokens, 1)
    with torch.inference_mode():
        block = model(tokens, 0, model.new_cache(32))
    assert torch.equal(steps, block)


def attention_inputs(g: torch.Generator, T: int, H: int, G: int, D: int, dtype):
    """Random fused q/k/v rows (T, (H + 2G) * D) and RoPE tables (T, D) for rope_cache_attention."""
    qkv = torch.randn(T, (H + 2 * G) * D, generator=g).to(dtype)
    angles = torch.rand(T, D // 2, generator=g) * 6
    return qkv, torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)


def assert_other_path_close(out, rows, dtype) -> None:
    """out, from another attention path than `rows`: within the dtype's rounding of it, and in fp32 not bit for bit
    (it did take the other path)."""
    tol = 2e-6 if dtype == torch.float32 else 1e-2 if dtype == torch.float16 else 4e-2
    assert (out.float() - rows.float()).abs().max() <= tol * rows.float().abs().max()
    assert not torch.equal(out, rows) or dtype != torch.float32


def check_against_row_loops(run, dtype) -> None:
    """run() -> (attention output, K cache) on this CPU's AVX-512 attention: the AVX2 paths (kernel_isa avx2: the
    one-row loops, or the AVX2 prompt attention for a prompt without a window shorter than it) write the same cache
    and give the output within the dtype's rounding (in fp32 not bit for bit: the other path ran), and the same bits
    come back at 1 and 2 threads."""
    wide, kc = run()
    before = torch.ops.skiplayer.kernel_isa("")
    try:
        torch.ops.skiplayer.kernel_isa("avx2")  # the one-row loops
        rows, kc_rows = run()
    finally:
        torch.ops.skiplayer.kernel_isa(before)
    assert torch.equal(kc, kc_rows)  # the cache writes are the same
    assert_other_path_close(wide, rows, dtype)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.equal(run()[0], wide)
    finally:
        torch.set_num_threads(threads)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [16, 24, 64, 128])
@pytest.mark.parametrize("H,G", [(6, 2), (9, 3)])
@pytest.mark.parametrize("start", [75, 800])
def test_native_attention_block_equals_rows_and_reference(dtype, D, H, G, start):
    """rope_cache_attention over blocks longer than its row chunks (16, taken 5 rows at a time), with 3 query heads
    per KV head and head sizes with and without a last 8 columns (D % 64 == 0: the AVX-512 decoding attention where
    the CPU has it): a T-row block equals T one-row calls bit for bit (outputs and cache), and fp32 math on the same
    inputs. On 2 threads, 2 KV heads go one a thread; 3 KV heads (SmolLM2's) in parts of the block's positions, and
    their one-token steps head by head, or by whole KV heads from 768 keys on (start 800; from 512 on AVX2)."""
    from skiplayer.model.llama import apply_rope
    T = 21
    L = start + T + 64
    g = torch.Generator().manual_seed(11)
    qkv, cos, sin = attention_inputs(g, T, H, G, D, dtype)
    kc0, vc0 = torch.randn(G, L, D, generator=g).to(dtype), torch.randn(G, L, D, generator=g).to(dtype)
    op = torch.ops.skiplayer.rope_cache_attention
    kb, vb = kc0.clone(), vc0.clone()
    block = op(qkv, cos, sin, kb, vb, start, H, G, True)
    kr, vr = kc0.clone(), vc0.clone()
    rows = torch.cat([op(qkv[t:t + 1], cos[t:t + 1], sin[t:t + 1], kr, vr, start + t, H, G, True) for t in range(T)])
    assert torch.equal(block, rows) and torch.equal(kb, kr) and torch.equal(vb, vr)

    f = lambda x: x.float()  # noqa: E731
    q, k, v = f(qkv).split([H * D, G * D, G * D], dim=1)
    q = apply_rope(q.view(T, H, D).transpose(0, 1), f(cos), f(sin))
    k = apply_rope(k.view(T, G, D).transpose(0, 1), f(cos), f(sin))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(f(kb[:, start:start + T]), k, rtol=tol, atol=tol)
    keys, values = f(kb[:, :start + T]).repeat_interleave(H // G, 0), f(vb[:, :start + T]).repeat_interleave(H // G, 0)
    mask = torch.arange(start + T)[None, :] <= start + torch.arange(T)[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    torch.testing.assert_close(f(block), ref.transpose(0, 1).reshape(T, H * D), rtol=tol, atol=tol)


@native
@pytest.mark.skipif(native_kernels_available() and torch.ops.skiplayer.kernel_isa("") == "avx2",
                    reason="this CPU has no AVX-512: prompts keep the one-row attention loops")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,D,window", [(64, 64, 0), (150, 64, 0), (83, 128, 0), (150, 64, 40), (83, 128, 70),
                                         (100, 64, 5)])
def test_prompt_attention_on_avx512_close_to_the_row_loops_and_deterministic(dtype, T, D, window):
    """A prompt (a block at position 0, at least 64 rows) takes the AVX-512 attention with the keys in the lanes: the
    one-row loops' result within the dtype's rounding, the same bits on every call and thread count; with a sliding
    window shorter than the prompt too (Gemma's local layers: each row over its own last `window` keys)."""
    H, G = 6, 2
    g = torch.Generator().manual_seed(12)
    qkv, cos, sin = attention_inputs(g, T, H, G, D, dtype)
    op = torch.ops.skiplayer.rope_cache_attention

    def run():
        kc, vc = torch.zeros(G, T + 4, D, dtype=dtype), torch.zeros(G, T + 4, D, dtype=dtype)
        return op(qkv, cos, sin, kc, vc, 0, H, G, True, None, window), kc
    check_against_row_loops(run, dtype)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,D", [(64, 64), (150, 64), (83, 128), (70, 16)])
def test_prompt_attention_on_avx2_close_to_the_row_loops_and_deterministic(dtype, T, D):
    """Without AVX-512 (kernel_isa "avx2" forces it anywhere) a prompt (a block at position 0 of at least 64 rows)
    takes the AVX2 attention with the keys in the lanes: the same cache writes as the rows one at a time, their
    outputs within the dtype's rounding (in fp32 not bit for bit: the other path ran), the same bits at 1, 2 and 4
    threads (each head's rows split in 2 and 4 parts: 9 heads over 2 and 4 threads)."""
    H, G = 9, 3
    qkv, cos, sin = attention_inputs(torch.Generator().manual_seed(14), T, H, G, D, dtype)
    op = torch.ops.skiplayer.rope_cache_attention

    def block(threads):
        kc, vc = torch.zeros(G, T + 4, D, dtype=dtype), torch.zeros(G, T + 4, D, dtype=dtype)
        torch.set_num_threads(threads)
        return op(qkv, cos, sin, kc, vc, 0, H, G, True), kc, vc

    before, threads = torch.ops.skiplayer.kernel_isa(""), torch.get_num_threads()
    try:
        torch.ops.skiplayer.kernel_isa("avx2")
        out, kc, vc = block(1)
        assert torch.equal(block(2)[0], out) and torch.equal(block(4)[0], out)
        kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
        rows = torch.cat([op(qkv[t:t + 1], cos[t:t + 1], sin[t:t + 1], kr, vr, t, H, G, True) for t in range(T)])
    finally:
        torch.ops.skiplayer.kernel_isa(before)
        torch.set_num_threads(threads)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    assert_other_path_close(out, rows, dtype)


@native
@pytest.mark.skipif(native_kernels_available() and torch.ops.skiplayer.kernel_isa("") == "avx2",
                    reason="this CPU has no AVX-512: decoding keeps the one-row attention loops")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("start,T,D", [(75, 1, 64), (300, 5, 64), (40, 21, 128), (16, 3, 64), (900, 1, 64),
                                       (900, 3, 128)])
def test_decode_attention_on_avx512_close_to_the_row_loops_and_thread_invariant(dtype, start, T, D):
    """Blocks after a prompt (one-token steps and verification passes) take the AVX-512 decoding attention where the
    CPU has it and D % 64 == 0: the one-row loops' result within the dtype's rounding, and the same bits at 1 and 2
    threads (3 KV heads: on one thread each goes through with its 3 query heads; on two, one-token steps head by head
    below 768 keys and by whole KV heads from there, blocks in parts of their positions)."""
    H, G, L = 9, 3, start + T + 3
    g = torch.Generator().manual_seed(13)
    qkv, cos, sin = attention_inputs(g, T, H, G, D, dtype)
    kc0, vc0 = torch.randn(G, L, D, generator=g).to(dtype), torch.randn(G, L, D, generator=g).to(dtype)
    op = torch.ops.skiplayer.rope_cache_attention

    def run():
        kc, vc = kc0.clone(), vc0.clone()
        return op(qkv, cos, sin, kc, vc, start, H, G, True), kc
    check_against_row_loops(run, dtype)


@native
def test_native_matches_torch_path_and_fill_kv():
    eager = Transformer.from_hf(tiny_hf_model("llama", seed=4))
    fast = optimize_model(Transformer.from_hf(tiny_hf_model("llama", seed=4)))
    a, ca = logits_steps(eager, TOKENS, 5)
    b, cb = logits_steps(fast, TOKENS, 5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ca.k, cb.k, rtol=1e-5, atol=1e-5)
    # fill_kv (K/V only, no attention) and layer ranges run on the native path too
    with torch.inference_mode():
        for m, c in ((eager, ca), (fast, cb)):
            c.rollback(len(TOKENS) - 3)
            h = m.forward_layers(m.embed(TOKENS[-3:]), len(TOKENS) - 3, c, 0, 2)
            m.fill_kv(3, h, len(TOKENS) - 3, c)
    assert ca.lengths == cb.lengths
    torch.testing.assert_close(ca.k[3], cb.k[3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ca.v[3], cb.v[3], rtol=1e-5, atol=1e-5)


def test_int8_keeps_float_head_weight_and_subsets():
    model = optimize_model(Transformer.from_hf(tiny_hf_model("llama", tie=True, seed=1)), quantize="int8")
    assert model.head_weight.dtype == torch.float32  # row subsets stay plain float tensors (draft vocabularies)
    assert model.lm_head.weight.dtype == torch.int8 and model.layers[0].feed_forward.w13.weight.dtype == torch.int8
    ids = torch.tensor([3, 7, 11, 50])
    with torch.inference_mode():
        h = model.forward_layers(model.embed(TOKENS[:3]), 0, model.new_cache(8), 0, model.n_layers)
        full, sub = model.logits(h), model.logits(h, model.head_rows(ids))
    assert sub.shape == (3, 4)
    torch.testing.assert_close(sub, full[:, ids], rtol=0.05, atol=0.1)  # float subset vs int8 head
    fp32 = Transformer.from_hf(tiny_hf_model("llama", tie=True, seed=1))
    assert weight_bytes_per_token(model) < 0.4 * weight_bytes_per_token(fp32)


def test_int8_untied_head_keeps_float_output():
    model = optimize_model(Transformer.from_hf(tiny_hf_model("llama", tie=False, seed=1)), quantize="int8")
    assert model.output.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.int8
    assert model.head_weight is model.output.weight


def test_bad_options():
    model = Transformer.from_hf(tiny_hf_model("llama"))
    with pytest.raises(ValueError):
        optimize_model(model, quantize="int4")
    with pytest.raises(ValueError):
        optimize_model(model, kernels="cuda")


def test_compile_keeps_greedy_outputs():
    """fp32: torch.compile (one dynamic graph for every layer) gives the same greedy tokens as eager."""
    hf = tiny_hf_model("llama", n_layers=2, seed=6)
    eager = optimize_model(Transformer.from_hf(hf))
    compiled = optimize_model(Transformer.from_hf(hf), compile=True)

    def greedy(m):
        cache, out = m.new_cache(32), []
        with torch.inference_mode():
            tok = m(TOKENS[:5], 0, cache)[-1].argmax()
            for p in range(5, 17):
                out.append(int(tok))
                tok = m(tok.view(1), p, cache)[-1].argmax()
            block = m(torch.tensor(out[:4]), 17, cache)  # a verification-size block through the compiled graph
        return out, block

    (a, ba), (b, bb) = greedy(eager), greedy(compiled)
    assert a == b
    assert torch.equal(ba.argmax(-1), bb.argmax(-1))
    optimize_model(compiled)  # compile=False restores the eager path
    assert "mlp" not in compiled.layers[0].__dict__


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, "int8"])
def test_packed_weights_give_bitwise_equal_products(dtype):
    """The pair-packed layout changes only where the kernel reads a weight, not the order it sums in."""
    op = torch.ops.skiplayer.small_linear
    g = torch.Generator().manual_seed(7)
    for N, K in [(7, 16), (64, 24), (33, 40)]:  # odd N: the last row stays unpacked
        w = torch.randn(N, K, generator=g)
        w, s = quantize_int8(w) if dtype == "int8" else (w.to(dtype), None)
        packed = pack_pairs(w)
        assert torch.equal(unpack_pairs(packed), w)
        ids = torch.tensor([N - 1, 0, 1, N // 2, N - 1])
        assert torch.equal(packed_rows(packed, ids), w[ids])
        for M in range(1, 14):  # 1..6 rows in one pass, more in chunks
            x = torch.randn(M, K, generator=g)
            assert torch.equal(op(x, packed, s, None, True, True), op(x, w, s, None, True, False))


@native
@pytest.mark.parametrize("tie", [True, False])
def test_packed_model_matches_row_major_model_bitwise(tie):
    """optimize_model packs every matrix and the head (embedding lookups and head_rows read through the layout),
    and runs the layers as one native call; logits equal the row-major per-op path bit for bit, and re-optimising
    with a row limit restores the original row-major weights."""
    hf = tiny_hf_model("llama", tie=tie, seed=6)
    plain = optimize_model(Transformer.from_hf(hf), native_rows=16)  # row-major; T <= 16 native, op by op
    for block in plain.layers:
        block.native_args = None
    plain.native_stack = None
    packed = optimize_model(Transformer.from_hf(hf))
    assert packed.head_packed and packed.layers[0].feed_forward.w13.packed
    assert packed.layers[0].native_args is not None
    ids = torch.tensor([3, 0, 96, 5])
    assert torch.equal(packed.embed(ids), plain.embed(ids))
    assert torch.equal(packed.head_rows(ids), plain.head_weight[ids])
    assert torch.equal(packed.head_rows(), plain.head_weight)
    assert torch.equal(plain.logits(plain.embed(ids), plain.head_rows(ids)), packed.logits(packed.embed(ids),
                                                                                            packed.head_rows(ids)))
    a, _ = logits_steps(plain, TOKENS, 6)
    b, _ = logits_steps(packed, TOKENS, 6)
    assert torch.equal(a, b)
    optimize_model(packed, native_rows=16)
    assert not packed.head_packed and torch.equal(packed.head_weight, plain.head_weight)
    assert torch.equal(packed.layers[1].attention.wqkv.weight, plain.layers[1].attention.wqkv.weight)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_rms_norm_matches_python_norm(dtype):
    """The vectorised norm rounds like HF Llama (normalise in fp32, round, scale, round); only the order of the
    sum of squares differs, so results agree to within one rounding step of the dtype."""
    from skiplayer.model.llama import RMSNorm
    g = torch.Generator().manual_seed(3)
    norm = RMSNorm(60, 1e-5)  # 60: seven vectors of 8 and a scalar tail
    norm.weight.data = torch.randn(60, generator=g)
    norm = norm.to(dtype)
    x = (torch.randn(5, 60, generator=g) * 3).to(dtype)
    with torch.inference_mode():
        expected = norm(x)
        got = torch.ops.skiplayer.rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_silu_mul_matches_torch_and_is_row_invariant(dtype):
    """silu(gate) * up in one op: within one rounding step of F.silu(gate) * up (its exp is not torch's), the same
    signs (x / inf = -0 for very negative gates), and a row's result does not depend on the rows beside it."""
    g = torch.Generator().manual_seed(4)
    gate_up = torch.randn(5, 2 * 37, generator=g) * 4  # 37: four vectors of 8 and a scalar tail
    gate_up[0, [0, 1, 2, 3, 33, 34]] = torch.tensor([-100.0, 100.0, -88.8, 0.0, -100.0, 100.0])  # vector and tail
    gate_up = gate_up.to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    got = torch.ops.skiplayer.silu_mul(gate_up)
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-30)
    assert torch.equal(torch.signbit(got), torch.signbit(expected))
    assert got[0, 0] == 0 and got[0, 33] == 0 and got[0, 1] == expected[0, 1]
    rows = torch.cat([torch.ops.skiplayer.silu_mul(gate_up[i:i + 1]) for i in range(5)])
    assert torch.equal(got, rows)
    long_block = (torch.randn(40, 2 * 1536, generator=g) * 4).to(dtype)  # long enough to be split over threads
    rows = torch.cat([torch.ops.skiplayer.silu_mul(long_block[i:i + 1]) for i in range(40)])
    assert torch.equal(torch.ops.skiplayer.silu_mul(long_block), rows)


@native
def test_feed_forward_uses_native_silu_mul_after_optimize():
    model = optimize_model(Transformer.from_hf(tiny_hf_model("llama", seed=2), dtype=torch.float16))
    ff = model.layers[0].feed_forward
    assert ff.native
    x = torch.randn(3, model.args.dim).half()
    with torch.inference_mode():
        gate_up = ff.w13(x)
        assert torch.equal(ff(x), ff.w2(torch.ops.skiplayer.silu_mul(gate_up)))
        ff.native = False
        gate, up = gate_up.chunk(2, dim=-1)
        assert torch.equal(ff(x), ff.w2(F.silu(gate) * up))


@native
def test_taps_read_states_from_the_one_call_layer_range():
    """forward_layers runs a layer range as one native call that also returns the states entering tapped layers:
    same result and cache as without taps, taps see what the prefix of layers computes, and only first < n < last."""
    model = optimize_model(Transformer.from_hf(tiny_hf_model("llama", n_layers=4, seed=8)))
    assert model.native_stack is not None
    h0, seen = model.embed(TOKENS[:5]), {}
    taps = {n: (lambda h, n=n: seen.setdefault(n, h)) for n in (0, 1, 3, 4)}
    c1, c2, c3 = model.new_cache(16), model.new_cache(16), model.new_cache(16)
    with torch.inference_mode():
        plain = model.forward_layers(h0, 0, c1, 0, 4)
        tapped = model.forward_layers(h0, 0, c2, 0, 4, taps)
        prefix = model.forward_layers(h0, 0, c3, 0, 3)
    assert torch.equal(plain, tapped) and torch.equal(c1.k, c2.k) and c1.lengths == c2.lengths == [5] * 4
    assert sorted(seen) == [1, 3] and torch.equal(seen[3], prefix)
    one_call, seen = seen, {}  # one call per layer (no stack): the same taps, bit for bit
    model.native_stack = None
    with torch.inference_mode():
        assert torch.equal(model.forward_layers(h0, 0, model.new_cache(16), 0, 4, taps), plain)
    assert sorted(seen) == [1, 3] and all(torch.equal(seen[n], one_call[n]) for n in seen)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_draft_head_reduced_vocabulary_is_packed_and_exact(dtype):
    """A draft's reduced-vocabulary head is stored pair-packed like the model's head, and its logits are the full
    head's logits at those ids, bit for bit (the kernel computes each row the same way in either layout)."""
    from skiplayer.decoding.draft import DraftHead
    model = optimize_model(Transformer.from_hf(tiny_hf_model("llama", seed=9), dtype=dtype))
    ids = torch.tensor([96, 0, 5, 17, 42])  # odd count: the last row stays unpaired
    head = DraftHead(model, ids)
    assert head.packed and model.head_packed
    h = model.embed(TOKENS[:3])
    with torch.inference_mode():
        assert torch.equal(head(h, 1), model.logits(h)[-1, ids])


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_norm_and_silu_of_long_blocks_equal_their_rows_at_any_thread_count(dtype):
    """rms_norm and silu_mul split a prompt's rows over the threads: each row's bits as computed alone."""
    g = torch.Generator().manual_seed(14)
    x, w, gu = torch.randn(300, 576, generator=g).to(dtype), torch.randn(576, generator=g).to(dtype), \
        torch.randn(300, 2 * 1536, generator=g).to(dtype)
    ops = torch.ops.skiplayer
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(ops.rms_norm(x, w, 1e-5), torch.cat([ops.rms_norm(r[None], w, 1e-5) for r in x]))
            assert torch.equal(ops.silu_mul(gu), torch.cat([ops.silu_mul(r[None]) for r in gu]))
    finally:
        torch.set_num_threads(before)


@native
@pytest.mark.parametrize("isa", ["avx2", pytest.param("best", marks=pytest.mark.skipif(
    native_kernels_available() and torch.ops.skiplayer.kernel_isa("") == "avx2",
    reason="this CPU has no AVX-512: its decoding attention is not there to split"))])
@pytest.mark.parametrize("dtype,quantize,arch", [(torch.float32, None, "llama"), (torch.float16, None, "qwen2"),
                                                 (torch.bfloat16, "int8", "llama"), (torch.float32, None, "gemma3"),
                                                 (torch.bfloat16, "int8", "gemma3")])
def test_decoding_team_gives_the_bits_of_one_operation_at_a_time(dtype, quantize, arch, isa):
    """Blocks of up to 16 positions run all their layers in one parallel region on two threads (avx2.cpp's
    TeamLayers): logits, tapped states and cache are the bits of one thread running one operation at a time, for
    one-token steps (also past 512 keys: by whole KV heads on AVX2), chains and a token tree, with the whole layer
    range in one call or a call per layer; with the AVX-512 decoding attention where the CPU has it, and with the
    one-row loops (kernel_isa avx2) everywhere. Gemma 3's
    layers too (q/k and sandwich norms, GeGLU, sliding windows of 5 that the blocks run past, local RoPE tables); and
    per operation, decoder_layers gives what the Python blocks give, op by op."""
    from skiplayer.model.llama import TreeMask
    best = torch.ops.skiplayer.kernel_isa("")
    hf = tiny_hf_model(arch, seed=3, hidden_size=256, n_heads=4, n_kv_heads=2, tie=arch == "qwen2",
                       max_positions=1024)  # head_dim 64
    model = optimize_model(Transformer.from_hf(hf, dtype=dtype), quantize)
    assert model.native_stack is not None
    tree = TreeMask(torch.tensor([[9, -1], [9, 10], [9, 11]]), torch.tensor([9, 10, 10]))  # a root, two children

    def run(threads, stack, python=False):
        torch.set_num_threads(threads)
        saved, model.native_stack = model.native_stack, (model.native_stack if stack else None)
        args = [block.native_args for block in model.layers]
        if python:  # Block.forward's own ops (native ones, one at a time) instead of decoder_layers
            for block in model.layers:
                block.native_args = None
        cache, seen, out = model.new_cache(600), [], []
        taps = {n: seen.append for n in (1, 3)}
        try:
            with torch.inference_mode():
                out.append(model(TOKENS[:9], 0, cache))
                out.append(model.logits(model.forward_layers(model.embed(TOKENS[9:12]), 9, cache, 0, 4, tree=tree)))
                cache.rollback(9)
                start = 9
                for T in (1, 3, 16, 500, 1, 3):  # the last two past 512 keys: a step by whole KV heads on AVX2
                    tokens = torch.arange(start, start + T) % 97
                    out.append(model.logits(model.forward_layers(model.embed(tokens), start, cache, 0, 4, taps)))
                    start += T
        finally:
            model.native_stack = saved
            for block, a in zip(model.layers, args):
                block.native_args = a
        return out + seen + [cache.k[:, :, :start], cache.v[:, :, :start]]

    before = torch.get_num_threads()
    try:
        if isa == "avx2":
            torch.ops.skiplayer.kernel_isa("avx2")
        one = run(1, True)
        for stack in (True, False):
            two = run(2, stack)
            assert len(two) == len(one) and all(torch.equal(a, b) for a, b in zip(one, two)), stack
        ops = run(1, False, python=True)
        assert all(torch.equal(a, b) for a, b in zip(one, ops))
    finally:
        torch.set_num_threads(before)
        torch.ops.skiplayer.kernel_isa(best)
