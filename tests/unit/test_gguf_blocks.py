"""GGUF block weights (model/gguf_blocks.py, kernels/qblocks.h): the file's Q4_0 / Q4_1 / Q5_0 / Q8_0 blocks multiplied
without expanding them, on every instruction-set path this CPU has; exact dequantization, batch invariance, the
q/k row order of llama.cpp files, and lossless self-speculation on top."""
import numpy as np
import pytest
import torch

from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.model.gguf_blocks import (FILE_BLOCK_BYTES, KERNEL_FAMILY, _tiles_parts, block_rows, dequantize_blocks,
                                         kernel_format, pack_blocks, set_gguf_activations, use_gguf_blocks)
from skiplayer.model.llama import Transformer
from skiplayer.model.optimize import native_kernels_available, optimize_model
from skiplayer.policies import PolicyConfig
from tests.helpers import FakeTokenizer

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

native = pytest.mark.skipif(not native_kernels_available(), reason="native CPU kernels cannot be built here")
FORMATS = list(FILE_BLOCK_BYTES)
DEFAULT_ISA = torch.ops.skiplayer.kernel_isa("") if native_kernels_available() else None  # the best this CPU has
has_tiles = pytest.mark.skipif(DEFAULT_ISA not in ("amx", "vnni"),
                               reason="this CPU has neither AMX tiles nor AVX-512 VNNI: the tiles layout is not used here")
has_amx = pytest.mark.skipif(DEFAULT_ISA != "amx", reason="this CPU (or OS) gives no AMX tiles")


def isas():
    """The instruction-set paths of the rows kernels, each skipped (with the reason) where this CPU lacks it."""
    has512 = DEFAULT_ISA in ("avx512", "vnni", "amx")
    return ["avx2", pytest.param("avx512", marks=pytest.mark.skipif(not has512, reason="this CPU has no AVX-512"))]


def tiles_isas():
    """The kernels of the tiles layout: AVX-512 VNNI, and AMX tiles where the CPU has them."""
    return [pytest.param("vnni", marks=has_tiles), pytest.param("amx", marks=has_amx)]


@pytest.fixture
def activations(request):
    """The GGUF activations of the tiles kernels for one test (process-wide like kernel_isa; conftest resets it)."""
    return set_gguf_activations(request.param)


@pytest.fixture
def isa(request):
    before = torch.ops.skiplayer.kernel_isa("")
    torch.ops.skiplayer.kernel_isa(request.param)
    yield request.param
    torch.ops.skiplayer.kernel_isa(before)


def file_blocks(w: torch.Tensor, fmt: str) -> np.ndarray:
    return quants.quantize(w.numpy(), GGMLQuantizationType[fmt])


def blocks(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w quantized to `fmt` as a GGUF file holds it, in the kernels' layout."""
    return pack_blocks(fmt, file_blocks(w, fmt))


def assert_batch_and_thread_invariant(b: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, y: torch.Tensor) -> None:
    """Every block size of x's first rows, and a two-thread split, give y's bits (what keeps self-speculation
    token-identical)."""
    op = torch.ops.skiplayer.small_linear
    for m in range(1, len(x) + 1):
        assert torch.equal(op(x[:m], b, None, bias, True, False), y[:m]), (len(x), m)
    torch.set_num_threads(2)
    try:
        assert torch.equal(op(x, b, None, bias, True, False), y)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_blocks_is_ggml_dequantization(fmt):
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(0))
    b = blocks(w, fmt)
    assert kernel_format(b, 96) == KERNEL_FAMILY[fmt] and b.dtype == torch.uint8
    expected = torch.from_numpy(quants.dequantize(file_blocks(w, fmt), GGMLQuantizationType[fmt]))
    assert torch.equal(dequantize_blocks(b, 96), expected)  # the file's values, bit for bit
    with pytest.raises(ValueError, match="no packed GGUF blocks"):
        kernel_format(b, 64)


