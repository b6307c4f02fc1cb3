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
def profile_costs(model: Transformer, max_n: int, head_weight: torch.Tensor | None = None, repeats: int = 5,
                  context: int = 64, head_packed: bool = False, long_context: int = 576) -> CostModel:
    """Measure on this machine, relative to one autoregressive step. Verification passes are timed at `context` and
    again at `long_context` tokens (where the model allows it): each extra position attends to the whole context,
    so v(n) grows with it (Zen 5: v(8) 1.54 at 100 tokens, 1.80 at 700). Cached per model: the passes up to the
    largest n asked for (at least 8), the draft head per head; so every configuration run in one process plans with
    the same v(n) (two profiles of one machine differed by up to ~10% in v(5), enough to change the chosen runs)."""
    cached = _PROFILES.setdefault(model, {"heads": {}})
    passes, at = cached.get("passes"), None
    if passes is None or len(passes.verify) - 1 < max_n:
        n = max(max_n, 8)
        at = _AtContext(model, context, n)
        step, verify = at.verify_passes(n, repeats)
        h = at.embedded_step()
        layers = at.seconds(lambda: model.forward_layers(h, context, at.cache, 0, model.n_layers), repeats)
        passes = CostModel(model.n_layers, layers / model.n_layers / step, 0.0, verify, step, profile_context=context)
        long = min(long_context, model.max_seq_len - n - 1)
        if long >= 2 * context:
            passes.verify_long, passes.long_context = _AtContext(model, long, n).verify_passes(n, repeats)[1], long
        cached["passes"], cached["heads"] = passes, {}
    head_key = None if head_weight is None else (head_weight.data_ptr(), tuple(head_weight.shape))
    if head_key not in cached["heads"]:
        at = at or _AtContext(model, context, 1)  # a new head for cached passes: a prompt of its own
        h = at.embedded_step()
        cached["heads"][head_key] = at.seconds(lambda: model.logits(h, head_weight, head_packed), repeats)
    costs = _copy(passes)
    costs.head = cached["heads"][head_key] / passes.step_seconds
    return costs


class _AtContext:
    """A prompt of `context` tokens in a fresh cache, and the times of forwards that follow it (the cache rolled
    back to the prompt after each)."""

    def __init__(self, model: Transformer, context: int, max_n: int):
        device = model.tok_embeddings.weight.device
        self.model, self.context, self.cuda = model, context, device.type == "cuda"
        self.cache = model.new_cache(context + max_n + 1)
        self.tokens = torch.arange(context + max_n, device=device) % model.args.vocab_size
        model(self.tokens[:context], 0, self.cache)

    def embedded_step(self) -> torch.Tensor:
        """The embedded token after the prompt (1, dim)."""
        return self.model.embed(self.tokens[self.context:self.context + 1])

    def seconds(self, fn, repeats: int) -> float:
        def run():
            fn()
            if self.cuda:
                torch.cuda.synchronize()
            self.cache.rollback(self.context)
        return _median_seconds(run, repeats)

    def verify_passes(self, max_n: int, repeats: int) -> tuple[float, list[float]]:
        """(seconds of one step, [0, v(1) = 1, v(2), ..., v(max_n)]): v(n) is the median over `repeats` of a pass
        over n positions over the one-position pass timed just before it. Ratios of neighbours cancel the drift of a
        shared VM's speed, which made v(n) from separately timed medians vary by +-10% from one start to the next."""
        c = self.context

        def seconds(n: int) -> float:
            return self.seconds(lambda: self.model(self.tokens[c:c + n], c, self.cache), 1)
        steps, ratios = [], {n: [] for n in range(2, max_n + 1)}
        for _ in range(repeats):
            for n in ratios:
                steps.append(seconds(1))
                ratios[n].append(seconds(n) / steps[-1])
        return statistics.median(steps), [0.0, 1.0] + [statistics.median(ratios[n]) for n in ratios]


def _copy(c: CostModel) -> CostModel:
    """A policy's own copy (it learns its draft scale online)."""
    return CostModel(c.n_layers, c.layer, c.head, list(c.verify), c.step_seconds, verify_long=list(c.verify_long),
                     profile_context=c.profile_context, long_context=c.long_context)
