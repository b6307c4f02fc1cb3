"""Draft calibration by self-distillation (`skiplayer calibrate`).

1. The model generates its own greedy outputs for a set of prompts, several prompts decoding together
   (decoding/batched.py: the weights are read once per step for all of them, so tokens come several times faster
   than one prompt at a time), within a share of the time budget. Prompts are split into train / held-out
   beforehand (`CalibrationPrompt.held_out`).
2. While it generates, it keeps the hidden state that leaves layer E-1 for every exit layer E and the last layer's
   output at every position that predicts an output token (and, optionally, the last few prompt positions): the
   same rows as teacher-forcing prompt + output through the model once more (`teacher_force`, kept as the
   reference), without paying for that second pass, and computed exactly as drafting computes them.
3. The draft vocabulary is the `draft_vocab_size` most frequent tokens of the training outputs (EOS ids always
   in); verification still scores the full vocabulary, so decoding stays lossless.
4. Per exit layer, a residual adapter h + W_up·silu(W_down·rmsnorm(h)) (zero-initialised up-projection: it starts as
   the plain exit) in front of the frozen final norm and the frozen head rows of the draft vocabulary is trained
   to match the full model: KL(full || draft) over the draft vocabulary (`loss="kl"`) or cross-entropy to the full
   model's argmax (`loss="ce"`).
5. Top-1 agreement with the full model on the held-out prompts' outputs, before (plain exit, full vocabulary) and
   after (adapter + draft vocabulary), per exit layer: the `acceptance` the artifact records.

Measured on SmolLM2-135M-Instruct (fp32, shared 2-core CPU; held-out top-1 agreement on ~1.3-1.6k output positions,
so differences under ~0.02 are noise), with ~6.5k own output tokens from the default mix:
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
Not done: draft forms other than the residual adapter -- fine-tuned copies of the shallow layers (MEASURED.md: 0.27 at
layer 12 from 9k own tokens, but they need their own KV cache, so the draft no longer shares the verifier's) and
one-layer attention adapters.

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

from skiplayer.decoding.batched import generate_batched
from skiplayer.decoding.stopping import StopCriteria
from skiplayer.draft_artifact import ResidualAdapter
from skiplayer.errors import UserError, check
from skiplayer.model.llama import Transformer

LOSSES = ("kl", "ce")
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
    adapter_rank: int = 256
    budget_minutes: float = 15.0
    generation_share: float = 0.75        # of the budget, for generating (and capturing) the model's outputs
    generation_batch: int = 8             # prompts decoding together while generating
    loss: str = "kl"
    prompt_positions: int = 128           # also train on the last N prompt positions of each training prompt
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
        check(self.prompt_positions >= 0, "--prompt_positions must be >= 0")
        check(self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0, "--epochs, --batch_size, --lr must be > 0")
        check(0 <= self.val_fraction < 1, "--val_fraction must be in [0, 1)")
        return self


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
        return "\n".join(lines)


def _bar(total, desc, enabled, unit="it"):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, unit=unit, leave=True, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------ 1+2. generation

def generate_and_capture(model: Transformer, prompts: list[CalibrationPrompt], exit_layers: list[int],
                         eos_token_ids, tokenizer, deadline: float, prompt_positions: int = 0,
                         progress: bool = True, batch_size: int = 8) -> tuple[list[Sequence], Captured]:
    """The model's own greedy outputs, `batch_size` prompts decoding together (decoding/batched.py), taking prompts
    in the given order until `deadline` (time.monotonic), and the hidden states of every position that predicts an
    output token (plus the last `prompt_positions` prompt positions): rows leaving layer E-1 for each exit E, and
    the last layer's; sequences in the order they finished."""
    exits = sorted(exit_layers)
    keys = [*exits, model.n_layers]
    sequences: list[Sequence] = []
    parts = {k: [] for k in keys}
    targets, seqs, is_out = [], [], []
    tokens = 0

    def make_stop(i: int) -> StopCriteria:
        p = prompts[i]
        return StopCriteria(p.max_steps, eos_token_ids, list(p.stop_words) if tokenizer else [], tokenizer)

    bar = _bar(len(prompts), "generating outputs", progress, "prompt")
    finished = generate_batched(model, [p.ids for p in prompts], make_stop, batch_size, tuple(keys),
                                prompt_positions + 1, admit=lambda: time.monotonic() < deadline or not sequences)
    for done in finished:
        out = done.tokens
        rows = {k: torch.cat(v) for k, v in done.rows.items()}
        n_rows = len(rows[model.n_layers])
        n_prompt_rows = n_rows - len(out)  # prompt rows before the one that predicts out[0]
        assert n_prompt_rows >= 0 and all(len(v) == n_rows for v in rows.values()), "capture out of step"
        s_index = len(sequences)
        sequences.append(Sequence(prompts[done.index], list(out)))
        for k in keys:
            parts[k].append(rows[k])
        target = torch.full((n_rows,), -1, dtype=torch.long)
        target[n_prompt_rows:] = torch.tensor(out, dtype=torch.long)
        targets.append(target)
        seqs.append(torch.full((n_rows,), s_index, dtype=torch.long))
        is_out.append(torch.arange(n_rows) >= n_prompt_rows)
        tokens += len(out)
        bar.update(1)
        bar.set_postfix(tokens=tokens, left=f"{max(0.0, deadline - time.monotonic()):.0f}s")
    bar.close()
    check(tokens > 0, "calibration produced no output tokens: check the prompts and --max_steps")
    final = torch.cat(parts[model.n_layers])
    target = torch.cat(targets)
    prompt_rows = target < 0
    if bool(prompt_rows.any()):  # prompt positions: the full model's argmax there
        target[prompt_rows] = draft_top1(model, final[prompt_rows])  # the full head
    data = Captured({e: torch.cat(parts[e]) for e in exits}, final, target, torch.cat(seqs), torch.cat(is_out))
    return sequences, data


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


