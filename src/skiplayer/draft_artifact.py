"""Calibrated draft artifacts (`skiplayer calibrate --output A`, `--draft A`).

A directory holding
  draft.safetensors  `layers.<E>.down.weight` (rank, dim) and `layers.<E>.up.weight` (dim, rank) per exit layer E,
                     and `vocab_ids` (int64, ascending full-vocabulary ids) when the draft scores a reduced vocabulary;
  draft.json         what it was calibrated for and what was measured: model name and fingerprint, exit layers,
                     adapter form and rank, vocabulary size, held-out agreement before/after per layer (`acceptance`
                     = after), calibration time, data, command line;
  ngrams.safetensors (optional) an n-gram table of the model's calibration outputs (drafts/ngram.py: n-gram ->
                     the token that most often followed it), `ngrams.<n>.keys` (m, n) and `ngrams.<n>.next` (m,).

The adapter of layer E maps the hidden state leaving layer E-1 (before the final norm) to a corrected one:
h + W_up·silu(W_down·rmsnorm(h)). The model's own frozen final norm and head (rows `vocab_ids`) follow it, and
verification always uses the full head, so decoding with a draft stays lossless.

Form `attention` (the default of `skiplayer calibrate`) puts one attention layer in front of that MLP, in the
style of Kangaroo: h + W_o·attention(rmsnorm(h)) over the states at exit E of every earlier position, with its own
K/V (`layers.<E>.attention_norm.weight`, `layers.<E>.wqkv.weight`, `layers.<E>.wo.weight`, shaped like the
model's attention; it starts as a copy of layer E's).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from skiplayer.errors import UserError

if TYPE_CHECKING:
    from skiplayer.drafts.ngram import NGramTable

FORMAT = "skiplayer-draft"
VERSION = 1
FORMS = ("residual_mlp", "attention")
WEIGHTS_FILE = "draft.safetensors"
META_FILE = "draft.json"
NGRAMS_FILE = "ngrams.safetensors"


class ResidualAdapter(nn.Module):
    """h + up(silu(down(rmsnorm(h)))); `up` starts at zero, so a fresh adapter is the plain early exit."""

    native: bool = False  # draft steps through the native norm and products (use_kernels_of): 5 ops, not 11

    def __init__(self, dim: int, rank: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.rank, self.eps = dim, rank, eps
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)
        self.unit = torch.ones(dim)  # the native norm's weight (this norm has none): fp32, not a buffer .to() casts

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.native and h.dim() == 2:  # fp32 x whatever the weights' float dtype, fp32 sums
            # a draft step's one row: ~0.06-0.08 ms less a step in situ (Zen 5); the same function to fp32 rounding
            ops = torch.ops.skiplayer
            x = ops.rms_norm(h.float(), self.unit, self.eps)
            delta = ops.small_linear(F.silu(ops.small_linear(x, self.down.weight, None, None, True, False)),
                                     self.up.weight, None, None, True, False)
            return h + delta.to(h.dtype)
        x = h.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(self.down.weight.dtype)
        delta = F.linear(F.silu(F.linear(x, self.down.weight)), self.up.weight)
        return h + delta.to(h.dtype)


class AttentionAdapter(nn.Module):
    """mlp(h + wo·attention(norm(h))): a one-layer attention draft head whose K/V live in an extra slot of the KV
    cache (Transformer.new_cache(extra_layers=)). `forward` decodes a block at `start`, `forward_batch` trains on
    whole right-padded sequences; both compute the same function (tested)."""

    def __init__(self, args, rank: int):
        from skiplayer.model.llama import Attention, RMSNorm
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        # a plain (Llama) attention layer whatever the model: Gemma's q/k norms are left to training
        self.attention = Attention(dataclasses.replace(args, qk_norm=False))
        self.mlp = ResidualAdapter(args.dim, rank)

    @property
    def rank(self) -> int:
        return self.mlp.rank

    def forward(self, h: torch.Tensor, cos, sin, cache, slot: int, start: int) -> torch.Tensor:
        return self.mlp(h + self.attention(self.attention_norm(h), cos, sin, cache, slot, start))

    def write_kv(self, h: torch.Tensor, cos, sin, cache, slot: int, start: int) -> None:
        self.attention.write_kv(self.attention_norm(h), cos, sin, cache, slot, start)

    def forward_batch(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """h (B, T, dim), causal attention within each row (right padding never reaches real positions)."""
        from skiplayer.model.llama import apply_rope
        attention = self.attention
        qkv = F.linear(self.attention_norm(h), attention.wqkv.weight, attention.wqkv.bias)
        q, k, v = attention.split(qkv, cos, sin)
        o = F.scaled_dot_product_attention(apply_rope(q, cos, sin), k, v, is_causal=True, enable_gqa=True)
        return self.mlp(h + F.linear(o.transpose(1, 2).flatten(-2), attention.wo.weight))


def attention_adapter_from_layer(model, layer: int, rank: int) -> AttentionAdapter:
    """A float32 attention adapter starting as a copy of `layer`'s attention (row-major weights) and a zero MLP."""
    block = model.layers[layer]
    adapter = AttentionAdapter(model.args, rank)
    with torch.no_grad():
        adapter.attention_norm.weight.copy_(block.attention_norm.weight.float())
        for name in ("wqkv", "wo"):
            src, dst = getattr(block.attention, name), getattr(adapter.attention, name)
            dst.weight.copy_(src.row_major_weight().float())
            if src.bias is not None:
                dst.bias.copy_(src.bias.float())
    return adapter


