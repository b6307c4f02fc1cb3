"""Early-exit agreement of one or more models: how often the plain exit after layer E (final norm + LM head, full
vocabulary) predicts what the model's own last layer predicts, on the model's own greedy answers to held-out prompts.

    python benchmarks/exit_agreement.py --models smollm2-135m,runs/train-gsm8k/final --layers 4,8,12,16,24 \
        --dataset gsm8k --skip_first 1000 --num_prompts 12 --max_steps 96

Use it before / after `skiplayer train` (the LayerSkip recipe should raise agreement at the layers it put an
early-exit loss on). `--skip_first` leaves out the rows a training run saw (train takes rows from the start).
"""
from __future__ import annotations

import argparse
import time

from skiplayer.commands.calibrate import collect_prompts
from skiplayer.model.load import load_model
from skiplayer.options import DEFAULT_DTYPE
from skiplayer.train.calibrate import agreement, generate_and_capture


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m", help="comma-separated models (HF dirs, .gguf, aliases)")
    p.add_argument("--layers", default="4,8,12,16,24", help="comma-separated exit layers")
    p.add_argument("--dataset", default="gsm8k")
    p.add_argument("--data_path", default=None)
    p.add_argument("--skip_first", type=int, default=0, help="leave out the dataset's first N rows")
    p.add_argument("--num_prompts", type=int, default=12)
    p.add_argument("--max_steps", type=int, default=96)
    p.add_argument("--dtype", default=DEFAULT_DTYPE)
    args = p.parse_args()
    layers = [int(x) for x in args.layers.split(",")]

    print(f"| model | positions | seconds | " + " | ".join(f"E={e}" for e in layers) + " |")
    print("|---|---:|---:|" + "---:|" * len(layers))
    for name in args.models.split(","):
        t = time.monotonic()
        loaded = load_model(name, dtype=args.dtype)
        prompts, _ = collect_prompts(loaded, [args.dataset], [args.data_path], args.num_prompts, args.max_steps,
                                     seed=0, chat_template=True, held_out=0.5, max_prompt_tokens=1024,
                                     exclude_first=args.skip_first)
        _, data = generate_and_capture(loaded.model, prompts, layers, loaded.eos_token_ids, loaded.tokenizer,
                                       deadline=float("inf"), progress=False)
        scores = [agreement(loaded.model, data, e, data.is_output) for e in layers]
        print(f"| {name} | {int(data.is_output.sum())} | {time.monotonic() - t:.0f} | " + " | ".join(f"{s:.3f}" for s in scores) + " |",
              flush=True)


if __name__ == "__main__":
    main()