def agreement(model, hidden, target, adapter=None, vocab_ids=None) -> float:
    if len(target) == 0:
        return float("nan")
    return float((draft_top1(model, hidden, adapter, vocab_ids) == target).float().mean())


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


def train_adapter(model: Transformer, data: Captured, exit_layer: int, vocab_ids: torch.Tensor | None,
                  config: CalibrationConfig, deadline: float, val: Captured | None = None,
                  targets: torch.Tensor | None = None) -> tuple[ResidualAdapter, list[dict]]:
    """Self-distil one adapter for `exit_layer` until `config.epochs` or `deadline`; with `val`, keep the epoch
    with the best validation agreement. `targets`: target_logprobs(model, data.final, vocab_ids), if computed."""
    torch.manual_seed(config.seed * 1000 + exit_layer)
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
    steps_per_epoch = max(1, math.ceil(n / config.batch_size))
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
        perm = torch.randperm(n, generator=generator)
        total_loss = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * config.batch_size:(b + 1) * config.batch_size]
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, planned * steps_per_epoch, config.lr)
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
        record = {"epoch": epoch, "loss": total_loss / n, "seconds": time.monotonic() - t0}
        if val is not None and len(val):
            record["val_agreement"] = agreement(model, val.hidden[exit_layer], val.target, adapter, vocab_ids)
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

