"""`skiplayer train`: the LayerSkip training recipe (layer dropout + early-exit loss) on an HF Llama-family
causal LM, in plain PyTorch.

One optimizer step = `gradient_accumulation_steps` micro-batches of `batch_size` sequences of at most `seq_len`
tokens. Data: a plain text file (tokenised once, cut into `seq_len`-token blocks, every token trained) or a
JSONL file with `prompt_field` / `response_field` (the prompt goes through the model's chat template when it has
one; the loss covers only the response tokens + EOS). The order of examples is a pure function of the seed and the
micro-batch index (a fresh permutation per epoch), so resuming needs only the step.

Output layout under `output_dir`:
    checkpoint-STEP/    HF directory (`save_pretrained` + tokenizer; with LoRA: the peft adapter) plus
                        trainer_state.json (step, losses, config) and training_state.pt (optimizer, scheduler, RNG)
    final/              HF directory (LoRA merged in), loadable with `--model output_dir/final`
    train_log.jsonl     one JSON line per optimizer step: step, loss, lr, per-exit losses, seconds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from skiplayer.errors import UserError
from skiplayer.train.early_exit_loss import (
    IGNORE_INDEX, EarlyExitCurriculum, capture_layer_outputs, early_exit_loss, exit_losses, model_parts,
    parse_curriculum, parse_layers, parse_loss_scale,
)
from skiplayer.train.layer_dropout import LayerDropout, layer_dropout_probs, parse_scale

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATE_JSON = "trainer_state.json"
STATE_PT = "training_state.pt"
LOG_NAME = "train_log.jsonl"


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"
    data_path: str = ""
    prompt_field: str | None = None
    response_field: str | None = None
    output_dir: str = "runs/train"
    max_steps: int = 100
    batch_size: int = 4
    seq_len: int = 512
    gradient_accumulation_steps: int = 1
    lr: float = 2e-5
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    layer_dropout_prob_max: float = 0.1
    layer_dropout_scale: str = "exp"
    layer_dropout_disable_below: int = 0
    layer_dropout_per_batch: bool = False
    early_exit_loss_layers: str | None = "0::4"
    early_exit_loss_scale: str = "sum_l"
    early_exit_e_scale: float = 1.0
    early_exit_curriculum: str = "none"
    early_exit_gradual_fraction: float = 0.5
    lora_rank: int = 0
    lora_alpha: float | None = None
    save_steps: int = 0
    resume: str | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    no_chat_template: bool = False
    progress: bool = True
    num_threads: int = 0


# ---------------------------------------------------------------------------------------------------- model

def hf_dir_for(model_arg: str) -> str:
    """The HF directory (or local hub id) for a `--model` value: alias / .gguf go through the project's
    conversion cache (~/.cache/skiplayer); anything else is returned as is."""
    from skiplayer.model.load import _convert_gguf, resolve_model_path

    path = resolve_model_path(model_arg)
    if path.endswith(".gguf"):
        if not Path(path).exists():
            raise UserError(f"GGUF file '{path}' not found: check the path given to --model")
        path = str(_convert_gguf(Path(path)))
    return path


def _load(path: str, dtype: torch.dtype):
    from skiplayer.model.load import load_hf
    return load_hf(path, dtype)


def _lora_targets(model) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    wanted = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return [n for n in wanted if n in names]


def _apply_lora(model, cfg: TrainConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("--lora_rank needs the package peft: pip install peft") from None
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=0.0,
                        target_modules=_lora_targets(model), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------------------------------- data

class Dataset:
    """Fixed list of examples (input ids + labels) with the stateless sampler `micro_batch(k)`."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], pad_id: int, seed: int, batch_size: int):
        self.examples = examples
        self.pad_id = pad_id
        self.seed = seed
        self.batch_size = batch_size
        self._perms: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def _order(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.examples))
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self._perms[epoch][offset]

    def micro_batch(self, k: int) -> dict[str, torch.Tensor]:
        """Micro-batch k: examples k*B .. k*B+B-1 of the epoch-wise shuffled stream, right-padded to the
        longest; `attention_mask` is None when nothing is padded."""
        rows = [self.examples[self._order(k * self.batch_size + i)] for i in range(self.batch_size)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (x, y) in enumerate(rows):
            ids[r, :len(x)] = torch.tensor(x)
            labels[r, :len(y)] = torch.tensor(y)
            mask[r, :len(x)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": None if bool(mask.all()) else mask}


def _tokenize_text(tokenizer, text: str, piece_chars: int = 200_000) -> list[int]:
    out: list[int] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + piece_chars)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        out.extend(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        start = end
    return out


def text_examples(path: Path, tokenizer, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """A text corpus cut into consecutive `seq_len`-token blocks (the tail shorter than a block is dropped)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    tokens = _tokenize_text(tokenizer, text)
    n = len(tokens) // seq_len
    if n == 0:
        raise UserError(f"{path} has {len(tokens)} tokens, fewer than one block of --seq_len {seq_len}: "
                        f"use more text or a smaller --seq_len")
    blocks = [tokens[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    return [(b, list(b)) for b in blocks]


def _as_ids(x) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return [int(i) for i in x]


def encode_pair(tokenizer, prompt: str, response: str, seq_len: int,
                use_chat_template: bool = True) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one prompt/response pair; labels are IGNORE_INDEX on the prompt. Over-long pairs
    keep at least min(len(response), seq_len // 2) response tokens and cut the prompt from the left."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        p = _as_ids(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, tokenize=True))
    else:
        p = _as_ids(tokenizer(prompt + "\n", add_special_tokens=True))
    r = _as_ids(tokenizer(response, add_special_tokens=False))
    if tokenizer.eos_token_id is not None:
        r.append(int(tokenizer.eos_token_id))
    if len(p) + len(r) > seq_len:
        keep_r = max(seq_len - len(p), min(len(r), seq_len // 2))
        r = r[:keep_r]
        p = p[len(p) - (seq_len - len(r)):] if seq_len > len(r) else []
    return p + r, [IGNORE_INDEX] * len(p) + r


def jsonl_examples(path: Path, tokenizer, seq_len: int, prompt_field: str, response_field: str,
                   use_chat_template: bool = True) -> list[tuple[list[int], list[int]]]:
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {n} is not valid JSON: fix or remove that line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {n} is not a JSON object: each line must be an object with "
                                f"'{prompt_field}' and '{response_field}'")
            for name, flag in ((prompt_field, "--prompt_field"), (response_field, "--response_field")):
                if name not in row:
                    raise UserError(f"{path} line {n} has no field '{name}' (it has {', '.join(map(str, row))}): "
                                    f"pass the right name with {flag}")
            out.append(encode_pair(tokenizer, str(row[prompt_field]), str(row[response_field]), seq_len,
                                   use_chat_template))
    if not out:
        raise UserError(f"{path} holds no JSON lines: give a non-empty dataset with --data_path")
    return out


def build_dataset(cfg: TrainConfig, tokenizer) -> Dataset:
    path = Path(cfg.data_path)
    if not cfg.data_path or not path.is_file():
        raise UserError(f"data file '{cfg.data_path}' not found: pass a text or JSONL file with --data_path")
    if tokenizer is None:
        raise UserError(f"model '{cfg.model}' has no tokenizer: use an HF directory that includes one")
    if (cfg.prompt_field is None) != (cfg.response_field is None):
        raise UserError("--prompt_field and --response_field go together: pass both (JSONL data) or neither (text)")
    if cfg.prompt_field is not None:
        examples = jsonl_examples(path, tokenizer, cfg.seq_len, cfg.prompt_field, cfg.response_field,
                                  not cfg.no_chat_template)
    else:
        if path.suffix == ".jsonl":
            raise UserError(f"{path} is JSONL: name its fields with --prompt_field and --response_field")
        examples = text_examples(path, tokenizer, cfg.seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return Dataset(examples, int(pad), cfg.seed, cfg.batch_size)


# -------------------------------------------------------------------------------------------------- schedule

def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR for optimizer update `step` (0-based): linear warmup (step+1)/warmup, then a
    cosine from 1 down to `min_ratio` at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------ checkpoints

def latest_checkpoint(output_dir: Path) -> Path | None:
    best = None
    for p in output_dir.glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and (p / STATE_JSON).exists() and (p / STATE_PT).exists():
            if best is None or int(suffix) > int(best.name.split("-", 1)[1]):
                best = p
    return best


def _rng_state(dropout: LayerDropout | None) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "dropout": dropout.state_dict()["generator"] if dropout else None}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, dropout: LayerDropout | None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if dropout is not None and state.get("dropout") is not None:
        dropout.generator.set_state(state["dropout"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(out: Path, step: int, model, tokenizer, optimizer, scheduler, dropout, cfg: TrainConfig,
                     base_model: str, last: dict) -> Path:
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(dropout)}, tmp / STATE_PT)
    state = {"step": step, "max_steps": cfg.max_steps, "lora": cfg.lora_rank > 0, "base_model": base_model,
             "loss": last.get("loss"), "exit_losses": last.get("exit_losses"), "config": asdict(cfg)}
    (tmp / STATE_JSON).write_text(json.dumps(state, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _truncate_log(log_path: Path, step: int) -> None:
    """Keep only the log lines of steps <= `step` (those after the checkpoint are re-run on resume)."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    log_path.write_text("".join(l + "\n" for l in kept))


# -------------------------------------------------------------------------------------------------- training

def _validate(cfg: TrainConfig) -> None:
    for name in ("max_steps", "batch_size", "seq_len", "gradient_accumulation_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(cfg, name)}): pass a positive integer")
    for name in ("warmup_steps", "save_steps", "lora_rank", "layer_dropout_disable_below", "num_threads"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be >= 0 (got {getattr(cfg, name)}): pass 0 or a positive integer")
    if not cfg.lr > 0:
        raise UserError(f"--lr must be positive (got {cfg.lr})")
    if not 0.0 <= cfg.layer_dropout_prob_max <= 1.0:
        raise UserError(f"--layer_dropout_prob_max {cfg.layer_dropout_prob_max} is outside [0, 1]: "
                        f"pass a probability in [0, 1]")
    if cfg.early_exit_e_scale < 0:
        raise UserError(f"--early_exit_e_scale must be >= 0 (got {cfg.early_exit_e_scale})")
    parse_scale(cfg.layer_dropout_scale)
    parse_loss_scale(cfg.early_exit_loss_scale)
    parse_curriculum(cfg.early_exit_curriculum)
    if cfg.dtype not in DTYPES:
        raise UserError(f"unknown dtype '{cfg.dtype}': use one of {', '.join(DTYPES)} with --dtype")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{cfg.device}' requested but CUDA is not available here: use --device cpu")
    if not (cfg.device == "cpu" or cfg.device.startswith("cuda") or cfg.device == "mps"):
        raise UserError(f"unknown device '{cfg.device}': use cpu or cuda[:N]")
    if not cfg.data_path or not Path(cfg.data_path).is_file():
        raise UserError(f"data file '{cfg.data_path}' not found: pass a text or JSONL file with --data_path")


def train(cfg: TrainConfig) -> dict:
    """Run the recipe; returns {steps, start_step, seconds, seconds_per_step, loss, exit_losses, output_dir,
    final_path, checkpoints}."""
    _validate(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[cfg.dtype]
    device = torch.device(cfg.device)

    resume_from: Path | None = None
    if cfg.resume:
        resume_from = latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume)
        if resume_from is None:
            raise UserError(f"no checkpoint-STEP directory under {out} to resume from: drop --resume or point "
                            f"--output_dir at a run saved with --save_steps")
        if not (resume_from / STATE_JSON).exists() or not (resume_from / STATE_PT).exists():
            raise UserError(f"{resume_from} is not a training checkpoint (no {STATE_JSON} / {STATE_PT}): "
                            f"pass a checkpoint-STEP directory to --resume")
    resume_state = json.loads((resume_from / STATE_JSON).read_text()) if resume_from else None
    if resume_state is not None and bool(resume_state.get("lora")) != (cfg.lora_rank > 0):
        raise UserError(f"{resume_from} was trained {'with' if resume_state.get('lora') else 'without'} LoRA: "
                        f"resume with the same --lora_rank")

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    base_dir = resume_state["base_model"] if resume_state else hf_dir_for(cfg.model)
    load_dir = str(resume_from) if resume_state and not resume_state.get("lora") else base_dir
    model, tokenizer = _load(load_dir, dtype)
    n_layers = model.config.num_hidden_layers
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.seq_len > max_pos:
        raise UserError(f"--seq_len {cfg.seq_len} exceeds the model's {max_pos} positions: use --seq_len <= {max_pos}")
    exit_layers = parse_layers(cfg.early_exit_loss_layers, n_layers, include_last=False)
    curriculum = EarlyExitCurriculum(exit_layers, n_layers, cfg.early_exit_curriculum, cfg.max_steps,
                                     cfg.early_exit_gradual_fraction)
    probs = layer_dropout_probs(n_layers, cfg.layer_dropout_prob_max, cfg.layer_dropout_scale,
                                cfg.layer_dropout_disable_below)
    data = build_dataset(cfg, tokenizer)

    if cfg.lora_rank > 0:
        if resume_state:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, str(resume_from), is_trainable=True)
        else:
            model = _apply_lora(model, cfg)
    model.to(device)
    model.train()
    layers, norm, head = model_parts(model)
    dropout = LayerDropout(layers, probs, per_sample=not cfg.layer_dropout_per_batch,
                           generator=torch.Generator().manual_seed(cfg.seed + 1)) if any(probs) else None

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
    start_step = 0
    log_path = out / LOG_NAME
    if resume_state:
        blob = torch.load(resume_from / STATE_PT, map_location=device, weights_only=False)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        _set_rng_state(blob["rng"], dropout)
        start_step = int(resume_state["step"])
        _truncate_log(log_path, start_step)
    elif log_path.exists():
        log_path.unlink()

    autocast = device.type == "cuda" and dtype == torch.float32
    last: dict = {"loss": resume_state.get("loss") if resume_state else None,
                  "exit_losses": resume_state.get("exit_losses") if resume_state else None}
    checkpoints: list[str] = []
    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", disable=not cfg.progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    ga = cfg.gradient_accumulation_steps
    with log_path.open("a") as log:
        for step in range(start_step, cfg.max_steps):
            t_step = time.perf_counter()
            active = curriculum.active(step)
            early = [l for l in active if l != n_layers - 1]
            optimizer.zero_grad(set_to_none=True)
            sums = {l: 0.0 for l in active}
            total = 0.0
            for micro in range(ga):
                batch = data.micro_batch(step * ga + micro)
                ids = batch["input_ids"].to(device)
                labels = batch["labels"].to(device)
                mask = batch["attention_mask"].to(device) if batch["attention_mask"] is not None else None
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    with capture_layer_outputs(layers, early) as captured:
                        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    losses = exit_losses({l: captured[l] for l in early}, logits, labels, norm, head, n_layers)
                    loss = early_exit_loss(losses, n_layers, cfg.early_exit_loss_scale, cfg.early_exit_e_scale)
                (loss / ga).backward()
                total += float(loss.detach()) / ga
                for l, v in losses.items():
                    sums[l] += float(v.detach()) / ga
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            done = step + 1
            last = {"loss": total, "exit_losses": {str(l): v for l, v in sums.items()}}
            record = {"step": done, "loss": round(total, 6), "lr": lr,
                      "exit_losses": {str(l): round(v, 6) for l, v in sums.items()},
                      "seconds": round(time.perf_counter() - t_step, 4)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix({"loss": f"{total:.3f}", **{f"L{l}": f"{v:.2f}" for l, v in sums.items()}})
            bar.update(1)
            if cfg.save_steps and done % cfg.save_steps == 0 and done < cfg.max_steps:
                checkpoints.append(str(_save_checkpoint(out, done, model, tokenizer, optimizer, scheduler, dropout,
                                                        cfg, base_dir, last)))
    bar.close()
    seconds = time.perf_counter() - t0
    steps_run = cfg.max_steps - start_step
    if cfg.save_steps and steps_run > 0:
        checkpoints.append(str(_save_checkpoint(out, cfg.max_steps, model, tokenizer, optimizer, scheduler, dropout,
                                                cfg, base_dir, last)))
    if dropout is not None:
        dropout.remove()
    model.eval()
    final_path = out / "final"
    to_save = model.merge_and_unload() if cfg.lora_rank > 0 else model
    shutil.rmtree(final_path, ignore_errors=True)
    to_save.save_pretrained(final_path)
    if tokenizer is not None:
        tokenizer.save_pretrained(final_path)
    return {"steps": cfg.max_steps, "start_step": start_step, "seconds": round(seconds, 3),
            "seconds_per_step": round(seconds / steps_run, 4) if steps_run else None,
            "loss": last["loss"], "exit_losses": last["exit_losses"], "output_dir": str(out),
            "final_path": str(final_path), "checkpoints": checkpoints}


# -------------------------------------------------------------------------------------------------------- CLI

def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    a = parser.add_argument
    a("--model", default=d.model, help="HF directory, local hub id, .gguf file or alias (default %(default)s)")
    a("--data_path", required=True, help="plain text corpus, or JSONL with --prompt_field/--response_field")
    a("--prompt_field", default=None, help="JSONL field holding the prompt (no loss on it)")
    a("--response_field", default=None, help="JSONL field holding the response (the loss covers it)")
    a("--output_dir", default=d.output_dir, help="checkpoints, final/ and train_log.jsonl go here")
    a("--max_steps", type=int, default=d.max_steps, help="optimizer steps (default %(default)s)")
    a("--batch_size", type=int, default=d.batch_size, help="sequences per micro-batch")
    a("--seq_len", type=int, default=d.seq_len, help="tokens per sequence (text blocks / max JSONL length)")
    a("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps)
    a("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    a("--warmup_steps", type=int, default=d.warmup_steps, help="linear warmup steps, then cosine decay to 0")
    a("--weight_decay", type=float, default=d.weight_decay)
    a("--max_grad_norm", type=float, default=d.max_grad_norm, help="gradient clipping; 0 disables")
    a("--layer_dropout_prob_max", type=float, default=d.layer_dropout_prob_max,
      help="drop probability of the deepest layer, p_l = p_max * scale(l/(L-1)); 0 disables")
    a("--layer_dropout_scale", default=d.layer_dropout_scale,
      help="uniform, linear, exp, log, sin or sigmoid (default %(default)s)")
    a("--layer_dropout_disable_below", type=int, default=d.layer_dropout_disable_below,
      help="layers below this index are never dropped")
    a("--layer_dropout_per_batch", action="store_true", help="one coin per micro-batch instead of per sequence")
    a("--early_exit_loss_layers", default=d.early_exit_loss_layers,
      help="exits with a loss: slice (0::4), comma list (0,4,8) or none; the last layer is always included")
    a("--early_exit_loss_scale", default=d.early_exit_loss_scale,
      help="one, l, sum_l, sqrt_l, inv_l or inv_sqrt_l (default %(default)s)")
    a("--early_exit_e_scale", type=float, default=d.early_exit_e_scale, help="extra weight of the early exits")
    a("--early_exit_curriculum", default=d.early_exit_curriculum, help="none, rotational or gradual")
    a("--lora_rank", type=int, default=d.lora_rank, help="train LoRA adapters of this rank (0: full fine-tune)")
    a("--lora_alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    a("--save_steps", type=int, default=d.save_steps, help="checkpoint every N steps (0: only final/)")
    a("--resume", nargs="?", const="latest", default=None,
      help="continue from the latest checkpoint in --output_dir (or from the given checkpoint directory)")
    a("--seed", type=int, default=d.seed)
    a("--device", default=d.device, help="cpu or cuda[:N] (bf16 autocast on CUDA)")
    a("--dtype", default=d.dtype, help="weight dtype: float32 (default), bfloat16, float16")
    a("--no_chat_template", action="store_true", help="JSONL prompts as plain text, not the chat template")
    a("--no_progress", action="store_true", help="no tqdm progress bar")
    a("--num_threads", type=int, default=0,
      help="CPU threads for torch (0: torch's default; 1 is much faster on a busy, shared CPU)")


def config_from_args(args) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if hasattr(args, "no_progress"):
        values["progress"] = not args.no_progress
    return TrainConfig(**values)


def run_train(args) -> dict:
    """CLI entry: argparse namespace (from `add_train_arguments`) -> summary dict (see `train`)."""
    return train(config_from_args(args))
