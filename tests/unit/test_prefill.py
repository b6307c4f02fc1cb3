"""model/prefill.py: the prompt block through bfloat16 matmuls and flash attention (fast, deterministic, not batch
invariant), and self-speculation still token-identical to autoregressive decoding on top of it."""
import pytest
import torch

from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.errors import UserError
from skiplayer.model.llama import Transformer
from skiplayer.model.optimize import optimize_model
from skiplayer.model.prefill import Bfloat16Prefill, choose
from skiplayer.policies import PolicyConfig
from tests.conftest import tiny_hf_model
from tests.helpers import FakeTokenizer, predictable_model

PROMPT = torch.randint(4, 97, (40,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kernels", ["torch", "auto"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bfloat16_prefill_close_to_the_decoding_kernels_and_deterministic(arch, kernels):
    model = optimize_model(Transformer.from_hf(tiny_hf_model(arch, seed=4, n_layers=3)), kernels=kernels,
                           prefill="bfloat16")
    assert isinstance(model.wide_prefill, Bfloat16Prefill)
    seen = {}
    with torch.inference_mode():
        ref_cache, cache, again = (model.new_cache(64) for _ in range(3))
        ref = model.forward_layers(model.embed(PROMPT), 0, ref_cache, 0, model.n_layers)
        got = model.prefill(PROMPT, cache, {1: lambda h: seen.setdefault(1, h), 2: lambda h: seen.setdefault(2, h)})
        assert torch.equal(model.prefill(PROMPT, again), got)  # deterministic
    assert sorted(seen) == [1, 2] and seen[1].shape == got.shape
    scale = ref.abs().max()
    assert (got - ref).abs().max() / scale < 0.05  # bfloat16 matmul inputs and outputs: ~2^-8 each
    assert cache.lengths == ref_cache.lengths == [len(PROMPT)] * model.n_layers
    assert (cache.k - ref_cache.k).abs().max() / ref_cache.k.abs().max() < 0.05
    short = PROMPT[:8]  # below min_rows: the decoding kernels, bit for bit
    with torch.inference_mode():
        assert torch.equal(model.prefill(short, model.new_cache(16)),
                           model.forward_layers(model.embed(short), 0, model.new_cache(16), 0, model.n_layers))


def test_self_speculation_stays_identical_with_the_bfloat16_prefill():
    model = optimize_model(predictable_model(seed=1), prefill="bfloat16")
    prompt = PROMPT.tolist()

    def run(strategy, **policy):
        config = GenerationConfig(max_steps=24, generation_strategy=strategy, policy=PolicyConfig(**policy))
        return generate_ids(model, prompt, config, tokenizer=FakeTokenizer())[0]
    ar = run("autoregressive")
    for E, k in ((1, 2), (3, 4)):
        assert run("self_speculative", exit_layer=E, num_speculations=k) == ar


def test_choose(monkeypatch):
    assert choose("native") == "native" and choose("bfloat16") == "bfloat16"
    assert choose("auto") in ("native", "bfloat16")
    with pytest.raises(ValueError, match="prefill must be one of"):
        choose("fp8")
    monkeypatch.setenv("SKIPLAYER_PREFILL", "native")
    assert choose("auto") == "native"
    monkeypatch.setenv("SKIPLAYER_PREFILL", "fp8")
    with pytest.raises(UserError, match="SKIPLAYER_PREFILL='fp8': prefill must be one of"):
        choose("auto")