@native
@pytest.mark.parametrize("activations", ["int8x2"], indirect=True)  # the rows kernels then take x in fp32
@pytest.mark.parametrize("isa", isas(), indirect=True)
@pytest.mark.parametrize("fmt", FORMATS)
def test_block_products_exact_and_batch_invariant(fmt, isa, activations):
    g = torch.Generator().manual_seed(1)
    op = torch.ops.skiplayer.small_linear
    for M, K, N in [(1, 32, 5), (7, 96, 33), (19, 576, 70)]:  # odd N (tile tails), M over several chunks
        w, x, bias = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g), torch.randn(N, generator=g)
        b = blocks(w, fmt)
        ref = (x.double() @ dequantize_blocks(b, K).double().T + bias.double()).float()
        y = op(x, b, None, bias, True, False)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
        assert_batch_and_thread_invariant(b, x, bias, y)
        half = op(x.half(), b, None, None, False, False)  # activations in the model dtype, fp32 sums
        assert half.dtype == torch.float16
        torch.testing.assert_close(half.float(), (x.half().float() @ dequantize_blocks(b, K).T), rtol=2e-3, atol=2e-2)


@native
def test_block_weight_errors_name_the_problem():
    op = torch.ops.skiplayer.small_linear
    b = blocks(torch.randn(4, 64), "Q4_1")
    with pytest.raises(RuntimeError, match="kernels' layout"):
        op(torch.randn(1, 96), b, None, None, True, False)
    with pytest.raises(RuntimeError, match="never packed"):
        op(torch.randn(1, 64), b, torch.ones(4), None, True, False)
    with pytest.raises(RuntimeError, match="'avx512', 'avx2'"):
        torch.ops.skiplayer.kernel_isa("sse")


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (so a file's rows must be put back)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf, path, fmt="Q4_1", arch="llama"):
    """A GGUF file of the tiny HF model's matrices in `fmt` (embedding in Q8_0; with Q5_0, attn_v in Q8_0 as in
    Gemma 3's Q4_K_M file), q/k rows permuted as llama.cpp permutes them for Llama files; returns the model with its
    weights set to the file's dequantized values."""
    c = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    state = {}
    for i in range(c.num_hidden_layers):
        for hf_name, g_name in names.items():
            key = f"model.layers.{i}.{hf_name}.weight"
            w = sd[key]
            heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}.get(g_name)
            stored = llama_permute(w, heads) if heads and arch == "llama" else w
            qtype = GGMLQuantizationType["Q8_0" if fmt == "Q5_0" and g_name == "attn_v" else fmt]
            q = quants.quantize(stored, qtype)
            writer.add_tensor(f"blk.{i}.{g_name}.weight", q, raw_dtype=qtype)
            state[key] = torch.from_numpy(quants.dequantize(quants.quantize(w, qtype), qtype))
    emb = quants.quantize(sd["model.embed_tokens.weight"], GGMLQuantizationType.Q8_0)
    writer.add_tensor("token_embd.weight", emb, raw_dtype=GGMLQuantizationType.Q8_0)
    state["model.embed_tokens.weight"] = torch.from_numpy(quants.dequantize(emb, GGMLQuantizationType.Q8_0))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    hf.load_state_dict(state, strict=False)
    return hf