# Artifact tensor name (after "layers.<E>.") -> the adapter's parameter name, per form.
_MLP_NAMES = {"down.weight": "down.weight", "up.weight": "up.weight"}
_ATTENTION_NAMES = {"down.weight": "mlp.down.weight", "up.weight": "mlp.up.weight",
                    "attention_norm.weight": "attention_norm.weight", "wqkv.weight": "attention.wqkv.weight",
                    "wqkv.bias": "attention.wqkv.bias", "wo.weight": "attention.wo.weight"}


def _tensor_names(adapter: nn.Module) -> dict[str, str]:
    return _ATTENTION_NAMES if isinstance(adapter, AttentionAdapter) else _MLP_NAMES


def adapter_tensors(e: int, adapter: nn.Module) -> dict[str, torch.Tensor]:
    """The artifact's tensors for exit layer e (float32, CPU)."""
    params = dict(adapter.named_parameters())
    return {f"layers.{e}.{name}": params[p].detach().float().cpu().contiguous()
            for name, p in _tensor_names(adapter).items() if p in params}


def use_kernels_of(module: nn.Module, model) -> nn.Module:
    """Give an adapter's layers the model's kernel choice (native or stock, see model/optimize.py); its weights
    stay row-major."""
    from skiplayer.model.llama import Attention, Linear, RMSNorm
    for mod in module.modules():
        if isinstance(mod, Linear):
            mod.native_rows = model.native_rows
        elif isinstance(mod, (RMSNorm, ResidualAdapter)):
            mod.native = model.norm.native
        elif isinstance(mod, Attention):
            mod.native = model.layers[0].attention.native
    return module


@dataclass
class Draft:
    """What the engine reads (`generate_ids(..., draft=)`): adapters per exit layer, the reduced vocabulary
    (None = full vocabulary) and the acceptance measured at calibration (exit layer -> agreement)."""
    vocab_ids: torch.Tensor | None
    adapters: dict[int, nn.Module]
    acceptance: dict[int, float]
    exit_layers: list[int]
    meta: dict = field(default_factory=dict)
    ngrams: "NGramTable | None" = None  # what the model wrote in calibration, for n-gram drafting

    def summary(self) -> str:
        vocab = "full vocabulary" if self.vocab_ids is None else f"{len(self.vocab_ids)}-token vocabulary"
        acc = ", ".join(f"E{e}: {a:.2f}" for e, a in sorted(self.acceptance.items()))
        table = f", {len(self.ngrams)}-entry n-gram table" if self.ngrams is not None else ""
        return f"draft for exit layers {self.exit_layers}, {vocab}{table}, calibrated acceptance {acc}"


def check_output_dir(path: str | Path) -> Path:
    """`path` as a Path, if an artifact directory can go there (a one-line UserError otherwise)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--output {path} exists and is not a directory: pick a new path for the draft artifact")
    return path


def save_ngrams(path: str | Path, ngrams: "NGramTable") -> None:
    """Write (or replace) the artifact's n-gram table."""
    from safetensors.torch import save_file
    save_file(ngrams.to_tensors(), str(Path(path) / NGRAMS_FILE), metadata={"format": FORMAT})


