"""Draft calibration by self-distillation (`skiplayer calibrate`).

1. The model generates its own greedy outputs for a set of prompts, several prompts decoding together
   (decoding/batched.py: the weights are read once per step for all of them, so tokens come several times faster
   than one prompt at a time), within a share of the time budget. Prompts are split into train / held-out
   beforehand (`CalibrationPrompt.held_out`).
2. While it generates, it keeps the hidden state that leaves layer E-1 for every exit layer E and the last layer's
   output at every position that predicts an output token (and the last few prompt positions, or all of them for
   an attention adapter): the same rows as teacher-forcing prompt + output through the model once more
   (`teacher_force`, kept as the reference), without paying for that second pass, and computed exactly as
   drafting computes them. Finished outputs and their rows go to disk as they finish (capture_store.py): an
   interrupted run keeps them, and a rerun reuses them and only generates for prompts not answered yet.
3. The draft vocabulary is the `draft_vocab_size` most frequent tokens of the training outputs (EOS ids always
   in); verification still scores the full vocabulary, so decoding stays lossless.
4. Per exit layer, an adapter in front of the frozen final norm and the frozen head rows of the draft vocabulary is
   trained to match the full model: KL(full || draft) over the draft vocabulary (`loss="kl"`) or cross-entropy to
   the full model's argmax (`loss="ce"`). Form "attention" (default, Kangaroo-style): one attention layer over the
   exit states of all earlier positions (started as a copy of layer E's attention; in decoding it keeps its own
   K/V), then the residual MLP; trained on whole sequences. Form "mlp": the residual MLP
   h + W_up·silu(W_down·rmsnorm(h)) alone (zero-initialised up-projection: it starts as the plain exit), trained
   on rows.
5. Top-1 agreement with the full model on the held-out prompts' outputs, before (plain exit, full vocabulary) and
   after (adapter + draft vocabulary), per exit layer: the `acceptance` the artifact records.

Measured on SmolLM2-135M-Instruct (held-out top-1 agreement):
  - form, on the same 79k own output tokens of 839 prompts (float16, E4, 4 epochs, batches of whole sequences up to
    512 rows; a throwaway script over these functions, 16k held-out positions): mlp 0.373, attention 0.421 (gsm8k
    0.395 -> 0.435, HumanEval 0.366 -> 0.451, mbpp 0.459 -> 0.518, cnn_dm 0.210 -> 0.222, Alpaca 0.174 -> 0.222).
    Reading the earlier positions helps most where outputs copy from them (code, arithmetic). It costs one
    attention layer per draft (~0.9M weights, a quarter of a decoder layer) and training ~1.5x as long per epoch.
  - what the attention layer reads for earlier positions (51.7k own output tokens of 500 prompts, 3 epochs, 15.8k
    held-out positions of 150 prompts, fp32 training path, throwaway script): their exit-E states (the form here)
    0.412; the full model's last-layer states instead (EAGLE-like: free for verified positions, as verification
    computes them) 0.386, 0.385 with a norm of their own; both 0.411. The shallow states are what helps.
Earlier, with the mlp form (fp32, shared 2-core CPU; ~1.3-1.6k held-out output positions, so differences under
~0.02 are noise), with ~6.5k own output tokens from the default mix:
  - loss: KL beats CE to the argmax (output rows only, rank 256, 8k vocab): E6 0.252 vs 0.229, E8 0.275 vs 0.259,
    E12 0.289 vs 0.276.
  - rank: 64 -> 0.219 / 0.229 / 0.247 (E6/E8/E12); 256 -> 0.252 / 0.275 / 0.289; 512 no better than 256 (0.257 E6,
    0.321 E12 with prompt rows, where 256 gave 0.26 / 0.322). The adapters overfit (training agreement 0.5-0.65):
    more of the model's own outputs is the lever, not a bigger adapter.
  - prompt rows: the last 128 prompt positions of each prompt (free: captured during the prefill) add 0.01-0.03
    (E12 0.289 -> 0.322; 32 positions: 0.303) for ~2x the training rows: the default.
  - draft vocabulary: 8k / 16k / full cover 0.89 / 0.97 / 1.0 of the held-out targets but give the same or lower
    agreement (E12 0.322 / 0.321 / 0.276; full trains ~6x slower and got only 4 epochs in its time), so 8k is the
    default: the tokens it drops are ones the draft rarely gets right anyway.
  - lr 1e-3 / 2e-3 / 4e-3: 0.281 / 0.289 / 0.300 (E8); weight decay 0.1: no change.
  - the datasets' reference answers, teacher-forced (4x cheaper per token than generating), add nothing: 20k own
    output tokens gave E4 0.300 / E8 0.326 held-out; adding 70k reference-answer tokens of other rows of the same
    datasets gave E4 0.303 (float16, 4 epochs). The model's own outputs are what count, hence batched generation.
Not done: fine-tuned copies of the shallow layers (MEASURED.md: 0.27 at layer 12 from 9k own tokens, but they need
their own KV cache for all E layers, so the draft no longer shares the verifier's).

Everything runs on a fixed seed; only the time budget can cut work short (generation stops taking new prompts,
training plans fewer epochs), so a generous budget makes calibration deterministic.
"""
from __future__ import annotations