def tiny_gguf_pair(tmp_path, fmt="Q4_1", arch="llama", tiles=False):
    import transformers
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch](
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    hf = write_gguf(hf, tmp_path / "tiny.gguf", fmt, arch)
    float_model = optimize_model(Transformer.from_hf(hf))
    block_model = Transformer.from_hf(hf)
    import os
    os.environ["SKIPLAYER_GGUF_TILES"] = "1" if tiles else "0"
    try:
        counts = use_gguf_blocks(block_model, tmp_path / "tiny.gguf")
    finally:
        del os.environ["SKIPLAYER_GGUF_TILES"]
    return float_model, optimize_model(block_model), counts


def layouts():
    return ["rows", pytest.param("tiles", marks=has_tiles)]


@native
@pytest.mark.parametrize("layout", layouts())
@pytest.mark.parametrize("fmt,arch", [("Q4_1", "llama"), ("Q4_0", "llama"), ("Q8_0", "qwen2"), ("Q5_0", "llama")])
def test_file_blocks_compute_the_converted_model(tmp_path, fmt, arch, layout):
    set_gguf_activations("int8x2")  # whatever an earlier test's model chose (conftest restores it)
    float_model, block_model, counts = tiny_gguf_pair(tmp_path, fmt, arch, tiles=layout == "tiles")
    expected = {"Q8_0": {"Q8_0": 17}, "Q5_0": {"Q5_0+Q8_0": 4, "Q5_0": 12, "Q8_0": 1}}.get(fmt, {fmt: 16, "Q8_0": 1})
    assert counts == expected  # 4 layers x 4 matrices + the head (Q5_0: q/k in Q5_0 and v in Q8_0, fused)
    wqkv = block_model.layers[0].attention.wqkv
    assert wqkv.weight.dtype == torch.uint8
    family = KERNEL_FAMILY[fmt]
    assert kernel_format(wqkv.weight, wqkv.in_features) == family + (" tiles" if layout == "tiles" else "")
    from skiplayer.model.optimize import describe_weights
    assert describe_weights(float_model) == "float32"
    tiles = " (AMX tiles)" if DEFAULT_ISA == "amx" else " (tiles layout, VNNI, int8x2 activations)"
    assert describe_weights(block_model) == ("GGUF blocks Q8" if family == "Q8" else "GGUF blocks Q4, Q8") + (
        tiles if layout == "tiles" else "")
    tokens = torch.randint(4, 97, (12,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = float_model(tokens, 0, float_model.new_cache(32))
        got = block_model(tokens, 0, block_model.new_cache(32))
    # same weights; rows: only the sum order differs; tiles: x also enters as two int8 parts (~2^-16 relative)
    err = (got - expected).abs().max() / expected.abs().max()
    assert err < (1e-5 if layout == "rows" else 1e-3), err


@native
@pytest.mark.parametrize("layout", layouts() + ["tiles-int8", "rows-avx2-int8"])  # tiles-int8: AVX2 runs it too
def test_self_speculation_on_file_blocks_is_lossless(tmp_path, layout):
    set_gguf_activations("int8" if layout.endswith("int8") else "int8x2")  # conftest restores the earlier choice
    before = torch.ops.skiplayer.kernel_isa("")
    if layout == "rows-avx2-int8":  # the AVX2 kernel with 8-bit x, on any CPU (every x86-64 one here has AVX2)
        torch.ops.skiplayer.kernel_isa("avx2")
    try:
        _, model, _ = tiny_gguf_pair(tmp_path, tiles=layout.startswith("tiles"))
        check_self_speculation_is_lossless(model)
    finally:
        torch.ops.skiplayer.kernel_isa(before)


# Two short prompts, and one past the decoding team's 16 rows (on AVX2 with 8-bit x: the prompt kernel).
LOSSLESS_PROMPTS = ([1, 5, 7, 9], [11, 12, 13, 14, 15, 16], [4 + (7 * i) % 90 for i in range(40)])


def check_self_speculation_is_lossless(model):
    for prompt in LOSSLESS_PROMPTS:
        def run(strategy, **policy):
            config = GenerationConfig(max_steps=24, generation_strategy=strategy, policy=PolicyConfig(**policy))
            return generate_ids(model, prompt, config, tokenizer=FakeTokenizer())[0]
        ar = run("autoregressive")
        for E, k in ((1, 1), (2, 3), (3, 2)):
            assert run("self_speculative", exit_layer=E, num_speculations=k) == ar, (prompt, E, k)
        assert run("self_speculative", exit_layer=2, num_speculations=2, draft_source="both") == ar


@pytest.mark.parametrize("fmt", FORMATS)
def test_tiles_layout_holds_the_same_weights(fmt):
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(5))
    raw = file_blocks(w, fmt)
    tiles = pack_blocks(fmt, raw, tiles=True)
    family = KERNEL_FAMILY[fmt]
    assert kernel_format(tiles, 96) == family + " tiles" and tiles.shape == (48, 96 // 32 * (20 if family == "Q4" else 34))
    assert torch.equal(dequantize_blocks(tiles, 96), dequantize_blocks(pack_blocks(fmt, raw), 96))
    with pytest.raises(ValueError, match="multiple of 16 rows"):
        pack_blocks(fmt, raw[:40], tiles=True)


@native
@pytest.mark.parametrize("activations", ["int8x2"], indirect=True)
@pytest.mark.parametrize("isa", tiles_isas(), indirect=True)
@pytest.mark.parametrize("fmt", FORMATS)
def test_tiles_products_close_and_batch_invariant(fmt, isa, activations):
    g = torch.Generator().manual_seed(6)
    op = torch.ops.skiplayer.small_linear
    for M, K, N in [(1, 32, 16), (5, 96, 48), (19, 576, 64)]:  # M over several chunks of 8
        w, x, bias = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g), torch.randn(N, generator=g)
        b = pack_blocks(fmt, file_blocks(w, fmt), tiles=True)
        ref = (x.double() @ dequantize_blocks(b, K).double().T + bias.double()).float()
        y = op(x, b, None, bias, True, False)
        # x enters as two int8 parts per block of 32 (amx.cpp): ~2^-16 of the block's largest |x|; same on both kernels
        assert (y - ref).abs().max() <= 2e-4 * ref.abs().max(), fmt
        assert_batch_and_thread_invariant(b, x, bias, y)


def int8_activations_reference(x: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, parts=None) -> torch.Tensor:
    """The one-part arithmetic of the VNNI and AVX2 kernels in float64: per row and block of 32, dx = max|x| / 127
    and a = round(x / dx) (float32, ties to even, as the kernels), then d dx sum(q a) + m dx sum(a) per block: the
    file's weights times the 8-bit x, as llama.cpp computes Q4_1 x Q8_1. `parts`: (d, m, q) of the blocks (default:
    those of the tiles weight b)."""
    M, K = x.shape
    d, m, q = (None if t is None else torch.from_numpy(np.asarray(t, dtype=np.float64))
               for t in (parts or _tiles_parts(b, K)))
    xb = x.reshape(M, K // 32, 32)
    dx = xb.abs().amax(-1) / 127
    dx = torch.where(dx > 0, dx, torch.ones_like(dx))
    a = (xb / dx[..., None]).round().clamp(-127, 127).double()
    if d.dim() == 3:  # Q6K: a d per 16 quants, d (n, nb, 2), q (n, nb, 32)
        sums = torch.einsum("mbhk,nbhk->mnbh", a.unflatten(-1, (2, 16)), q.unflatten(-1, (2, 16)))
        return ((sums * d[None]).sum(-1) * dx.double()[:, None, :]).sum(-1) + bias.double()
    y = torch.einsum("mbk,nbk->mnb", a, q) * d[None] * dx.double()[:, None, :]
    if m is not None:
        y = y + m[None] * (dx.double() * a.sum(-1))[:, None, :]
    return y.sum(-1) + bias.double()


@native
@pytest.mark.parametrize("activations", ["int8"], indirect=True)
@pytest.mark.parametrize("fmt", FORMATS)
def test_int8_activations_are_one_int8_part_per_block_and_batch_invariant(fmt, activations):
    if DEFAULT_ISA not in ("amx", "vnni") and KERNEL_FAMILY[fmt] != "Q4":
        pytest.skip("this CPU has neither AMX nor AVX-512 VNNI: AVX2 runs the tiles layout for Q4 blocks only")
    g = torch.Generator().manual_seed(8)
    op = torch.ops.skiplayer.small_linear
    for M, K, N in [(1, 32, 16), (5, 96, 48), (19, 576, 64)]:
        w, x, bias = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g), torch.randn(N, generator=g)
        x[0, 32:64] = 0.0  # an all-zero block where K > 32 (dx = 1 there)
        b = pack_blocks(fmt, file_blocks(w, fmt), tiles=True)
        y = op(x, b, None, bias, True, False)
        ref = int8_activations_reference(x, b, bias)
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), fmt  # fp32 sums of exact int32 products
        exact = x.double() @ dequantize_blocks(b, K).double().T + bias.double()
        if K > 32:  # it really is coarser than int8x2 (whose error is ~2^-16)
            assert (y.double() - exact).abs().max() > 1e-4 * exact.abs().max()
        for m_ in range(1, M + 1):
            assert torch.equal(op(x[:m_], b, None, bias, True, False), y[:m_]), (fmt, M, m_)


@native
@pytest.mark.parametrize("activations", ["int8"], indirect=True)
@pytest.mark.parametrize("isa", ["avx2"], indirect=True)
@pytest.mark.parametrize("fmt", FORMATS + ["Q4_K", "Q6_K"])
def test_avx2_int8_activations_are_llamacpp_arithmetic_and_batch_invariant(fmt, isa, activations):
    """The AVX2 rows kernel with 8-bit x (the default on AVX2-only CPUs): integer dot products of the file's quants
    with one int8 part per block of 32, exactly the arithmetic of the VNNI kernel's one part, batch invariant."""
    from skiplayer.model.gguf_blocks import _file_parts
    g = torch.Generator().manual_seed(9)
    op = torch.ops.skiplayer.small_linear
    for M, K, N in [(1, 256, 5), (6, 512, 33), (19, 768, 40)]:  # odd N (two-row tiles' tail), M over chunks of 8
        w, x, bias = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g), torch.randn(N, generator=g)
        x[0, 32:64] = 0.0  # an all-zero block (dx = 1 there)
        raw = K_QUANT_ROWS[fmt](N, K, seed=M) if fmt in K_QUANT_ROWS else file_blocks(w, fmt)
        b = pack_blocks(fmt, raw)
        y = op(x, b, None, bias, True, False)
        ref = int8_activations_reference(x, b, bias, q6k_parts(b, K) if fmt == "Q6_K" else _file_parts(fmt, raw))
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), fmt  # fp32 sums of exact int32 products
        exact = x.double() @ dequantize_blocks(b, K).double().T + bias.double()
        assert (y.double() - exact).abs().max() > 1e-4 * exact.abs().max()  # it does take x in 8 bits
        assert_batch_and_thread_invariant(b, x, bias, y)


