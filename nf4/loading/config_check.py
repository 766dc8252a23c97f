"""config.json's sizes checked against the checkpoint's tensors, before a model is built.

transformers builds a model from config.json alone: ``hidden_size=10**12`` allocates (rotary
tables, position ids, layer weights created before nf4 moves them to meta) long before any tensor
is compared with the model. Every size that shapes a weight must appear in some tensor of a real
checkpoint, so a config whose sizes exceed the checkpoint's largest dimension, or that has more
layers than the checkpoint has tensors, is refused here, from the headers only.
"""
from __future__ import annotations

from typing import Iterable, Iterator

from nf4.loading.checkpoint import TensorEntry

# Keys (transformers' names across families) whose value is a dimension of some weight: the
# embedding is [vocab_size, hidden_size], an MLP projection [intermediate_size, hidden_size], the
# query projection [num_attention_heads * head_dim, hidden_size].
SIZE_KEYS = frozenset({
    "hidden_size", "vocab_size", "intermediate_size", "moe_intermediate_size", "head_dim",
    "num_attention_heads", "num_key_value_heads", "n_embd", "n_inner", "n_head", "d_model",
    "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "d_kv",
})
# Keys that count layers: each layer holds at least one tensor of the checkpoint.
LAYER_KEYS = frozenset({
    "num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers",
    "encoder_layers", "decoder_layers",
})
# Positions are not a weight dimension in rotary models (Llama has no [positions, ...] tensor), yet
# some models build tables of that length; 2**24 is above every released context window (10M,
# Llama 4 Scout) and keeps an int64 position table under 128 MiB.
MAX_POSITION_KEYS = frozenset({"max_position_embeddings", "n_positions", "n_ctx"})
MAX_POSITIONS = 2**24


def _items(config: dict, path: str = "") -> Iterator[tuple[str, str, object]]:
    """(dotted path, key, value) of every entry, nested configs (text_config...) included."""
    for k, v in config.items():
        where = f"{path}{k}"
        if isinstance(v, dict):
            yield from _items(v, where + ".")
        else:
            yield where, k, v


def largest_dimension(entries: Iterable[TensorEntry]) -> int:
    """The largest dimension any tensor could have: its own dims, and for uint8 tensors (4-bit
    weights packed two values a byte, stored [n/2, 1]) twice their element count."""
    largest = 0
    for e in entries:
        largest = max(largest, *e.shape, 2 * e.numel if e.dtype.itemsize == 1 else 0)
    return largest


def check_config_sizes(config: dict, entries: dict[str, TensorEntry], where: str) -> None:
    """Raise ValueError if a size or layer count in ``config`` cannot come from these tensors."""
    largest = largest_dimension(entries.values())
    for path, key, value in _items(config):
        if key not in SIZE_KEYS | LAYER_KEYS | MAX_POSITION_KEYS:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            if value is None:
                continue
            raise ValueError(f"{where}: {path} must be a non-negative int, got {value!r}")
        if key in SIZE_KEYS and value > largest:
            raise ValueError(f"{where}: {path} = {value}, but no tensor of the checkpoint has a "
                             f"dimension above {largest}")
        if key in LAYER_KEYS and value > len(entries):
            raise ValueError(f"{where}: {path} = {value} layers, but the checkpoint holds only "
                             f"{len(entries)} tensors")
        if key in MAX_POSITION_KEYS and value > MAX_POSITIONS:
            raise ValueError(f"{where}: {path} = {value}, above the {MAX_POSITIONS} positions accepted")
