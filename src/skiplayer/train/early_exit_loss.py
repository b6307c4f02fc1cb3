"""Early-exit loss (LayerSkip): a cross-entropy loss on the output of chosen intermediate layers, each read
through the model's FINAL norm + LM head (the same "exit" the self-speculative drafter uses), mixed with the
normal LM loss of the last layer.

Layer indexing: exit l (0-based, of L decoder layers) is the OUTPUT of decoder layer l, i.e. HF's
`hidden_states[l + 1]`. Exit L-1 is the model's own output, so its loss is the normal LM loss (computed
from the model's logits; HF's last hidden state already has the final norm applied, which is why exits are
captured with hooks on the decoder layers rather than taken from `output_hidden_states`). Layer L-1 is always
among the exits, whatever the slice or curriculum says.

Loss: total = sum_l s_l * CE_l over the active exits, with s_l = w_l * e(l) / sum_k w_k * e(k), where
e(l) = e_scale for early exits (l < L-1) and 1 for the last layer, and w_l is the loss scale
(`EarlyExitLossScaleType`, with d = l + 1 the 1-based depth):

    one         w = 1
    l           w = d
    sum_l       w = d (d + 1) / 2  = 1 + 2 + ... + d    (the LayerSkip paper's e(l); torchtune takes a cumsum
                                                          over the active ids instead, which depends on the set)
    sqrt_l      w = sqrt(d)
    inv_l       w = 1 / d
    inv_sqrt_l  w = 1 / sqrt(d)

The weights sum to 1, so with only the last layer active the loss is exactly the LM loss.

Curricula (`EarlyExitCurriculumType`), pure functions of the optimizer step t (so resuming needs only t):

    none        the selected layers at every step.
    rotational  the selection mask rotates one layer deeper per step, wrapping around (torchtune's
                np.roll(mask, 1) each step): layer l is active at step t iff the mask had l' = (l - t) mod L.
                With `0::4` on 8 layers: t=0 -> {0, 4}, t=1 -> {1, 5}, ... period L.
    gradual     layers switch on from the deepest down: selected layer l is active once
                t / max_steps >= fraction * (L - l) / L (torchtune's rule, fraction 0.5 by default), so every
                selected layer is on from t = fraction * max_steps.

In every curriculum the last layer is active at every step.
"""
from __future__ import annotations

import contextlib
import math
from enum import Enum
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from skiplayer.errors import UserError, parse_enum

IGNORE_INDEX = -100


class EarlyExitLossScaleType(str, Enum):
    ONE = "one"
    L = "l"
    SUM_L = "sum_l"
    SQRT_L = "sqrt_l"
    INV_L = "inv_l"
    INV_SQRT_L = "inv_sqrt_l"


class EarlyExitCurriculumType(str, Enum):
    NONE = "none"
    ROTATIONAL = "rotational"
    GRADUAL = "gradual"


def parse_loss_scale(name: str | EarlyExitLossScaleType) -> EarlyExitLossScaleType:
    return parse_enum(EarlyExitLossScaleType, name, "early-exit loss scale", "--early_exit_loss_scale")


def parse_curriculum(name: str | EarlyExitCurriculumType) -> EarlyExitCurriculumType:
    name = "rotational" if name == "rot" else name  # torchtune's spelling
    return parse_enum(EarlyExitCurriculumType, name, "early-exit curriculum", "--early_exit_curriculum")


def parse_layers(spec: str | Sequence[int] | None, n_layers: int, include_last: bool = True) -> list[int]:
    """Layer indices chosen by `spec` among range(n_layers), sorted, with the last layer added when
    `include_last`. `spec`: a Python-slice string over the layer list (`0::4`, `2:`, `::-1`, `1:7:2`),
    a comma list (`0,4,-1`), one index (`5`), an explicit list of ints, or None/""/"none" (no early exit)."""
    def bad(why: str) -> UserError:
        return UserError(f"bad early-exit layer spec '{spec}' for a {n_layers}-layer model ({why}): use a slice "
                         f"like 0::4, a comma list like 0,4,8 or an index in [-{n_layers}, {n_layers - 1}] "
                         f"with --early_exit_loss_layers")

    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        chosen: list[int] = []
    elif isinstance(spec, str):
        text = spec.strip()
        try:
            if ":" in text:
                if "," in text:
                    raise bad("mixes ':' and ','")
                parts = text.split(":")
                if len(parts) > 3:
                    raise bad("too many ':'")
                values = [int(p) if p.strip() else None for p in parts]
                if len(values) == 3 and values[2] == 0:
                    raise bad("slice step 0")
                chosen = list(range(n_layers))[slice(*values)]
                if not chosen:
                    raise bad("the slice selects no layer")
            else:
                chosen = [int(p) for p in text.split(",")]
        except ValueError:
            raise bad("not an integer") from None
    else:
        chosen = [int(x) for x in spec]
    out = set()
    for index in chosen:
        if not -n_layers <= index < n_layers:
            raise bad(f"layer {index} is out of range")
        out.add(index % n_layers)
    if include_last:
        out.add(n_layers - 1)
    return sorted(out)


def loss_scale_weight(scale: str | EarlyExitLossScaleType, layer: int) -> float:
    """The unnormalised weight w_l of exit `layer` (0-based); formulas in the module docstring."""
    scale = parse_loss_scale(scale)
    d = layer + 1.0
    return {
        EarlyExitLossScaleType.ONE: 1.0,
        EarlyExitLossScaleType.L: d,
        EarlyExitLossScaleType.SUM_L: d * (d + 1.0) / 2.0,
        EarlyExitLossScaleType.SQRT_L: math.sqrt(d),
        EarlyExitLossScaleType.INV_L: 1.0 / d,
        EarlyExitLossScaleType.INV_SQRT_L: 1.0 / math.sqrt(d),
    }[scale]