@native
@pytest.mark.parametrize("activations", ["int8"], indirect=True)
@pytest.mark.parametrize("isa", ["avx2"], indirect=True)
@pytest.mark.parametrize("fmt", FORMATS + ["Q4_K"])
def test_avx2_prompt_kernel_is_the_same_arithmetic_and_deterministic(fmt, isa, activations):
    """A prompt block (prompt=True; decoder_layers sets it for blocks at position 0 of 8+ rows) of Q4 rows takes
    the prompt kernel: the same 8-bit x and exact integer block sums, accumulated in another order, so within fp32
    rounding of the reference and not bit-identical to the rows kernel; deterministic whatever the threads. Q8 rows
    keep the rows kernel (their 16-bit pair sums would overflow)."""
    from skiplayer.model.gguf_blocks import _file_parts
    g = torch.Generator().manual_seed(10)
    op = torch.ops.skiplayer.small_linear
    for M, K, N in [(64, 256, 5), (67, 768, 33), (130, 512, 40)]:  # a tail chunk of 3 rows, weight rows 4 + 1
        w, x, bias = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g), torch.randn(N, generator=g)
        x[0, 32:64] = 0.0  # an all-zero block (dx = 1 there)
        x[-1, :32] *= 1e3  # a block whose int8 values all sit near +-127: the largest 16-bit sums
        raw = K_QUANT_ROWS[fmt](N, K, seed=M) if fmt in K_QUANT_ROWS else file_blocks(w, fmt)
        b = pack_blocks(fmt, raw)
        y = op(x, b, None, bias, True, False, True)
        ref = int8_activations_reference(x, b, bias, _file_parts(fmt, raw))
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (fmt, M)
        rows = op(x, b, None, bias, True, False, False)
        assert torch.equal(y, rows) == (KERNEL_FAMILY[fmt] == "Q8"), (fmt, M)  # which kernel ran
        assert torch.equal(op(x, b, None, bias, True, False, True), y)
        torch.set_num_threads(2)
        try:
            assert torch.equal(op(x, b, None, bias, True, False, True), y)
        finally:
            torch.set_num_threads(1)


