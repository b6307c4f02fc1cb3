"""The real weights for a GPU check, in pieces that fit the device tool's 64 MiB per call.

    python benchmarks/gpu_payload.py pack gpu_payload [--model smollm2-135m] [--num_prompts 6]   # here
    python benchmarks/gpu_payload.py unpack gpu_payload --to /tmp/skiplayer_payload            # there (gpu_check does it)

`pack` cuts the model's GGUF file into --parts pieces (default 3, ~31 MiB each for the default model):
gpu_payload/part1 holds the first, the `gguf` package that transformers needs to read the file, prompts from
../shared/datasets and a manifest with sha256 sums; part2, part3 the others. `gpu_payload/` is git-ignored, so the
device tool carries each part only when a call names it: one part per call, the calls in a row while the machine is
still warm (docs/gpu.md). `unpack` joins the pieces, checks the sums and returns the file and the folder to put on
sys.path; `gpu_check.py --payload gpu_payload` calls it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

PARTS = 3  # ~31 MiB each for the default model: each call's carry stays well under 64 MiB with the working tree
CHUNK = 1 << 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def pack(out: Path, weights: Path, prompts: dict[str, list[str]], alias: str, packages: list[Path] = (),
         parts: int = PARTS) -> dict:
    """Split `weights` into `parts` files of equal size (the last shorter) under out/part1 .. out/partN, copy
    `packages` (Python package folders) and write prompts.json and manifest.json into out/part1."""
    size = weights.stat().st_size
    step = -(-size // parts)
    names = []
    with open(weights, "rb") as f:
        for i in range(parts):
            part = out / f"part{i + 1}"
            if part.exists():
                shutil.rmtree(part)
            part.mkdir(parents=True)
            name = f"part{i + 1}/{weights.name}.{i}"
            with open(out / name, "wb") as g:
                left = min(step, size - i * step)
                while left > 0:
                    block = f.read(min(CHUNK, left))
                    g.write(block)
                    left -= len(block)
            names.append(name)
    site = out / "part1" / "site"
    for package in packages:
        shutil.copytree(package, site / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    (out / "part1" / "prompts.json").write_text(json.dumps(prompts, indent=1))
    manifest = {"model": alias, "file": weights.name, "bytes": size, "sha256": sha256(weights),
                "parts": {name: sha256(out / name) for name in names}, "site": "part1/site",
                "prompts": "part1/prompts.json"}
    (out / "part1" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def unpack(payload: Path, to: Path) -> tuple[Path, Path, dict, dict]:
    """(the joined weights file, the folder of carried packages, the prompts, the manifest); a ValueError naming
    what is missing or damaged. The file is joined once into `to` (kept there while its sha256 holds)."""
    manifest_file = payload / "part1" / "manifest.json"
    if not manifest_file.is_file():
        raise ValueError(f"{manifest_file} missing: carry {payload}/part1 in the call before this one")
    manifest = json.loads(manifest_file.read_text())
    for name, digest in manifest["parts"].items():
        if not (payload / name).is_file():
            raise ValueError(f"{payload / name} missing: carry {payload}/{name.split('/')[0]} (the machine must "
                             f"still be warm from the calls that carried the other parts)")
        if sha256(payload / name) != digest:
            raise ValueError(f"{payload / name} is damaged (sha256 differs): carry it again")
    to.mkdir(parents=True, exist_ok=True)
    joined = to / manifest["file"]
    if not joined.is_file() or sha256(joined) != manifest["sha256"]:
        with open(joined, "wb") as g:
            for name in manifest["parts"]:
                with open(payload / name, "rb") as f:
                    shutil.copyfileobj(f, g, CHUNK)
        if sha256(joined) != manifest["sha256"]:
            raise ValueError(f"{joined}: the joined file's sha256 differs from the original's")
    prompts = json.loads((payload / manifest["prompts"]).read_text())
    return joined, payload / manifest["site"], prompts, manifest


def default_prompts(num: int) -> dict[str, list[str]]:
    """`num` gsm8k questions and `num` chat prompts from ../shared/datasets (the check's two workloads)."""
    from skiplayer.data.datasets import load_dataset
    return {"gsm8k": [s.prompt for s in load_dataset("gsm8k", num_samples=num)],
            "chat": [s.prompt for s in load_dataset("chat_format", num_samples=num)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack")
    pk.add_argument("out", type=Path)
    pk.add_argument("--model", default="smollm2-135m", help="a model alias (its GGUF file is split)")
    pk.add_argument("--num_prompts", type=int, default=6, help="prompts per workload (gsm8k, chat)")
    pk.add_argument("--parts", type=int, default=PARTS, help="pieces of the weights file, one per device call")
    up = sub.add_parser("unpack")
    up.add_argument("payload", type=Path)
    up.add_argument("--to", type=Path, default=Path("/tmp/skiplayer_payload"))
    args = p.parse_args(argv)
    if args.command == "unpack":
        try:
            joined, site, prompts, _ = unpack(args.payload, args.to)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(joined, site, {k: len(v) for k, v in prompts.items()})
        return 0
    import gguf

    from skiplayer.errors import UserError
    from skiplayer.model.load import resolve_model_path
    try:
        weights = Path(resolve_model_path(args.model))
        prompts = default_prompts(args.num_prompts)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = pack(args.out, weights, prompts, args.model, [Path(gguf.__file__).parent], args.parts)
    sizes = {name: (args.out / name).stat().st_size / 2**20 for name in manifest["parts"]}
    print(f"{args.out}: {', '.join(f'{n} {s:.1f} MiB' for n, s in sizes.items())}; prompts "
          f"{ {k: len(v) for k, v in prompts.items()} }; sha256 {manifest['sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
