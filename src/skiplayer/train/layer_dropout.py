"""Layer dropout (stochastic depth over whole decoder layers), as in the LayerSkip training recipe.

Layer l (0-based, of L decoder layers) is skipped during training with probability

    p_l = p_max * scale(x),    x = l / (L - 1)    (x = 1 for every layer when L == 1)

so the first layer is (almost) never dropped and the deepest is dropped most. The scales, all increasing from
scale(0) = 0 to scale(1) = 1 (except `uniform`, and `sigmoid`, which only approaches the ends):

    uniform   scale(x) = 1                                  every layer gets p_max
    linear    scale(x) = x
    exp       scale(x) = 2**x - 1                           (LayerSkip / torchtune default; convex)
    log       scale(x) = ln(1 + x (L - 1)) / ln(L)          = log_L(l + 1); concave, rises fast on early layers
    sin       scale(x) = sin(pi/2 * x)                      concave
    sigmoid   scale(x) = 1 / (1 + exp(-10 (x - 0.5)))       S-shaped: 0.0067 at x=0, 0.5 at x=0.5, 0.9933 at x=1

The LAST layer follows the scale like any other (it gets p_max for every scale but sigmoid): the LayerSkip
recipe drops the deepest layers most, and a dropped last layer simply means the sample's loss is computed on
the output of layer L-2 through the final norm + head, which is exactly the early-exit behaviour being trained.
`disable_below=k` sets p_l = 0 for l < k (those layers always run).

Dropping a layer = skipping its residual update: the layer returns its input unchanged (no 1/(1-p) rescaling,
as in LayerSkip). Per-sample mode draws one coin per batch row (a row-dropped layer is computed for the
batch and the row takes its input back; when every row drops it, the layer is not computed at all);
per-batch mode draws one coin for the whole micro-batch. Dropout only acts while the layer is in training
mode: `model.eval()` turns it off.
"""
from __future__ import annotations

import math
import types
from enum import Enum
from typing import Sequence

import torch

from skiplayer.errors import UserError, parse_enum


class LayerDropoutScaleType(str, Enum):
    UNIFORM = "uniform"
    LINEAR = "linear"
    EXP = "exp"
    LOG = "log"
    SIN = "sin"
    SIGMOID = "sigmoid"


def parse_scale(name: str | LayerDropoutScaleType) -> LayerDropoutScaleType:
    return parse_enum(LayerDropoutScaleType, name, "layer dropout scale", "--layer_dropout_scale")


def layer_scale(scale: str | LayerDropoutScaleType, layer: int, n_layers: int) -> float:
    """scale(l / (L-1)) in [0, 1] for layer `layer` of `n_layers` (formulas in the module docstring)."""
    scale = parse_scale(scale)
    if n_layers <= 1:
        return 1.0
    x = layer / (n_layers - 1)
    if scale is LayerDropoutScaleType.UNIFORM:
        value = 1.0
    elif scale is LayerDropoutScaleType.LINEAR:
        value = x
    elif scale is LayerDropoutScaleType.EXP:
        value = 2.0 ** x - 1.0
    elif scale is LayerDropoutScaleType.LOG:
        value = math.log(1.0 + layer) / math.log(n_layers)
    elif scale is LayerDropoutScaleType.SIN:
        value = math.sin(0.5 * math.pi * x)
    else:  # sigmoid
        value = 1.0 / (1.0 + math.exp(-10.0 * (x - 0.5)))
    return min(max(value, 0.0), 1.0)


def layer_dropout_probs(n_layers: int, p_max: float, scale: str | LayerDropoutScaleType = "exp",
                        disable_below: int = 0) -> list[float]:
    """The per-layer drop probabilities p_l = p_max * scale(l/(L-1)), 0 for layers below `disable_below`."""
    if not 0.0 <= p_max <= 1.0:
        raise UserError(f"layer dropout probability {p_max} is outside [0, 1]: pass a value in [0, 1] "
                        f"with --layer_dropout_prob_max")
    if disable_below < 0:
        raise UserError(f"layer dropout disable_below={disable_below} is negative: pass 0 or a layer index")
    scale = parse_scale(scale)
    return [0.0 if l < disable_below else p_max * layer_scale(scale, l, n_layers) for l in range(n_layers)]


class LayerDropout:
    """Stochastic depth on a list of decoder-layer modules, installed by patching each layer's `forward`
    on the instance (the parameters and state-dict keys are untouched, so `save_pretrained` is unaffected).
    Call `remove()` to restore the original forwards. `generator` makes the coin flips reproducible;
    `last_dropped[l]` holds the fraction of rows layer l dropped in its latest call (for logging/tests)."""

    def __init__(self, layers: Sequence[torch.nn.Module], probs: Sequence[float], per_sample: bool = True,
                 generator: torch.Generator | None = None):
        if len(layers) != len(probs):
            raise ValueError(f"{len(layers)} layers but {len(probs)} probabilities")
        self.layers = list(layers)
        self.probs = [float(p) for p in probs]
        self.per_sample = per_sample
        self.generator = generator if generator is not None else torch.Generator()
        self.last_dropped = [0.0] * len(self.layers)
        self._returns_tuple: bool | None = None  # learnt from the first real call (transformers 4.x: tuples)
        self._originals = []
        for index, layer in enumerate(self.layers):
            self._originals.append(layer.__dict__.get("forward"))
            layer.forward = types.MethodType(self._make_forward(index, layer.forward), layer)

    def _make_forward(self, index: int, original):
        dropout = self

        def forward(module, hidden_states, *args, **kwargs):
            p = dropout.probs[index]
            if not module.training or p <= 0.0:
                return original(hidden_states, *args, **kwargs)
            rows = hidden_states.shape[0]
            n_coins = rows if dropout.per_sample else 1
            drop = torch.rand(n_coins, generator=dropout.generator) < p
            if not dropout.per_sample:
                drop = drop.expand(rows)
            dropout.last_dropped[index] = float(drop.float().mean())
            if bool(drop.all()) and dropout._returns_tuple is not None:
                return (hidden_states,) if dropout._returns_tuple else hidden_states
            out = original(hidden_states, *args, **kwargs)
            dropout._returns_tuple = isinstance(out, tuple)
            if not bool(drop.any()):
                return out
            new = out[0] if dropout._returns_tuple else out
            keep_input = drop.to(hidden_states.device).view(rows, *([1] * (hidden_states.dim() - 1)))
            new = torch.where(keep_input, hidden_states.to(new.dtype), new)
            return (new, *out[1:]) if dropout._returns_tuple else new

        return forward

    def remove(self) -> None:
        for layer, original in zip(self.layers, self._originals):
            if original is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = original
        self._originals = [None] * len(self.layers)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "probs": list(self.probs)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def apply_layer_dropout(layers: Sequence[torch.nn.Module], p_max: float, scale: str = "exp", disable_below: int = 0,
                        per_sample: bool = True, seed: int = 0) -> LayerDropout | None:
    """Install layer dropout on `layers` with p_l = p_max * scale(l/(L-1)); None when every p_l is 0."""
    probs = layer_dropout_probs(len(layers), p_max, scale, disable_below)
    if not any(p > 0 for p in probs):
        return None
    return LayerDropout(layers, probs, per_sample=per_sample, generator=torch.Generator().manual_seed(seed))
