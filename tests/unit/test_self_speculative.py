"""Self-speculative decoding is lossless: greedy token identity and exact sampling distribution."""
from collections import Counter

import pytest
import torch

from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.decoding.sampling import SamplingConfig, greedy_tokens, probabilities
from skiplayer.errors import UserError
from skiplayer.policies import PolicyConfig
from tests.helpers import FakeTokenizer, chi_square_pvalue, exact_sequence_distribution, predictable_model

PROMPTS = [[1, 5, 7, 9], [3], [11, 12, 13, 14, 15, 16, 17, 18]]


def run(model, prompt, strategy="autoregressive", max_steps=30, E=1, k=1, **kw):
    config = GenerationConfig(max_steps=max_steps, generation_strategy=strategy,
                              policy=PolicyConfig(exit_layer=E, num_speculations=k),
                              stop_words=kw.pop("stop_words", []), stop_token_ids=kw.pop("stop_token_ids", []))
    ids, stop, stats = generate_ids(model, prompt, config, tokenizer=FakeTokenizer(), **kw)
    return ids, stats


@pytest.fixture(scope="module", params=[0, 1])
def model(request):
    return predictable_model(seed=request.param)


def test_greedy_identity_every_exit_layer_and_k(model):
    accepted_rounds = 0
    for prompt in PROMPTS:
        ar, _ = run(model, prompt)
        for E in range(1, model.n_layers):
            for k in (1, 2, 4, 7):
                ss, stats = run(model, prompt, "self_speculative", E=E, k=k)
                assert ss == ar, (prompt, E, k)
                assert stats.accepted <= stats.drafted
                accepted_rounds += sum(a == d for a, d in zip(stats.accepted_per_round, stats.draft_lengths))
    assert accepted_rounds > 0, "no round accepted all drafts: the bonus-token path was never exercised"


def test_stops_mid_round_like_autoregressive(model):
    prompt = PROMPTS[0]
    ar, _ = run(model, prompt, max_steps=40)
    # EOS (as a stop token id) that first appears deep into the output, max_steps in the middle of a round,
    # and a stop word spanning two tokens.
    eos = ar[len(ar) // 2]
    stop_word = f"t{ar[9]} t{ar[10]}"
    for kw in ({"stop_token_ids": [eos]}, {"max_steps": 13}, {"stop_words": [stop_word]}):
        expect, _ = run(model, prompt, **({"max_steps": 40} | kw))
        for E, k in ((1, 4), (3, 7), (5, 2)):
            got, _ = run(model, prompt, "self_speculative", E=E, k=k, **({"max_steps": 40} | kw))
            assert got == expect, (kw, E, k)
    assert run(model, prompt, stop_token_ids=[eos])[0][-1] == eos
    assert len(run(model, prompt, "self_speculative", max_steps=13, E=2, k=7)[0]) == 13


@pytest.mark.parametrize("sampling", [SamplingConfig(True, 1.0), SamplingConfig(True, 0.8, top_k=4, top_p=0.9)])
def test_sampling_distribution_matches_autoregressive(sampling):
    model = predictable_model(seed=2, n_layers=4, vocab_size=8, deep_scale=0.5)
    prompt = [1, 2, 3]
    exact = exact_sequence_distribution(model, prompt, 3, lambda logits: probabilities(logits, sampling))
    draws = 3000
    counts = Counter()
    for seed in range(draws):
        config = GenerationConfig(max_steps=3, generation_strategy="self_speculative", sampling=sampling, seed=seed,
                                  policy=PolicyConfig(exit_layer=1 + seed % 3, num_speculations=1 + seed % 3))
        ids, _, _ = generate_ids(model, prompt, config)
        counts[tuple(ids)] += 1
    assert chi_square_pvalue(counts, exact, draws) > 1e-3


def test_bad_inputs_are_user_errors(model):
    for E in (0, model.n_layers):
        with pytest.raises(UserError, match="--exit_layer"):
            run(model, [1, 2], "self_speculative", E=E, k=2)
    with pytest.raises(UserError, match="--num_speculations"):
        run(model, [1, 2], "self_speculative", E=1, k=0)
    with pytest.raises(UserError, match="empty prompt"):
        run(model, [])
    with pytest.raises(UserError, match="--max_steps"):
        run(model, [1], max_steps=300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_tokens_matches_torch_argmax_on_ties_and_nan(dtype):
    # greedy acceptance reads numpy's argmax on a CPU: it must pick what torch's does, first maximum and NaN included
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 4, (6, 1000), generator=g).to(dtype)  # many ties for the maximum
    logits[1, 17] = float("nan")
    logits[2] = float("-inf")
    logits[3, 999] = 100
    assert greedy_tokens(logits) == logits.argmax(-1).tolist()
    assert greedy_tokens(logits[4]) == int(logits[4].argmax())