@native
@pytest.mark.parametrize("activations", ["int8"], indirect=True)
@pytest.mark.parametrize("isa", ["avx2"], indirect=True)
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1"])
def test_avx2_tiles_kernel_is_the_prompt_and_vnni_arithmetic_bit_for_bit(fmt, isa, activations):
    """Q4 tiles on AVX2 (q4_tiles_avx2_int8: the default layout on AVX2-only CPUs) take the same exact int32 block
    sums and the same fp32 sequence per block as the prompt kernel on the rows layout and as the VNNI kernel on the
    tiles: the same bits as both (VNNI where the CPU has it), for every block size and thread count."""
    g = torch.Generator().manual_seed(12)
    op = torch.ops.skiplayer.small_linear
    for M, K, N in [(1, 64, 16), (7, 576, 48), (19, 1536, 32)]:  # passes of 4 rows and a tail, chunks of 8
        w, x, bias = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g), torch.randn(N, generator=g)
        x[0, 32:64] = 0.0  # an all-zero block (dx = 1 there)
        x[-1, :32] *= 1e3  # int8 values near +-127: the largest 16-bit sums
        raw = file_blocks(w, fmt)
        tiles, rows = pack_blocks(fmt, raw, tiles=True), pack_blocks(fmt, raw)
        y = op(x, tiles, None, bias, True, False)
        assert torch.equal(op(x, rows, None, bias, True, False, True), y), (fmt, M)  # the prompt kernel
        assert not torch.equal(op(x, rows, None, bias, True, False), y), (fmt, M)   # not the rows kernel's bits
        assert torch.equal(op(x, tiles, None, bias, True, False, True), y), (fmt, M)  # the prompt kernel on tiles
        ref = int8_activations_reference(x, tiles, bias)
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (fmt, M)
        assert_batch_and_thread_invariant(tiles, x, bias, y)
        if DEFAULT_ISA in ("vnni", "amx"):  # AMX takes one int8 part on the VNNI kernel (the fixture restores the isa)
            torch.ops.skiplayer.kernel_isa(DEFAULT_ISA)
            assert torch.equal(op(x, tiles, None, bias, True, False), y), (fmt, M)
            torch.ops.skiplayer.kernel_isa("avx2")


