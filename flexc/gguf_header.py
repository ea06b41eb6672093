"""A Llama model's Hugging Face config read straight from a GGUF file's header.

Compiling the embedded model needs its shapes only. transformers derives the config from a GGUF file by parsing
the whole metadata block, tokenizer vocabulary included (about 10 s here), and flexc's converted copy of the file
(:mod:`flexc.gguf_cache`) takes about 40 s to make: reading the few header fields a config needs takes
milliseconds. The fields are mapped as transformers maps them for the ``llama`` architecture; a test compares the
result with the config transformers writes into the converted copy.

GGUF layout (version 2 and 3, little-endian): magic ``GGUF``, version (u32), tensor count (u64), key-value count
(u64), the key-value pairs (key: u64 length + UTF-8; value type: u32; value), then per tensor its name, number of
dimensions (u32), dimensions (u64 each), type (u32) and data offset (u64).
"""
from __future__ import annotations

import mmap
import struct
from typing import Any

__all__ = ["read_header", "llama_config"]

_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf: Any, name: str):
        self.buf, self.pos, self.name = buf, 0, name

    def take(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise ValueError(f"{self.name}: GGUF header ends early at byte {self.pos}") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.name}: GGUF header ends early at byte {self.pos}")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _SCALARS:                 # fixed-size items: skipped at once, the count kept
                self.pos += struct.calcsize(_SCALARS[item]) * count
            else:
                for _ in range(count):
                    self.value(item)
            return _Array(count)
        raise ValueError(f"{self.name}: unknown GGUF value type {kind} at byte {self.pos}")


class _Array:
    """An array value of the header: only its length is kept (vocabularies, merges)."""

    def __init__(self, count: int):
        self.count = count


def read_header(file: str) -> tuple[dict[str, Any], list[str]]:
    """``file``'s key-value metadata (arrays as their lengths) and its tensor names."""
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, file)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"{file}: not a GGUF file (no GGUF magic)")
        cur.pos = 4
        version = cur.take("<I")
        if version not in (2, 3):
            raise ValueError(f"{file}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            value = cur.value(cur.take("<I"))
            meta[key] = value.count if isinstance(value, _Array) else value
        names = []
        for _ in range(n_tensors):
            names.append(cur.string())
            n_dims = cur.take("<I")
            cur.pos += 8 * n_dims + 4 + 8                   # dimensions, type, offset
        return meta, names


def llama_config(file: str) -> dict[str, Any]:
    """The ``LlamaConfig`` fields transformers derives from a ``llama`` GGUF file (for ``AutoConfig.for_model``)."""
    meta, tensors = read_header(file)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{file}: GGUF architecture {arch!r}; flexc reads 'llama' GGUF files")

    def field(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise ValueError(f"{file}: GGUF header has no llama.{key}")
        return meta[f"llama.{key}"]

    heads = field("attention.head_count")
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=field("embedding_length"),
               intermediate_size=field("feed_forward_length"), num_hidden_layers=field("block_count"),
               num_attention_heads=heads, num_key_value_heads=meta.get("llama.attention.head_count_kv", heads),
               max_position_embeddings=field("context_length"),
               rms_norm_eps=field("attention.layer_norm_rms_epsilon"),
               rope_parameters={"rope_theta": meta.get("llama.rope.freq_base", 10000.0), "rope_type": "default"},
               vocab_size=meta.get("llama.vocab_size", meta.get("tokenizer.ggml.tokens")),
               tie_word_embeddings="output.weight" not in tensors)
    if "llama.rope.dimension_count" in meta:
        cfg["head_dim"] = meta["llama.rope.dimension_count"]
    for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                         ("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id")):
        if f"tokenizer.ggml.{theirs}" in meta:
            cfg[ours] = meta[f"tokenizer.ggml.{theirs}"]
    if "general.name" in meta:
        cfg["_model_name_or_path"] = meta["general.name"]
    return cfg
