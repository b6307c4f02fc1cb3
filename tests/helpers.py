"""Helpers for engine tests: tiny models whose shallow exits agree often, a fake tokenizer, exact distributions."""
from __future__ import annotations

import itertools

import torch

from skiplayer.model.llama import Transformer
from tests.conftest import tiny_hf_model


def predictable_model(seed: int = 0, n_layers: int = 6, vocab_size: int = 97, deep_scale: float = 0.2) -> Transformer:
    """Layers after the first two add little to the residual stream, so early exits often match the full model
    (drafts get accepted, including whole rounds), but not always (rejections happen too)."""
    model = Transformer.from_hf(tiny_hf_model("llama", seed=seed, n_layers=n_layers, vocab_size=vocab_size))
    with torch.no_grad():
        for layer in model.layers[2:]:
            layer.attention.wo.weight.mul_(deep_scale)
            layer.feed_forward.w2.weight.mul_(deep_scale)
    return model


class FakeTokenizer:
    """Token i decodes to 't<i> '; enough for stop words that span several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"t{i} " for i in ids)


@torch.inference_mode()
def exact_sequence_distribution(model: Transformer, prompt: list[int], n: int, probs_fn) -> dict[tuple, float]:
    """Exact probability of every n-token continuation under autoregressive sampling with `probs_fn(logits)`."""
    vocab = model.args.vocab_size
    dist = {}
    for seq in itertools.product(range(vocab), repeat=n):
        dist[seq] = 1.0
    # Walk the tree level by level, one forward per prefix.
    prefixes = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for prefix, p in prefixes.items():
            ids = torch.tensor(prompt + list(prefix))
            logits = model(ids, 0, model.new_cache(len(ids)))[-1]
            q = probs_fn(logits)
            for t in range(vocab):
                if q[t] > 0:
                    nxt[prefix + (t,)] = p * float(q[t])
        prefixes = nxt
    return prefixes


def chi_square_pvalue(counts: dict[tuple, int], expected_probs: dict[tuple, float], total: int,
                      min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; outcomes with small expected counts are pooled into one bin."""
    observed, expected, pool_o, pool_e = [], [], 0, 0.0
    for outcome, p in expected_probs.items():
        e = p * total
        if e >= min_expected:
            observed.append(counts.get(outcome, 0))
            expected.append(e)
        else:
            pool_o += counts.get(outcome, 0)
            pool_e += e
    unseen = sum(c for o, c in counts.items() if o not in expected_probs)
    assert unseen == 0, f"sampled {unseen} outcomes that have zero probability"
    if pool_e > 0:
        observed.append(pool_o)
        expected.append(pool_e)
    o, e = torch.tensor(observed, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    stat = float(((o - e) ** 2 / e).sum())
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))
