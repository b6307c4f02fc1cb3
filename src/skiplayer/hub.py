"""Whether HF hub models and datasets may be downloaded.

Downloads are on unless `--offline` is given or the environment turns them off the way HF tools do
(HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1; for datasets also HF_DATASETS_OFFLINE=1). Offline, only local files and the local HF cache
are used, and a missing model or dataset is a one-line error naming the fixes.
"""
from __future__ import annotations

import os

_TRUE = {"1", "ON", "YES", "TRUE"}
OFFLINE_HOW = "--offline or HF_HUB_OFFLINE"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in _TRUE


def is_offline(flag: bool = False, datasets: bool = False) -> bool:
    """True when downloads are off: the --offline flag, HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, or (datasets=True)
    HF_DATASETS_OFFLINE. Read at each call, so a variable set after import counts."""
    return (bool(flag) or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
            or (datasets and _env_true("HF_DATASETS_OFFLINE")))


def looks_like_local_path(name: str) -> bool:
    """A name that can only mean a local directory (absolute, relative with ./ or ../, ~, or more than one '/'):
    never looked up on the hub, whose ids are 'name' or 'owner/name'."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or os.path.isdir(name)