import copy
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from skiplayer.decoding.batched import generate_batched
from skiplayer.decoding.stopping import StopCriteria
from skiplayer.draft_artifact import AttentionAdapter, ResidualAdapter, attention_adapter_from_layer, use_kernels_of
from skiplayer.drafts.ngram import NGramTable
from skiplayer.errors import UserError, check
from skiplayer.model.kv_cache import KVCache
from skiplayer.model.llama import Transformer
from skiplayer.train.capture_store import CaptureStore, prompt_key

LOSSES = ("kl", "ce")
ADAPTER_FORMS = ("attention", "mlp")
CAPTURE_BLOCK = 256  # teacher-forcing block: keeps the attention mask small for long prompts


@dataclass
class CalibrationPrompt:
    ids: list[int]
    dataset: str = ""
    id: str = ""
    max_steps: int = 128
    stop_words: list[str] = field(default_factory=list)
    held_out: bool = False


@dataclass
class CalibrationConfig:
    exit_layers: list[int]
    draft_vocab_size: int = 8192          # 0 (or >= vocab) = full vocabulary
    adapter_form: str = "attention"       # "mlp": the residual MLP alone (draft_artifact.py)
    adapter_rank: int = 256
    budget_minutes: float = 15.0
    generation_share: float = 0.75        # of the budget, for generating (and capturing) the model's outputs
    generation_batch: int = 8             # prompts decoding together while generating
    loss: str = "kl"
    prompt_positions: int = 128           # also train on the last N prompt positions of each training prompt
    capture_prompt_positions: int = 0     # capture at least this many prompt rows (saved data made with more)
    epochs: int = 12                      # at most; fewer when the budget runs short
    batch_size: int = 128
    lr: float = 4e-3
    weight_decay: float = 0.0
    val_fraction: float = 0.0             # share of training sequences kept aside to pick the best epoch
    seed: int = 0
    progress: bool = True

    def validate(self, n_layers: int) -> "CalibrationConfig":
        check(len(self.exit_layers) > 0, "--exit_layers needs at least one layer, e.g. --exit_layers 8,12")
        for e in self.exit_layers:
            check(1 <= e < n_layers, f"--exit_layers: {e} is not in 1..{n_layers - 1} (the model has {n_layers} layers)")
        check(len(set(self.exit_layers)) == len(self.exit_layers), "--exit_layers lists a layer twice")
        check(self.adapter_rank >= 1, f"--adapter_rank must be >= 1 (got {self.adapter_rank})")
        check(self.draft_vocab_size >= 0, f"--draft_vocab_size must be >= 0 (got {self.draft_vocab_size}; 0 = full)")
        check(self.budget_minutes > 0, f"--budget_minutes must be > 0 (got {self.budget_minutes})")
        check(0 < self.generation_share < 1, "--generation_share must be between 0 and 1")
        check(self.generation_batch >= 1, f"--generation_batch must be >= 1 (got {self.generation_batch})")
        check(self.loss in LOSSES, f"unknown --loss '{self.loss}': use one of {', '.join(LOSSES)}")
        check(self.adapter_form in ADAPTER_FORMS,
              f"unknown --adapter_form '{self.adapter_form}': use one of {', '.join(ADAPTER_FORMS)}")
        check(self.val_fraction == 0 or self.adapter_form == "mlp", "--val_fraction works with --adapter_form mlp")
        check(self.prompt_positions >= 0, "--prompt_positions must be >= 0")
        check(self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0, "--epochs, --batch_size, --lr must be > 0")
        check(0 <= self.val_fraction < 1, "--val_fraction must be in [0, 1)")
        return self

    def captured_prompt_positions(self, model: Transformer) -> int:
        """Prompt rows to capture: an attention adapter reads every earlier position, an MLP adapter only trains on
        the last `prompt_positions`."""
        needed = model.max_seq_len if self.adapter_form == "attention" else self.prompt_positions
        return max(needed, self.capture_prompt_positions)


