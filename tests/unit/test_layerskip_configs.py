"""The facebook/layerskip-* checkpoints are Llama models: configs shaped like Llama-3.2-1B (16 layers, GQA 4:1,
tied embeddings, llama3 RoPE scaling) and Llama-2-7B (32 layers, full multi-head attention, untied head) load, match
HF, decode losslessly, and accept LayerSkip's exit layers (1 .. n_layers - 1). Widths are scaled down so the tests
stay small; depth, head ratios and RoPE settings are the real ones."""
import pytest
import torch
import transformers

from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.errors import UserError
from skiplayer.model.llama import Transformer
from skiplayer.policies import PolicyConfig

SHAPES = {
    "llama3.2-1B": dict(num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                        rope_theta=500000.0, max_position_embeddings=4096,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                                      "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}),
    "llama2-7B": dict(num_hidden_layers=32, num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
                      rope_theta=10000.0, max_position_embeddings=4096),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request):
    config = transformers.LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=136, rms_norm_eps=1e-5,
                                      **SHAPES[request.param])
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return request.param, hf, Transformer.from_hf(hf)


def test_logits_equal_hf(pair):
    _, hf, model = pair
    tokens = torch.randint(0, 211, (40,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = hf(tokens[None]).logits[0]
        got = model(tokens, 0, model.new_cache(64))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_layerskip_exit_layers_decode_losslessly(pair):
    name, _, model = pair
    prompt = [5, 6, 7, 8, 5, 6, 7]
    config = GenerationConfig(max_steps=16)
    ar, _, _ = generate_ids(model, prompt, config)
    for E in (1, model.n_layers // 2, model.n_layers - 1):
        for source in ("self", "both"):
            config = GenerationConfig(max_steps=16, generation_strategy="self_speculative",
                                      policy=PolicyConfig(exit_layer=E, num_speculations=3, draft_source=source))
            assert generate_ids(model, prompt, config)[0] == ar, (name, E, source)
    with pytest.raises(UserError, match=rf"\[1, {model.n_layers - 1}\]"):
        generate_ids(model, prompt, GenerationConfig(generation_strategy="self_speculative",
                                                     policy=PolicyConfig(exit_layer=model.n_layers)))