def save_draft(path: str | Path, adapters: dict[int, ResidualAdapter], vocab_ids: torch.Tensor | None,
               meta: dict, ngrams: "NGramTable | None" = None) -> Path:
    """Write the artifact directory (created if needed). `meta` must hold at least `fingerprint`."""
    from safetensors.torch import save_file

    path = check_output_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for e, adapter in sorted(adapters.items()):
        tensors |= adapter_tensors(e, adapter)
    if vocab_ids is not None:
        tensors["vocab_ids"] = vocab_ids.detach().to(torch.int64).cpu().contiguous()
    ranks = {a.rank for a in adapters.values()}
    attention = any(isinstance(a, AttentionAdapter) for a in adapters.values())
    full = {"format": FORMAT, "version": VERSION, "form": "attention" if attention else "residual_mlp",
            "adapter_rank": ranks.pop() if len(ranks) == 1 else None,
            "exit_layers": sorted(int(e) for e in adapters),
            "draft_vocab_size": None if vocab_ids is None else int(len(vocab_ids)), **meta}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": FORMAT, "version": str(VERSION)})
    if ngrams is not None:
        save_ngrams(path, ngrams)
    write_meta(path, full)
    return path


def write_meta(path: str | Path, meta: dict) -> None:
    """Write (or replace) the artifact's draft.json."""
    (Path(path) / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n")


def read_meta(path: Path) -> dict:
    """The checked draft.json of artifact directory `path` (a one-line UserError if missing, corrupt or foreign)."""
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise UserError(f"draft {path}: {META_FILE} is missing; pass a directory written by skiplayer calibrate "
                        f"--output (or recalibrate)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"draft {path}: {META_FILE} is corrupt ({' '.join(str(e).split())}); recalibrate with "
                        f"skiplayer calibrate") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"draft {path}: {META_FILE} is not a skiplayer draft description; recalibrate with "
                        f"skiplayer calibrate")
    if meta.get("version") != VERSION or meta.get("form") not in FORMS:
        raise UserError(f"draft {path}: unsupported draft version/form ({meta.get('version')}, {meta.get('form')}); "
                        f"recalibrate with this skiplayer's calibrate command")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"draft {path}: {WEIGHTS_FILE} is missing; recalibrate with skiplayer calibrate")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"draft {path}: {WEIGHTS_FILE} is corrupt ({' '.join(str(e).split())[:160]}); "
                        f"recalibrate with skiplayer calibrate") from None


def _artifact_dir(path: str | Path) -> Path:
    """The artifact directory for `path` (the directory or one of its two files)."""
    path = Path(path)
    if path.is_file() and path.name in (META_FILE, WEIGHTS_FILE):
        path = path.parent
    if not path.is_dir():
        raise UserError(f"draft {path} not found: pass the directory written by skiplayer calibrate --output")
    return path


def calibrate_command(path: str | Path) -> str | None:
    """The `skiplayer calibrate` command recorded in artifact `path`; None when it cannot be read."""
    try:
        return read_meta(_artifact_dir(path)).get("command")
    except UserError:
        return None