def loss_scales(layers: Sequence[int], n_layers: int, scale: str | EarlyExitLossScaleType = "sum_l",
                e_scale: float = 1.0) -> dict[int, float]:
    """Normalised mixing weights s_l (sum 1) for the active exits `layers`; early exits get an extra `e_scale`."""
    raw = {l: loss_scale_weight(scale, l) * (1.0 if l == n_layers - 1 else e_scale) for l in layers}
    total = sum(raw.values())
    if total <= 0:
        raise UserError(f"early-exit loss weights sum to {total}: use --early_exit_e_scale > 0 "
                        f"or include the last layer")
    return {l: w / total for l, w in raw.items()}


class EarlyExitCurriculum:
    """Which exits get a loss at optimizer step t (see the module docstring). `active(t)` is a pure function."""

    def __init__(self, selected: Sequence[int], n_layers: int, kind: str | EarlyExitCurriculumType = "none",
                 max_steps: int = 1, fraction: float = 0.5):
        self.kind = parse_curriculum(kind)
        self.n_layers = n_layers
        self.selected = sorted(set(int(l) for l in selected))
        self.max_steps = max(int(max_steps), 1)
        self.fraction = fraction

    def active(self, step: int) -> list[int]:
        L = self.n_layers
        if self.kind is EarlyExitCurriculumType.NONE:
            layers = set(self.selected)
        elif self.kind is EarlyExitCurriculumType.ROTATIONAL:
            layers = {(l + step) % L for l in self.selected}
        else:
            done = step / self.max_steps
            layers = {l for l in self.selected if done >= self.fraction * (L - l) / L}
        layers.add(L - 1)
        return sorted(layers)


# ---------------------------------------------------------------------------------------------- model access

def model_parts(model) -> tuple[torch.nn.ModuleList, torch.nn.Module, torch.nn.Module]:
    """(decoder layers, final norm, LM head) of an HF Llama-family causal LM, also when wrapped by peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    norm = getattr(inner, "norm", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if layers is None or norm is None or head is None:
        raise UserError(f"model {type(base).__name__} has no model.layers / model.norm / lm_head: "
                        f"train a Llama-family causal LM")
    return layers, norm, head


@contextlib.contextmanager
def capture_layer_outputs(layers: Sequence[torch.nn.Module], wanted: Iterable[int]):
    """Within the block, `captured[l]` holds the output hidden state of decoder layer l (l in `wanted`) from
    the latest forward; hooks see the output after layer dropout (a dropped layer passes its input)."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for l in sorted(set(wanted)):
        def hook(module, args, output, l=l):
            captured[l] = output[0] if isinstance(output, tuple) else output
        handles.append(layers[l].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over positions whose (shifted) label is not IGNORE_INDEX. labels [B, T]
    are aligned with the inputs; logits [*E, B, T, V] may carry extra leading dims (stacked exits), giving one
    loss per leading index (shape [*E]; a scalar for plain [B, T, V] logits)."""
    extra = logits.dim() - 1 - labels.dim()
    logits = logits[..., :-1, :]
    target = labels[..., 1:].expand(*logits.shape[:-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
    dims = tuple(range(extra, target.dim()))
    count = (target != IGNORE_INDEX).sum(dims).clamp_min(1)
    return loss.sum(dims) / count


def exit_losses(hidden: dict[int, torch.Tensor], final_logits: torch.Tensor, labels: torch.Tensor,
                norm: torch.nn.Module, head: torch.nn.Module, n_layers: int) -> dict[int, torch.Tensor]:
    """CE loss per exit: the last layer from the model's logits, every other exit l from head(norm(h_l))."""
    losses: dict[int, torch.Tensor] = {}
    early = [l for l in sorted(hidden) if l != n_layers - 1]
    if early:
        stacked = torch.stack([hidden[l] for l in early])  # [E, B, T, D]
        logits = head(norm(stacked))
        per = shifted_ce(logits, labels)  # [E]
        losses.update({l: per[i] for i, l in enumerate(early)})
    losses[n_layers - 1] = shifted_ce(final_logits, labels)
    return losses


def early_exit_loss(losses: dict[int, torch.Tensor], n_layers: int, scale: str = "sum_l",
                    e_scale: float = 1.0) -> torch.Tensor:
    """sum_l s_l * CE_l with the normalised scales of `loss_scales` over the exits present in `losses`."""
    weights = loss_scales(sorted(losses), n_layers, scale, e_scale)
    return sum(weights[l] * losses[l] for l in sorted(losses))


@torch.no_grad()
def exit_logits(model, input_ids: torch.Tensor, layers: Iterable[int],
                attention_mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Logits of each exit in `layers` (final norm + head on that layer's output); the last layer's are the
    model's logits. Runs one forward in the model's current mode (call `model.eval()` first to disable dropout)."""
    decoder_layers, norm, head = model_parts(model)
    n = len(decoder_layers)
    layers = sorted({l % n for l in layers})
    with capture_layer_outputs(decoder_layers, [l for l in layers if l != n - 1]) as captured:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return {l: (out.logits if l == n - 1 else head(norm(captured[l]))) for l in layers}


@torch.no_grad()
def exit_agreement(model, input_ids: torch.Tensor, layer: int, attention_mask: torch.Tensor | None = None) -> float:
    """Fraction of positions where exit `layer`'s top-1 token equals the final layer's (masked positions skipped)."""
    n = len(model_parts(model)[0])
    logits = exit_logits(model, input_ids, [layer, n - 1], attention_mask)
    same = logits[layer % n].argmax(-1) == logits[n - 1].argmax(-1)
    if attention_mask is not None:
        return float(same[attention_mask.bool()].float().mean())
    return float(same.float().mean())