@dataclass
class Sequence:
    prompt: CalibrationPrompt
    output: list[int]


@dataclass
class Captured:
    """Per captured position (rows): hidden states entering each exit (model dtype), the last layer's output, the
    full model's argmax, the sequence index and whether the position predicts an output token."""
    hidden: dict[int, torch.Tensor]
    final: torch.Tensor
    target: torch.Tensor
    seq: torch.Tensor
    is_output: torch.Tensor

    def select(self, mask: torch.Tensor) -> "Captured":
        return Captured({e: h[mask] for e, h in self.hidden.items()}, self.final[mask], self.target[mask],
                        self.seq[mask], self.is_output[mask])

    def __len__(self) -> int:
        return len(self.target)


@dataclass
class CalibrationResult:
    adapters: dict[int, ResidualAdapter]      # fp32, CPU
    vocab_ids: torch.Tensor | None
    before: dict[int, float]                  # held-out agreement: plain exit, full vocabulary
    before_vocab: dict[int, float]            # plain exit, draft vocabulary
    after: dict[int, float]                   # adapter + draft vocabulary
    coverage: float                           # held-out targets inside the draft vocabulary
    by_dataset: dict[str, dict]               # held-out: dataset -> {"positions": n, E: agreement after}
    counts: dict                              # prompts / tokens / positions used
    timings: dict                             # seconds per phase
    history: dict[int, list[dict]]            # per layer, per epoch: loss, val agreement, seconds
    ngrams: NGramTable | None = None          # n-gram table of the training outputs
    ngram_report: dict | None = None          # NGramTable.held_out_report on the held-out outputs

    def table(self) -> str:
        lines = [f"{'exit':>4}  {'plain exit':>10}  {'exit+vocab':>10}  {'calibrated':>10}  {'gain':>6}",
                 f"{'':>4}  {'(full voc)':>10}  {'(no adapt)':>10}  {'(adapter)':>10}  {'':>6}"]
        for e in sorted(self.after):
            lines.append(f"{e:>4}  {self.before[e]:>10.3f}  {self.before_vocab[e]:>10.3f}  {self.after[e]:>10.3f}  "
                         f"{self.after[e] - self.before[e]:>+6.3f}")
        for name, row in sorted(self.by_dataset.items()):
            lines.append(f"  {name}: {row['positions']} positions, calibrated " +
                         ", ".join(f"E{e} {a:.3f}" for e, a in row.items() if e != "positions"))
        lines.append(f"held-out: {self.counts['held_out_positions']} output positions of "
                     f"{self.counts['held_out_sequences']} prompts; draft vocabulary covers {self.coverage:.3f} of "
                     f"the full model's tokens there")
        if self.ngram_report:
            lines.append(ngram_summary(self.ngram_report))
        return "\n".join(lines)


def ngram_summary(report: dict) -> str:
    return (f"n-gram table: {report['entries']} entries; where prompt lookup has no match ("
            f"{report['unmatched_positions']} of {report['positions']} held-out positions) it names a token at "
            f"{report['named']:.3f} of them, the model's next token at {report['next_token_right']:.3f} of those")


def ngram_table(sequences: list[Sequence], max_ngram: int = 3) -> tuple[NGramTable, dict]:
    """The n-gram table of the training outputs, and how it does on the held-out ones."""
    table = NGramTable.build([(s.prompt.ids, s.output) for s in sequences if not s.prompt.held_out], max_ngram)
    report = table.held_out_report([(s.prompt.ids, s.output) for s in sequences if s.prompt.held_out], max_ngram)
    return table, {"entries": len(table), "max_ngram": max_ngram, **report}


def _bar(total, desc, enabled, unit="it"):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, unit=unit, leave=True, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------ 1+2. generation

