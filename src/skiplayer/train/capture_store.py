"""Calibration data on disk: the model's own outputs and their captured hidden-state rows, so that an interrupted
`skiplayer calibrate` keeps what it generated, and a rerun with the same `--output` reuses it (and generates only
prompts it has not answered yet: a longer budget extends the data instead of starting over).

Finished sequences are written in parts of `part_size` sequences (one safetensors file each: rows per capture key,
the output tokens, the prompt keys), atomically, plus whatever is pending when generation ends or is interrupted.
A kill (SIGKILL, power loss) loses at most the part being filled. `settings.json` records what the rows depend on
(model fingerprint, dtype, capture keys, prompt positions); data for other settings is refused, not mixed in.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from skiplayer.errors import UserError

SETTINGS_FILE = "settings.json"


def prompt_key(ids: list[int], max_steps: int, stop_words: list[str]) -> str:
    """What a greedy output depends on besides the model: prompt ids, the step limit, the stop words."""
    return hashlib.sha1(json.dumps([list(ids), max_steps, list(stop_words)]).encode()).hexdigest()[:20]


class CaptureStore:
    def __init__(self, directory: str | Path, settings: dict, part_size: int = 32):
        self.dir, self.settings, self.part_size = Path(directory), dict(settings), part_size
        self.pending: list[tuple[str, list[int], dict[str, torch.Tensor]]] = []
        saved = self.saved_settings(self.dir)
        if (self.dir / SETTINGS_FILE).is_file():
            if saved != json.loads(json.dumps(self.settings)):
                raise UserError(f"{self.dir} holds calibration data made with other settings ({saved}, here "
                                f"{self.settings}): pass another --output, or delete {self.dir} to start over")

    @staticmethod
    def saved_settings(directory: str | Path) -> dict | None:
        try:
            return json.loads((Path(directory) / SETTINGS_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.safetensors"))

    def load(self) -> dict[str, tuple[list[int], dict[str, torch.Tensor]]]:
        """prompt key -> (output tokens, rows: a tensor per capture key, plus `is_output`)."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        found = {}
        for path in self.parts():
            try:
                with safe_open(str(path), "pt") as f:
                    meta = json.loads(f.metadata()["sequences"])
                    tensors = {name: f.get_tensor(name) for name in f.keys()}
            except (SafetensorError, OSError, KeyError, ValueError) as e:
                raise UserError(f"{path} is unreadable ({' '.join(str(e).split())[:120]}): delete it (its prompts "
                                f"are generated again)") from None
            offsets = [0]
            for s in meta:
                offsets.append(offsets[-1] + s["rows"])
            for s, lo, hi in zip(meta, offsets, offsets[1:]):
                found.setdefault(s["key"], (s["output"], {k: t[lo:hi] for k, t in tensors.items()}))
        return found

    def add(self, key: str, output: list[int], rows: dict[str, torch.Tensor]) -> None:
        self.pending.append((key, list(output), rows))
        if len(self.pending) >= self.part_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / SETTINGS_FILE).write_text(json.dumps(self.settings, indent=2) + "\n")
        names = self.pending[0][2].keys()
        tensors = {n: torch.cat([rows[n] for _, _, rows in self.pending]).contiguous() for n in names}
        meta = [{"key": key, "output": output, "rows": len(rows["is_output"])} for key, output, rows in self.pending]
        parts = self.parts()
        number = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        path = self.dir / f"part-{number:05d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"sequences": json.dumps(meta)})
        os.replace(tmp, path)  # a part is complete or absent, never half-written
        self.pending = []
