"""`skiplayer generate`: stream a completion for --prompt, or an interactive prompt loop without it."""
from __future__ import annotations

import json
import sys

from skiplayer.decoding.generate import generate
from skiplayer.decoding.stats import memory_mb
from skiplayer.options import add_generation_arguments, add_model_arguments, generation_config, load_from_args


def add_arguments(p):
    p.add_argument("--prompt", default=None, help="prompt text; omit for an interactive loop")
    p.add_argument("--output_format", default="text", choices=["text", "json"],
                   help="text: stream the completion and print stats; json: one object {text, token_ids, stats, memory} "
                        "(memory: the process's peak and current RSS, and peak CUDA allocation on a GPU)")
    add_model_arguments(p)
    add_generation_arguments(p)


def run(args) -> int:
    loaded, draft = load_from_args(args)  # first: unset flags follow the draft (its exit layer)
    config = generation_config(args)
    config.validate(loaded.model.n_layers)  # bad flags fail before any prompt is read

    def once(prompt: str) -> None:
        if args.output_format == "json":
            result = generate(loaded, prompt, config, chat_template=not args.no_chat_template, draft=draft)
            print(json.dumps(result.to_dict() | {"memory": memory_mb(loaded.device)}, ensure_ascii=False))
            return
        result = generate(loaded, prompt, config, chat_template=not args.no_chat_template, draft=draft,
                          on_text=lambda text: print(text, end="", flush=True))
        print()
        memory = ", ".join(f"{k} {v:.0f}" for k, v in memory_mb(loaded.device).items())
        print(f"[{result.stats.summary_line()} | {memory}]", file=sys.stderr)

    if args.prompt is not None:
        once(args.prompt)
        return 0
    print("skiplayer interactive: type a prompt, empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            return 0
        if not prompt.strip():
            return 0
        once(prompt)