@native
@pytest.mark.parametrize("activations", ["int8x2"], indirect=True)
def test_tiles_on_avx2_with_two_int8_parts_is_a_clear_error(activations):
    if DEFAULT_ISA in ("vnni", "amx"):
        pytest.skip("this CPU runs the tiles layout with two int8 parts (VNNI / AMX)")
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(13))
    b = pack_blocks("Q4_1", file_blocks(w, "Q4_1"), tiles=True)
    with pytest.raises(RuntimeError, match="int8 activations"):
        torch.ops.skiplayer.small_linear(torch.randn(2, 64), b, None, None, True, False)


@native
@has_amx
@pytest.mark.parametrize("fmt", FORMATS)
def test_vnni_tiles_kernel_is_the_amx_kernel_bit_for_bit(fmt):
    set_gguf_activations("int8x2")  # AMX runs two int8 parts only
    g = torch.Generator().manual_seed(7)
    op = torch.ops.skiplayer.small_linear
    w, x, bias = torch.randn(64, 576, generator=g), torch.randn(11, 576, generator=g) * 3, torch.randn(64, generator=g)
    b = pack_blocks(fmt, file_blocks(w, fmt), tiles=True)
    try:
        torch.ops.skiplayer.kernel_isa("vnni")
        vnni = op(x, b, None, bias, True, False)
    finally:
        torch.ops.skiplayer.kernel_isa("amx")
    assert torch.equal(op(x, b, None, bias, True, False), vnni)


@pytest.mark.parametrize("tiles", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_block_rows_are_those_rows_of_the_weights(fmt, tiles):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(8))
    b = pack_blocks(fmt, file_blocks(w, fmt), tiles=tiles)
    full = dequantize_blocks(b, 96)
    for ids in (torch.tensor([5, 63, 0, 17] * 8), torch.tensor([9, 2, 40])):  # whole groups of 16, and not
        rows = block_rows(b, 96, ids)
        assert kernel_format(rows, 96) == KERNEL_FAMILY[fmt] + (" tiles" if tiles and len(ids) % 16 == 0 else "")
        assert torch.equal(dequantize_blocks(rows, 96), full[ids])


