"""Profile the costs the adaptive policy plans with: one layer, the draft head, verification passes by length."""
from __future__ import annotations

import statistics
import time
import weakref

import torch

from skiplayer.model.llama import Transformer
from skiplayer.policies.adaptive import CostModel

_PROFILES: "weakref.WeakKeyDictionary[Transformer, dict]" = weakref.WeakKeyDictionary()


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def profile_costs(model: Transformer, max_n: int, head_weight: torch.Tensor | None = None, repeats: int = 3,
                  context: int = 64, head_packed: bool = False, long_context: int = 576) -> CostModel:
    """Measure on this machine, relative to one autoregressive step; cached per model and draft head. Verification
    passes are timed at `context` and again at `long_context` tokens (where the model allows it): each extra position
    attends to the whole context, so v(n) grows with it (Zen 5: v(8) 1.54 at 100 tokens, 1.80 at 700)."""
    key = (max_n, None if head_weight is None else head_weight.shape[0])
    cached = _PROFILES.setdefault(model, {})
    if key in cached:
        return _copy(cached[key])
    device = model.tok_embeddings.weight.device
    cache = model.new_cache(context + max_n + 1)
    tokens = torch.arange(context + max_n, device=device) % model.args.vocab_size
    model(tokens[:context], 0, cache)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(fn):
        def wrapped():
            fn()
            sync()
            cache.rollback(context)
        return wrapped

    h = model.embed(tokens[context:context + 1])
    step = _median_seconds(run(lambda: model(tokens[context:context + 1], context, cache)), repeats + 2)
    layers = _median_seconds(run(lambda: model.forward_layers(h, context, cache, 0, model.n_layers)), repeats)
    head = _median_seconds(run(lambda: model.logits(h, head_weight, head_packed)), repeats)
    verify = [0.0] + [_median_seconds(run(lambda n=n: model(tokens[context:context + n], context, cache)), repeats)
                      / step for n in range(1, max_n + 1)]
    costs = CostModel(model.n_layers, layers / model.n_layers / step, head / step, verify, step,
                      profile_context=context)
    long_context = min(long_context, model.max_seq_len - max_n - 1)
    if long_context >= 2 * context:
        costs.verify_long, costs.long_context = _verify_passes(model, max_n, long_context, repeats), long_context
    cached[key] = costs
    return _copy(costs)


def _verify_passes(model: Transformer, max_n: int, context: int, repeats: int) -> list[float]:
    """[0, v(1) = 1, v(2), ..., v(max_n)]: passes over n positions at `context` tokens over one step there."""
    device = model.tok_embeddings.weight.device
    cache = model.new_cache(context + max_n + 1)
    tokens = torch.arange(context + max_n, device=device) % model.args.vocab_size
    model(tokens[:context], 0, cache)

    def pass_of(n: int):
        def run():
            model(tokens[context:context + n], context, cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
            cache.rollback(context)
        return run
    step = _median_seconds(pass_of(1), repeats + 2)
    return [0.0] + [_median_seconds(pass_of(n), repeats) / step for n in range(1, max_n + 1)]


def _copy(c: CostModel) -> CostModel:
    """A policy's own copy (it learns its draft scale online)."""
    return CostModel(c.n_layers, c.layer, c.head, list(c.verify), c.step_seconds, verify_long=list(c.verify_long),
                     profile_context=c.profile_context, long_context=c.long_context)