def generate_and_capture(model: Transformer, prompts: list[CalibrationPrompt], exit_layers: list[int],
                         eos_token_ids, tokenizer, deadline: float, prompt_positions: int = 0,
                         progress: bool = True, batch_size: int = 8, store: CaptureStore | None = None
                         ) -> tuple[list[Sequence], Captured]:
    """The model's own greedy outputs, `batch_size` prompts decoding together (decoding/batched.py), taking prompts
    in the given order until `deadline` (time.monotonic), and the hidden states of every position that predicts an
    output token (plus the last `prompt_positions` prompt positions): rows leaving layer E-1 for each exit E, and
    the last layer's. With a `store`, prompts it already holds are not generated again (their sequences come
    first, in prompt order; then the new ones in the order they finished) and new ones are saved to it."""
    exits = sorted(exit_layers)
    layers = (*exits, model.n_layers)  # captured: rows entering each exit, and the last layer's output
    keys = [str(k) for k in layers]    # their names in the rows (and on disk)

    def key(p: CalibrationPrompt) -> str:
        return prompt_key(p.ids, p.max_steps, list(p.stop_words) if tokenizer else [])

    def make_stop(i: int) -> StopCriteria:
        p = todo[i]
        return StopCriteria(p.max_steps, eos_token_ids, list(p.stop_words) if tokenizer else [], tokenizer)

    saved = store.load() if store is not None else {}
    done_list: list[tuple[CalibrationPrompt, list[int], dict[str, torch.Tensor]]] = []
    todo = []
    for p in prompts:
        hit = saved.get(key(p))
        if hit is not None:
            done_list.append((p, *hit))
        else:
            todo.append(p)
    tokens = sum(len(out) for _, out, _ in done_list)
    bar = _bar(len(prompts), "generating outputs", progress, "prompt")
    bar.update(len(done_list))
    finished = generate_batched(model, [p.ids for p in todo], make_stop, batch_size, layers,
                                prompt_positions + 1, admit=lambda: time.monotonic() < deadline or not done_list)
    try:
        for done in finished:
            out, p = list(done.tokens), todo[done.index]
            rows = {str(k): torch.cat(v) for k, v in done.rows.items()}
            n_rows = len(rows[keys[-1]])
            assert n_rows >= len(out) and all(len(v) == n_rows for v in rows.values()), "capture out of step"
            rows["is_output"] = torch.arange(n_rows) >= n_rows - len(out)  # prompt rows precede out[0]'s
            done_list.append((p, out, rows))
            if store is not None:
                store.add(key(p), out, rows)
            tokens += len(out)
            bar.update(1)
            bar.set_postfix(tokens=tokens, left=f"{max(0.0, deadline - time.monotonic()):.0f}s")
    finally:  # also on Ctrl-C: what finished stays on disk
        if store is not None:
            store.flush()
    bar.close()
    check(tokens > 0, "calibration produced no output tokens: check the prompts and --max_steps")
    sequences = [Sequence(p, out) for p, out, _ in done_list]
    is_out = torch.cat([rows["is_output"] for _, _, rows in done_list])
    final = torch.cat([rows[keys[-1]] for _, _, rows in done_list])
    target = torch.full((len(final),), -1, dtype=torch.long)
    target[is_out] = torch.tensor([t for _, out, _ in done_list for t in out], dtype=torch.long)
    prompt_rows = ~is_out
    if bool(prompt_rows.any()):  # prompt positions: the full model's argmax there
        target[prompt_rows] = draft_top1(model, final[prompt_rows])  # the full head
    seq = torch.cat([torch.full((len(rows["is_output"]),), i, dtype=torch.long)
                     for i, (_, _, rows) in enumerate(done_list)])
    hidden = {e: torch.cat([rows[str(e)] for _, _, rows in done_list]) for e in exits}
    return sequences, Captured(hidden, final, target, seq, is_out)


@torch.inference_mode()
def teacher_force(model: Transformer, sequences: list[Sequence], exit_layers: list[int], prompt_positions: int = 0
                  ) -> Captured:
    """The same rows as generate_and_capture, by running prompt + output through the model again in blocks
    (a reference for tests, and for outputs that were not generated here)."""
    exits = sorted(exit_layers)
    device = model.tok_embeddings.weight.device
    hidden = {e: [] for e in exits}
    finals, seqs, is_out = [], [], []
    for s_index, s in enumerate(sequences):
        ids = list(s.prompt.ids) + list(s.output)
        n_prompt = len(s.prompt.ids)
        first, last = max(0, n_prompt - 1 - prompt_positions), len(ids) - 1  # position i predicts token i+1
        cache = model.new_cache(len(ids))
        for start in range(0, last, CAPTURE_BLOCK):
            end = min(last, start + CAPTURE_BLOCK)
            h = model.embed(torch.tensor(ids[start:end], device=device))
            lo = min(max(first, start), end) - start  # no rows kept in a block wholly before `first`
            layer = 0
            for e in exits:
                h = model.forward_layers(h, start, cache, layer, e)
                layer = e
                hidden[e].append(h[lo:].cpu())
            h = model.forward_layers(h, start, cache, layer, model.n_layers)
            finals.append(h[lo:].cpu())
            positions = torch.arange(start + lo, end)
            seqs.append(torch.full((len(positions),), s_index, dtype=torch.long))
            is_out.append(positions >= n_prompt - 1)
    final = torch.cat(finals)
    return Captured({e: torch.cat(v) for e, v in hidden.items()}, final, draft_top1(model, final), torch.cat(seqs),
                    torch.cat(is_out))


