"""Turn a Hub repository id or a local path into a local folder holding the checkpoint's files.

Only what loading needs is fetched: config, safetensors shards and their index, tokenizer and
generation files. Pickle weights are never downloaded (and a local folder holding only them is
refused: unpickling runs code). ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` are read when called, so
they work however late they are set.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from huggingface_hub import snapshot_download

from nf4.loading.checkpoint import refuse_pickle_only

log = logging.getLogger(__name__)

# Files loading or saving a model uses; weights in safetensors only.
ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json",
]
# Copied next to a saved model so the output folder is usable on its own.
AUX_FILES = [p for p in ALLOW_PATTERNS if "*" not in p and p != "config.json"]

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def resolve(name_or_path: str | os.PathLike, *, revision: Optional[str] = None,
            cache_dir: Optional[str | os.PathLike] = None, token: Optional[str | bool] = None) -> Path:
    """The local folder of ``name_or_path``: an existing directory as is, else a Hub snapshot."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a repository id or a path, got {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        refuse_pickle_only(path)
        return path
    name = str(name_or_path)
    looks_local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or os.sep + os.sep in name
    if path.exists() or looks_local:
        raise FileNotFoundError(f"{name}: not a model folder" + ("" if path.exists() else " (no such directory)"))
    if cache_dir is None:
        cache_dir = os.environ.get("HF_HUB_CACHE") or None
    offline = hub_offline()
    log.info("resolving %s (revision %s)%s", name, revision or "main", " offline" if offline else "")
    folder = Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token,
                                    allow_patterns=ALLOW_PATTERNS, local_files_only=offline))
    refuse_pickle_only(folder)
    return folder