@native
def test_a_reduced_draft_head_reads_the_heads_blocks_and_stays_lossless(tmp_path):
    from skiplayer.decoding.draft import DraftHead
    from skiplayer.draft_artifact import Draft
    float_model, model, _ = tiny_gguf_pair(tmp_path)
    ids = torch.arange(4, 97, 2)
    head = DraftHead(model, ids)
    assert head.weight.dtype == torch.uint8 and torch.equal(dequantize_blocks(head.weight, 64),
                                                            dequantize_blocks(model.lm_head.weight, 64)[ids])
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        expected = float_model.logits(x, float_model.head_rows(ids))[-1]  # the same Q8_0 values, as floats
        set_gguf_activations("int8x2")  # x in fp32 on the rows kernels, AVX2 too (its default takes 8-bit x)
        assert torch.allclose(head(x, 4), expected, atol=1e-4, rtol=1e-4)
    set_gguf_activations("auto")  # the lossless check on this machine's default (conftest restores the earlier one)
    draft = Draft(ids, {}, {}, [2])
    for prompt in LOSSLESS_PROMPTS:
        def run(strategy):
            config = GenerationConfig(max_steps=24, generation_strategy=strategy,
                                      policy=PolicyConfig(exit_layer=2, num_speculations=2))
            return generate_ids(model, prompt, config, tokenizer=FakeTokenizer(), draft=draft)[0]
        assert run("self_speculative") == run("autoregressive"), prompt


@native
def test_weights_kept_in_the_caches_keep_their_bits_and_only_when_they_fit(monkeypatch):
    """keep_weights_cached changes prefetch hints only: the same bits; and it keeps nothing beyond half the
    last-level cache, nor anything but block weights."""
    from skiplayer.model import optimize
    g = torch.Generator().manual_seed(3)
    w, x, bias = torch.randn(64, 96, generator=g), torch.randn(3, 96, generator=g), torch.randn(64, generator=g)
    op = torch.ops.skiplayer.small_linear
    for tiles in [False] + ([True] if DEFAULT_ISA in ("amx", "vnni") else []):
        b = pack_blocks("Q4_1", file_blocks(w, "Q4_1"), tiles=tiles)
        optimize.keep_weights_cached([])
        streamed = [op(x[:m], b, None, bias, True, False) for m in (1, 3)]
        monkeypatch.setattr(optimize, "last_level_cache_bytes", lambda: 2 * b.numel())
        assert optimize.keep_weights_cached([b, torch.zeros(3), None])
        assert all(torch.equal(op(x[:m], b, None, bias, True, False), y) for m, y in zip((1, 3), streamed))
        monkeypatch.setattr(optimize, "last_level_cache_bytes", lambda: 2 * b.numel() - 1)
        assert not optimize.keep_weights_cached([b])
        assert not optimize.keep_weights_cached([torch.zeros(3)])
    assert torch.ops.skiplayer.keep_weights_cached([b, b]) == 2  # the native registry takes them all as given


@native
def test_a_calibrated_draft_keeps_its_layers_and_reduced_head_cached(tmp_path, monkeypatch):
    from skiplayer.decoding import draft as draft_module
    from skiplayer.draft_artifact import ResidualAdapter
    _, model, _ = tiny_gguf_pair(tmp_path)
    kept = []
    monkeypatch.setattr(draft_module, "keep_weights_cached", lambda ws: kept.append(ws))
    head = draft_module.DraftHead(model, torch.arange(4, 97, 2), {2: ResidualAdapter(64, 8)})
    ptrs = {t.data_ptr() for t in kept[-1]}
    below = {t.data_ptr() for layer in model.layers[:2] for t in layer.state_dict().values() if t.dtype == torch.uint8}
    above = {t.data_ptr() for layer in model.layers[2:] for t in layer.state_dict().values() if t.dtype == torch.uint8}
    assert below and below <= ptrs and not above & ptrs and head.weight.data_ptr() in ptrs
    kept.clear()
    draft_module.DraftHead(model)  # the vanilla exit: the full head, nothing kept
    assert not kept