# ------------------------------------------------------------------------------------------------ 3. vocabulary

def select_vocab(output_tokens: list[int], size: int, vocab_size: int, always=(), fallback: list[int] = ()
                 ) -> torch.Tensor | None:
    """The `size` most frequent output tokens (ties: lower id first), `always` ids first; then frequent `fallback`
    (prompt) tokens, then the lowest ids. None = full vocabulary."""
    if size <= 0 or size >= vocab_size:
        return None
    chosen: dict[int, None] = {int(t): None for t in always if 0 <= int(t) < vocab_size}
    for source in (output_tokens, fallback):
        for t, _ in sorted(Counter(int(t) for t in source).items(), key=lambda kv: (-kv[1], kv[0])):
            if len(chosen) >= size:
                break
            chosen.setdefault(t, None)
    t = 0
    while len(chosen) < size:
        chosen.setdefault(t, None)
        t += 1
    return torch.tensor(sorted(list(chosen)[:size]), dtype=torch.long)


# ------------------------------------------------------------------------------------------------ 4. training

class _Head32:
    """Frozen final norm + head rows in fp32, for training (the model may be half precision)."""

    def __init__(self, model: Transformer, vocab_ids: torch.Tensor | None):
        w = model.head_rows(None if vocab_ids is None else vocab_ids.to(model.head_weight.device))
        self.weight = w.detach().float().cpu()
        self.norm = model.norm.weight.detach().float().cpu()
        self.eps = model.norm.eps

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return F.linear(self.norm * x, self.weight)


def _lr_at(step: int, total: int, base: float, warmup: int = 20) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@torch.inference_mode()
def draft_top1(model: Transformer, hidden: torch.Tensor, adapter=None, vocab_ids: torch.Tensor | None = None,
               chunk: int = 512) -> torch.Tensor:
    """Full-vocabulary ids the draft head (adapter, final norm, head rows `vocab_ids`) picks, on the model's own
    dtype/device path (as DraftHead runs it)."""
    w = model.tok_embeddings.weight
    weight = None if vocab_ids is None else model.head_rows(vocab_ids.to(w.device)).contiguous()
    if adapter is not None:
        p = next(adapter.parameters())
        if p.dtype != w.dtype or p.device != w.device:  # a copy: Module.to would convert the trained one in place
            adapter = copy.deepcopy(adapter).to(dtype=w.dtype, device=w.device)
    out = []
    for i in range(0, len(hidden), chunk):
        h = hidden[i:i + chunk].to(dtype=w.dtype, device=w.device)
        if adapter is not None:
            h = adapter(h)
        idx = model.logits(h, weight).argmax(-1).cpu()
        out.append(idx if vocab_ids is None else vocab_ids.cpu()[idx])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@torch.inference_mode()
def attention_top1(model: Transformer, data: Captured, exit_layer: int, adapter: AttentionAdapter,
                   vocab_ids: torch.Tensor | None) -> torch.Tensor:
    """draft_top1 of an attention adapter for every row of `data` (whole sequences from their first position):
    each sequence runs through the adapter as one block on its own cache, in the model's dtype and kernels."""
    w = model.tok_embeddings.weight
    weight = None if vocab_ids is None else model.head_rows(vocab_ids.to(w.device)).contiguous()
    adapter = use_kernels_of(copy.deepcopy(adapter).to(dtype=w.dtype, device=w.device), model)
    out = torch.zeros(len(data), dtype=torch.long)
    for s in torch.unique(data.seq).tolist():
        rows = torch.nonzero(data.seq == s).squeeze(1)
        cache = KVCache(1, model.args.n_kv_heads, model.args.head_dim, len(rows), w.dtype, w.device)
        h = adapter(data.hidden[exit_layer][rows].to(dtype=w.dtype, device=w.device), *model.rope(0, len(rows)),
                    cache, 0, 0)
        idx = model.logits(h, weight).argmax(-1).cpu()
        out[rows] = idx if vocab_ids is None else vocab_ids.cpu()[idx]
    return out