def calibrate(model: Transformer, prompts: list[CalibrationPrompt], config: CalibrationConfig, eos_token_ids=(),
              tokenizer=None, started: float | None = None) -> CalibrationResult:
    """Generate, capture, choose the vocabulary, train one adapter per exit layer, measure on held-out prompts."""
    config.validate(model.n_layers)
    started = time.monotonic() if started is None else started
    budget = config.budget_minutes * 60.0
    check(any(p.held_out for p in prompts) and any(not p.held_out for p in prompts),
          "calibration needs both training and held-out prompts: use more prompts (--num_prompts)")
    timings: dict[str, float] = {}

    t = time.monotonic()
    sequences, data = generate_and_capture(model, prompts, config.exit_layers, eos_token_ids, tokenizer,
                                           started + config.generation_share * budget, config.prompt_positions,
                                           config.progress, config.generation_batch)
    timings["generate"] = time.monotonic() - t
    held = [s for s in sequences if s.prompt.held_out]
    if not held or len(held) == len(sequences):
        raise UserError(f"the budget allowed only {len(sequences)} prompt(s), not enough for both training and "
                        f"held-out outputs: raise --budget_minutes or lower --max_steps")
    held_mask = torch.tensor([sequences[int(i)].prompt.held_out for i in data.seq], dtype=torch.bool)
    test = data.select(held_mask & data.is_output)
    train = data.select(~held_mask)
    val = None
    train_seq_ids = sorted({int(i) for i in train.seq})
    if config.val_fraction > 0 and len(train_seq_ids) >= 4:
        every = max(2, round(1 / config.val_fraction))
        val_seqs = torch.tensor(train_seq_ids[every // 2::every])
        in_val = torch.isin(train.seq, val_seqs)
        val = train.select(in_val & train.is_output)
        train = train.select(~in_val)

    train_outputs = [t for s in sequences if not s.prompt.held_out for t in s.output]
    train_prompt_tokens = [t for s in sequences if not s.prompt.held_out for t in s.prompt.ids]
    always = list(eos_token_ids)
    vocab_ids = select_vocab(train_outputs, config.draft_vocab_size, model.args.vocab_size, always,
                             train_prompt_tokens)

    adapters: dict[int, ResidualAdapter] = {}
    history: dict[int, list[dict]] = {}
    t = time.monotonic()
    layers = sorted(config.exit_layers)
    reserve = 0.02 * budget + 5.0  # measuring and saving
    targets = target_logprobs(model, train.final, vocab_ids) if config.loss == "kl" else None
    for i, e in enumerate(layers):
        remaining = started + budget - reserve - time.monotonic()
        deadline = time.monotonic() + max(0.0, remaining) / (len(layers) - i)
        adapters[e], history[e] = train_adapter(model, train, e, vocab_ids, config, deadline, val, targets)
    timings["train"] = time.monotonic() - t

    t = time.monotonic()
    before = {e: agreement(model, test.hidden[e], test.target) for e in layers}
    before_vocab = {e: agreement(model, test.hidden[e], test.target, None, vocab_ids) for e in layers}
    after = {e: agreement(model, test.hidden[e], test.target, adapters[e], vocab_ids) for e in layers}
    coverage = 1.0 if vocab_ids is None else float(torch.isin(test.target, vocab_ids).float().mean())
    by_dataset = {}
    names = [sequences[int(i)].prompt.dataset for i in test.seq]
    for name in sorted(set(names)):
        rows = torch.tensor([n == name for n in names], dtype=torch.bool)
        part = test.select(rows)
        by_dataset[name] = {"positions": len(part), **{e: agreement(model, part.hidden[e], part.target, adapters[e],
                                                                     vocab_ids) for e in layers}}
    timings["measure"] = time.monotonic() - t
    timings["total"] = time.monotonic() - started
    counts = {"prompts_available": len(prompts), "prompts_generated": len(sequences),
              "train_sequences": len(sequences) - len(held), "held_out_sequences": len(held),
              "output_tokens": sum(len(s.output) for s in sequences),
              "train_positions": len(train), "train_output_positions": int(train.is_output.sum()),
              "val_positions": 0 if val is None else len(val), "held_out_positions": len(test),
              "by_dataset": dict(Counter(s.prompt.dataset for s in sequences))}
    return CalibrationResult(adapters, vocab_ids, before, before_vocab, after, coverage, by_dataset, counts, timings,
                             history)
