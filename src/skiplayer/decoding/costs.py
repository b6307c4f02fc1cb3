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
                  context: int = 64, head_packed: bool = False) -> CostModel:
    """Measure on this machine, relative to one autoregressive step; cached per model and draft head."""
    key = (max_n, None if head_weight is None else head_weight.shape[0])
    cached = _PROFILES.setdefault(model, {})
    if key in cached:
        c = cached[key]
        return CostModel(c.n_layers, c.layer, c.head, list(c.verify), c.step_seconds)
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
    costs = CostModel(model.n_layers, layers / model.n_layers / step, head / step, verify, step)
    cached[key] = costs
    return CostModel(costs.n_layers, costs.layer, costs.head, list(costs.verify), costs.step_seconds)