def agreement(model, data: Captured, exit_layer: int, rows: torch.Tensor, adapter=None, vocab_ids=None) -> float:
    """Top-1 agreement of the draft with the full model on `rows` (a mask) of `data`."""
    if not bool(rows.any()):
        return float("nan")
    if isinstance(adapter, AttentionAdapter):
        top1 = attention_top1(model, data, exit_layer, adapter, vocab_ids)[rows]
    else:
        top1 = draft_top1(model, data.hidden[exit_layer][rows], adapter, vocab_ids)
    return float((top1 == data.target[rows]).float().mean())


TARGET_CACHE_BYTES = 1.5e9  # full-model log-probabilities over the draft vocabulary are kept when they fit


@torch.no_grad()
def target_logprobs(model: Transformer, final: torch.Tensor, vocab_ids: torch.Tensor | None,
                    chunk: int = 1024) -> torch.Tensor | None:
    """The full model's log-probabilities restricted to (and renormalised over) the draft vocabulary, as fp16, for
    every row: the KL targets of every exit layer, computed once. None when they would not fit in memory."""
    n_vocab = model.args.vocab_size if vocab_ids is None else len(vocab_ids)
    if len(final) * n_vocab * 2 > TARGET_CACHE_BYTES:
        return None
    head = _Head32(model, vocab_ids)
    return torch.cat([torch.log_softmax(head(final[i:i + chunk].float()), -1).half()
                      for i in range(0, len(final), chunk)])


SEQUENCE_BATCH_ROWS = 512  # attention adapters train on whole sequences, packed up to this many rows per batch