def load_draft(path: str | Path, loaded) -> Draft:
    """Load artifact `path` for `loaded` (a LoadedModel): adapters in the model's dtype and device. A draft
    calibrated for other weights, or missing/corrupt files, raise a one-line UserError."""
    path = _artifact_dir(path)
    meta = read_meta(path)
    model = loaded.model
    if meta.get("fingerprint") != loaded.fingerprint:
        dtype = str(loaded.dtype).replace("torch.", "")
        raise UserError(f"draft {path} was calibrated for model {meta.get('model')} (fingerprint "
                        f"{meta.get('fingerprint')}, {meta.get('dtype')}), not {loaded.name} (fingerprint "
                        f"{loaded.fingerprint}, {dtype}): recalibrate with skiplayer calibrate --model {loaded.name} "
                        f"--dtype {dtype} --output DIR")
    tensors = _read_tensors(path)
    w = model.tok_embeddings.weight
    dim, vocab, n_layers = model.args.dim, model.args.vocab_size, model.n_layers
    try:
        exit_layers = sorted(int(e) for e in meta.get("exit_layers", []))
    except (TypeError, ValueError):
        raise UserError(f"draft {path}: bad exit_layers in {META_FILE}; recalibrate with skiplayer calibrate") from None
    adapters: dict[int, nn.Module] = {}
    for e in exit_layers:
        down, up = tensors.get(f"layers.{e}.down.weight"), tensors.get(f"layers.{e}.up.weight")
        if down is None or up is None:
            raise UserError(f"draft {path}: adapter weights for exit layer {e} are missing from {WEIGHTS_FILE}; "
                            f"recalibrate with skiplayer calibrate")
        rank = down.shape[0]
        if not (1 <= e < n_layers) or down.shape != (rank, dim) or up.shape != (dim, rank):
            raise UserError(f"draft {path}: adapter for exit layer {e} does not fit this model "
                            f"({n_layers} layers, hidden size {dim}); recalibrate with skiplayer calibrate")
        attention = f"layers.{e}.wqkv.weight" in tensors
        adapter = AttentionAdapter(model.args, rank) if attention else ResidualAdapter(dim, rank)
        state = {p: tensors[f"layers.{e}.{name}"] for name, p in _tensor_names(adapter).items()
                 if f"layers.{e}.{name}" in tensors}
        try:
            adapter.load_state_dict(state)
        except RuntimeError:
            raise UserError(f"draft {path}: the adapter for exit layer {e} does not fit this model; recalibrate "
                            f"with skiplayer calibrate") from None
        adapter = adapter.to(dtype=w.dtype, device=w.device).eval().requires_grad_(False)
        adapters[e] = use_kernels_of(adapter, model)
    vocab_ids = tensors.get("vocab_ids")
    if vocab_ids is not None:
        vocab_ids = vocab_ids.to(torch.long)
        if vocab_ids.dim() != 1 or len(vocab_ids) == 0 or int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= vocab:
            raise UserError(f"draft {path}: vocab_ids do not fit this model's {vocab}-token vocabulary; "
                            f"recalibrate with skiplayer calibrate")
        vocab_ids = vocab_ids.to(w.device)
    try:
        acceptance = {int(e): float(a) for e, a in (meta.get("acceptance") or {}).items()}
    except (TypeError, ValueError, AttributeError):
        raise UserError(f"draft {path}: bad acceptance in {META_FILE}; recalibrate with skiplayer calibrate") from None
    return Draft(vocab_ids, adapters, acceptance, exit_layers, meta, _read_ngrams(path, vocab))


def _read_ngrams(path: Path, vocab: int) -> "NGramTable | None":
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from skiplayer.drafts.ngram import NGramTable
    file = path / NGRAMS_FILE
    if not file.is_file():
        return None
    try:
        tensors = load_file(str(file))
        table = NGramTable.from_tensors(tensors)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"draft {path}: {NGRAMS_FILE} is corrupt ({' '.join(str(e).split())[:160]}); delete it "
                        f"(drafting then uses prompt lookup only) or recalibrate") from None
    if any(int(t.min()) < 0 or int(t.max()) >= vocab for t in tensors.values() if t.numel()):
        raise UserError(f"draft {path}: {NGRAMS_FILE} holds token ids outside this model's {vocab}-token vocabulary; "
                        f"delete it or recalibrate")
    return table


BUILTIN_DIR = Path(__file__).resolve().parent / "drafts_builtin"


def builtin_draft_path(model_name: str) -> Path | None:
    """The draft shipped in the package for a model alias (e.g. smollm2-135m), if there is one."""
    if not model_name or Path(model_name).name != model_name:  # an alias, not a path or hub id
        return None
    path = BUILTIN_DIR / model_name
    return path if (path / META_FILE).is_file() and (path / WEIGHTS_FILE).is_file() else None


def resolve_draft(spec: str | None, loaded, say=None) -> Draft | None:
    """`--draft`: a calibrated artifact directory; "none" for no draft; unset: the built-in draft of the model when
    the package ships one for these exact weights (said in one line on stderr, via `say`)."""
    import sys

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    if spec is not None:
        return None if spec == "none" else load_draft(spec, loaded)
    path = builtin_draft_path(getattr(loaded, "name", ""))
    if path is None:
        return None
    if read_meta(path).get("fingerprint") != loaded.fingerprint:
        say(f"[skiplayer] the built-in draft for {loaded.name} fits other weights ({read_meta(path).get('dtype')});"
            f" not used (pass --draft DIR to use a draft of yours)")
        return None
    draft = load_draft(path, loaded)
    say(f"[skiplayer] using the built-in draft for {loaded.name} (exit layers {draft.exit_layers}; --draft none "
        f"turns it off)")
    return draft