def q4k_file_rows(n: int, K: int, seed: int = 0) -> np.ndarray:
    """Random Q4_K rows as a file holds them (any bytes are valid blocks once d and dmin are finite)."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(n, K // 256, 144), dtype=np.uint8)
    for offset in (0, 2):  # d, dmin: small positive fp16
        b[..., offset:offset + 2] = rng.uniform(1e-3, 1e-2, size=(n, K // 256, 1)).astype(np.float16).view(np.uint8)
    return b.reshape(n, -1)


def q6k_file_rows(n: int, K: int, seed: int = 0) -> np.ndarray:
    """Random Q6_K rows as a file holds them (any quants and int8 scales are valid once d is finite)."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(n, K // 256, 210), dtype=np.uint8)
    b[..., 208:210] = rng.uniform(1e-4, 1e-3, size=(n, K // 256, 1)).astype(np.float16).view(np.uint8)
    return b.reshape(n, -1)


def q6k_parts(b: torch.Tensor, K: int):
    """(d (n, nb, 2), None, q (n, nb, 32)) of Q6K rows in the kernels' layout: a d per 16 quants."""
    blocks = b.numpy().reshape(b.shape[0], K // 32, 40)
    return blocks[..., :8].copy().view(np.float32), None, blocks[..., 8:].copy().view(np.int8)


K_QUANT_ROWS = {"Q4_K": q4k_file_rows, "Q6_K": q6k_file_rows}


@pytest.mark.parametrize("fmt, layout, size", [("Q4_K", "Q4K", 24), ("Q6_K", "Q6K", 40)])
def test_k_quant_blocks_are_ggml_dequantization(fmt, layout, size):
    raw = K_QUANT_ROWS[fmt](24, 512)
    w = pack_blocks(fmt, raw)
    assert kernel_format(w, 512) == layout and w.shape == (24, 512 // 32 * size)
    expected = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[fmt]))
    assert torch.equal(dequantize_blocks(w, 512), expected)  # fp32 sub-block scales: the file's values exactly
    with pytest.raises(ValueError, match="rows layout only"):
        pack_blocks(fmt, raw, tiles=True)


@native
@pytest.mark.parametrize("activations", ["int8x2"], indirect=True)
@pytest.mark.parametrize("isa", isas(), indirect=True)
@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K"])
def test_k_quant_products_exact_and_batch_invariant(fmt, isa, activations):
    raw = K_QUANT_ROWS[fmt](40, 768, seed=1)
    w = pack_blocks(fmt, raw)
    ref_w = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[fmt])).double()
    x = torch.randn(11, 768, generator=torch.Generator().manual_seed(3))
    op = torch.ops.skiplayer.small_linear
    y = op(x, w, None, None, True, False)
    rows = torch.cat([op(x[i:i + 1], w, None, None, True, False) for i in range(len(x))])
    expected = (x.double() @ ref_w.T).float()
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    assert torch.equal(y, rows)


def test_unknown_gguf_activations_is_a_one_line_error():
    from skiplayer.errors import UserError
    from skiplayer.model.load import load_model
    with pytest.raises(UserError, match="unknown GGUF activations 'int4': use one of auto, int8, int8x2"):
        load_model("no-such-model.gguf", gguf_activations="int4")  # refused before looking for the file
    with pytest.raises(ValueError, match="unknown GGUF activations"):
        set_gguf_activations("fp16")


@native
@pytest.mark.parametrize("activations", ["int8", "int8x2"], indirect=True)
@pytest.mark.parametrize("tiles", [False, pytest.param(True, marks=has_tiles)])
def test_long_blocks_split_their_elementwise_work_over_threads_bit_for_bit(tiles, activations):
    """A prompt-sized block (130 rows of 576) converts, quantizes and rounds its rows on both threads (for_rows in
    avx2.cpp): the same bits as one thread, and as the same rows in blocks of 8 (the chunks decoding would run)."""
    g = torch.Generator().manual_seed(10)
    op = torch.ops.skiplayer.small_linear
    w, x, bias = torch.randn(64, 576, generator=g), torch.randn(130, 576, generator=g).half(), torch.randn(64, generator=g)
    b = pack_blocks("Q4_1", file_blocks(w, "Q4_1"), tiles=tiles)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(x, b, None, bias, False, False)
        torch.set_num_threads(2)
        assert torch.equal(op(x, b, None, bias, False, False), one)
        assert torch.equal(torch.cat([op(x[i:i + 8], b, None, bias, False, False) for i in range(0, 130, 8)]), one)
    finally:
        torch.set_num_threads(before)