def _sequence_batches(data: Captured, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Sequence ids grouped (by length) into batches of about SEQUENCE_BATCH_ROWS padded rows, shuffled."""
    ids, counts = torch.unique_consecutive(data.seq, return_counts=True)
    batches, group, longest = [], [], 0
    for i in torch.argsort(counts, stable=True).tolist():
        n = int(counts[i])
        if group and max(longest, n) * (len(group) + 1) > SEQUENCE_BATCH_ROWS:
            batches.append(torch.tensor(group))
            group, longest = [], 0
        group.append(int(ids[i]))
        longest = max(longest, n)
    if group:
        batches.append(torch.tensor(group))
    order = torch.randperm(len(batches), generator=generator).tolist() if generator is not None else range(len(batches))
    return [batches[j] for j in order]


def _padded(X: torch.Tensor, seq: torch.Tensor, seq_ids: torch.Tensor, loss_rows: torch.Tensor):
    """(B, T, dim) states X of whole sequences from position 0, right-padded; the mask of their loss rows in that
    layout and those rows' indices in X, in the same order."""
    rows = [torch.nonzero(seq == s).squeeze(1) for s in seq_ids.tolist()]
    T = max(len(r) for r in rows)
    H = torch.zeros(len(rows), T, X.shape[1])
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        H[b, :len(r)] = X[r]
        mask[b, :len(r)] = loss_rows[r]
    return H, mask, torch.cat([r[loss_rows[r]] for r in rows])


def train_adapter(model: Transformer, data: Captured, exit_layer: int, vocab_ids: torch.Tensor | None,
                  config: CalibrationConfig, deadline: float, val: Captured | None = None,
                  targets: torch.Tensor | None = None, loss_rows: torch.Tensor | None = None
                  ) -> tuple[nn.Module, list[dict]]:
    """Self-distil one adapter for `exit_layer` until `config.epochs` or `deadline`; with `val`, keep the epoch
    with the best validation agreement. `targets`: target_logprobs(model, data.final, vocab_ids), if computed.
    An MLP adapter trains on rows (all of `data`); an attention adapter on whole sequences (`data` holds every
    position of each, from the first), with the loss on `loss_rows`."""
    torch.manual_seed(config.seed * 1000 + exit_layer)
    attention = config.adapter_form == "attention"
    if attention:
        adapter = attention_adapter_from_layer(model, exit_layer, config.adapter_rank)
        rope = model.rope_cos.float(), model.rope_sin.float()
    else:
        adapter = ResidualAdapter(model.args.dim, config.adapter_rank)
    head = _Head32(model, vocab_ids)
    X = data.hidden[exit_layer].float()
    final = data.final.float()
    target_index = data.target.clone()
    if vocab_ids is not None:  # full id -> draft-vocabulary index (-100: not in the draft vocabulary)
        lookup = torch.full((model.args.vocab_size,), -100, dtype=torch.long)
        lookup[vocab_ids] = torch.arange(len(vocab_ids))
        target_index = lookup[target_index]
    n = len(X)
    steps_per_epoch = len(_sequence_batches(data, None)) if attention else max(1, math.ceil(n / config.batch_size))
    planned = config.epochs
    opt = torch.optim.AdamW(adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed * 1000 + exit_layer)
    history, best, best_state = [], -1.0, None
    step = 0
    bar = _bar(planned * steps_per_epoch, f"training E={exit_layer}", config.progress, "batch")
    t_start = time.monotonic()
    epoch = 0
    while epoch < planned:
        t0 = time.monotonic()
        if attention:
            batches = _sequence_batches(data, generator)
        else:
            perm = torch.randperm(n, generator=generator)
            batches = [perm[b * config.batch_size:(b + 1) * config.batch_size] for b in range(steps_per_epoch)]
        total_loss = 0.0
        for batch in batches:
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, planned * steps_per_epoch, config.lr)
            if attention:
                H, mask, idx = _padded(X, data.seq, batch, loss_rows)
                T = H.shape[1]
                logits = head(adapter.forward_batch(H, rope[0][:T], rope[1][:T])[mask])
            else:
                idx = batch
                logits = head(adapter(X[idx]))
            if config.loss == "kl":
                with torch.no_grad():
                    p_log = targets[idx].float() if targets is not None else torch.log_softmax(head(final[idx]), -1)
                loss = F.kl_div(torch.log_softmax(logits, -1), p_log, log_target=True, reduction="batchmean")
            else:
                t = target_index[idx]
                if bool((t < 0).all()):
                    step += 1
                    continue
                loss = F.cross_entropy(logits, t, ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(idx)
            step += 1
            bar.update(1)
        epoch += 1
        record = {"epoch": epoch, "loss": total_loss / (int(loss_rows.sum()) if attention else n),
                  "seconds": time.monotonic() - t0}
        if val is not None and len(val):
            record["val_agreement"] = agreement(model, val, exit_layer, val.is_output, adapter, vocab_ids)
            if record["val_agreement"] > best:
                best = record["val_agreement"]
                best_state = {k: v.clone() for k, v in adapter.state_dict().items()}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", **({"val": f"{record['val_agreement']:.3f}"}
                                                          if "val_agreement" in record else {}))
        if epoch == 1 and planned > 1:
            # Plan the cosine schedule once the first epoch's cost is known.
            per_epoch = (time.monotonic() - t_start) / epoch
            fit = int((deadline - t_start) / max(per_epoch, 1e-6))
            new_plan = max(1, min(config.epochs, fit))
            if new_plan != planned:
                planned = new_plan
                bar.total = planned * steps_per_epoch
                bar.refresh()
        if time.monotonic() >= deadline:
            break
    bar.close()
    if best_state is not None:
        adapter.load_state_dict(best_state)
    return adapter.eval().requires_grad_(False), history


# ------------------------------------------------------------------------------------------------ all steps

def loss_rows(data: Captured, prompt_positions: int) -> torch.Tensor:
    """Rows trained on: every output row and the last `prompt_positions` prompt rows of each sequence (rows of a
    sequence are contiguous, prompt rows first)."""
    _, counts = torch.unique_consecutive(data.seq, return_counts=True)
    seg = torch.repeat_interleave(torch.arange(len(counts)), counts)
    index = torch.arange(len(data)) - (torch.cumsum(counts, 0) - counts)[seg]
    n_prompt = torch.zeros(len(counts), dtype=torch.long).index_add_(0, seg, (~data.is_output).long())
    return data.is_output | (index >= n_prompt[seg] - prompt_positions)


def calibrate(model: Transformer, prompts: list[CalibrationPrompt], config: CalibrationConfig, eos_token_ids=(),
              tokenizer=None, started: float | None = None, store: CaptureStore | None = None
              ) -> CalibrationResult:
    """Generate, capture, choose the vocabulary, train one adapter per exit layer, measure on held-out prompts.
    `store`: saved outputs to reuse, and where new ones are saved (see generate_and_capture)."""
    config.validate(model.n_layers)
    started = time.monotonic() if started is None else started
    budget = config.budget_minutes * 60.0
    check(any(p.held_out for p in prompts) and any(not p.held_out for p in prompts),
          "calibration needs both training and held-out prompts: use more prompts (--num_prompts)")
    timings: dict[str, float] = {}

    t = time.monotonic()
    sequences, data = generate_and_capture(model, prompts, config.exit_layers, eos_token_ids, tokenizer,
                                           started + config.generation_share * budget,
                                           config.captured_prompt_positions(model), config.progress,
                                           config.generation_batch, store)
    timings["generate"] = time.monotonic() - t
    held = [s for s in sequences if s.prompt.held_out]
    if not held or len(held) == len(sequences):
        raise UserError(f"the budget allowed only {len(sequences)} prompt(s), not enough for both training and "
                        f"held-out outputs: raise --budget_minutes or lower --max_steps")
    held_mask = torch.tensor([sequences[int(i)].prompt.held_out for i in data.seq], dtype=torch.bool)
    test = data.select(held_mask)  # measured on its output rows (an attention adapter reads the others)
    loss = loss_rows(data, config.prompt_positions)
    in_train = ~held_mask & (loss | (config.adapter_form == "attention"))  # attention reads every earlier row
    train, train_loss = data.select(in_train), loss[in_train]
    val = None
    train_seq_ids = sorted({int(i) for i in train.seq})
    if config.val_fraction > 0 and len(train_seq_ids) >= 4:
        every = max(2, round(1 / config.val_fraction))
        val_seqs = torch.tensor(train_seq_ids[every // 2::every])
        in_val = torch.isin(train.seq, val_seqs)
        val = train.select(in_val & train.is_output)
        train, train_loss = train.select(~in_val), train_loss[~in_val]

    train_outputs = [t for s in sequences if not s.prompt.held_out for t in s.output]
    train_prompt_tokens = [t for s in sequences if not s.prompt.held_out for t in s.prompt.ids]
    always = list(eos_token_ids)
    vocab_ids = select_vocab(train_outputs, config.draft_vocab_size, model.args.vocab_size, always,
                             train_prompt_tokens)

    adapters: dict[int, nn.Module] = {}
    history: dict[int, list[dict]] = {}
    t = time.monotonic()
    layers = sorted(config.exit_layers)
    reserve = 0.02 * budget + 5.0  # measuring and saving
    targets = target_logprobs(model, train.final, vocab_ids) if config.loss == "kl" else None
    for i, e in enumerate(layers):
        remaining = started + budget - reserve - time.monotonic()
        deadline = time.monotonic() + max(0.0, remaining) / (len(layers) - i)
        adapters[e], history[e] = train_adapter(model, train, e, vocab_ids, config, deadline, val, targets,
                                                train_loss)
    timings["train"] = time.monotonic() - t

    t = time.monotonic()
    out = test.is_output
    before = {e: agreement(model, test, e, out) for e in layers}
    before_vocab = {e: agreement(model, test, e, out, None, vocab_ids) for e in layers}
    after = {e: agreement(model, test, e, out, adapters[e], vocab_ids) for e in layers}
    coverage = 1.0 if vocab_ids is None else float(torch.isin(test.target[out], vocab_ids).float().mean())
    by_dataset = {}
    names = [sequences[int(i)].prompt.dataset for i in test.seq]
    for name in sorted(set(names)):
        part = test.select(torch.tensor([n == name for n in names], dtype=torch.bool))
        by_dataset[name] = {"positions": int(part.is_output.sum()),
                            **{e: agreement(model, part, e, part.is_output, adapters[e], vocab_ids) for e in layers}}
    ngrams, ngram_report = ngram_table(sequences)
    timings["measure"] = time.monotonic() - t
    timings["total"] = time.monotonic() - started
    counts = {"prompts_available": len(prompts), "prompts_generated": len(sequences),
              "train_sequences": len(sequences) - len(held), "held_out_sequences": len(held),
              "output_tokens": sum(len(s.output) for s in sequences),
              "train_positions": int(train_loss.sum()), "train_output_positions": int(train.is_output.sum()),
              "val_positions": 0 if val is None else len(val), "held_out_positions": int(out.sum()),
              "by_dataset": dict(Counter(s.prompt.dataset for s in sequences))}
    return CalibrationResult(adapters, vocab_ids, before, before_vocab, after, coverage, by_dataset, counts, timings,
                             history, ngrams, ngram_report)
