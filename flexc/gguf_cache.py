"""The embedded GGUF model, converted once into an ordinary Hugging Face directory on disk.

Reading the embedded SmolLM2 GGUF file through transformers parses its whole metadata (the 49,152-token
vocabulary included) every time a config, a tokenizer or the weights are asked for: about 11-15 s each on a
2-core CPU, three times per engine. The first load converts the file (config, generation config, tokenizer,
and the weights dequantized to fp32 safetensors, so every later cast is the one the GGUF loader would make)
into ``$FLEXC_CACHE_DIR/models/<key>`` (default ``~/.cache/flexc``; ``$XDG_CACHE_HOME`` is honoured); later
loads read that directory. The key names the GGUF file, its size and modification time and the transformers
version that converted it, so a changed file or library converts again. Conversion writes into a private
temporary directory and renames it into place under a file lock: concurrent first loads (test workers,
tensor-parallel ranks) convert once and never see a half-written directory. When the cache cannot be written, loading falls back to the GGUF
file, with one warning.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from typing import Optional

logger = logging.getLogger(__name__)

__all__ = ["cache_root", "converted_dir"]


def cache_root() -> str:
    """Where flexc keeps converted models: ``$FLEXC_CACHE_DIR``, else ``$XDG_CACHE_HOME/flexc``, else
    ``~/.cache/flexc``."""
    if os.environ.get("FLEXC_CACHE_DIR"):
        return os.environ["FLEXC_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flexc")


def _key(path: str, gguf_file: str) -> str:
    import transformers
    st = os.stat(os.path.join(path, gguf_file))
    stem = gguf_file[:-len(".gguf")] if gguf_file.endswith(".gguf") else gguf_file
    return f"{stem}-{st.st_size}-{st.st_mtime_ns}-transformers{transformers.__version__}"


def _convert(path: str, gguf_file: str, out: str, architecture: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    cfg = AutoConfig.from_pretrained(path, gguf_file=gguf_file)
    if not cfg.architectures:
        cfg.architectures = [architecture]
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, config=cfg, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: write the dequantized weights directly (a tied
    # output head is the embedding; from_pretrained ties it again from the config)
    tied = getattr(cfg, "tie_word_embeddings", False)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    AutoTokenizer.from_pretrained(path, gguf_file=gguf_file).save_pretrained(out)


def converted_dir(path: str, gguf_file: str, architecture: str) -> Optional[str]:
    """The Hugging Face directory converted from ``path/gguf_file`` (converting it now if needed), or None when the
    cache cannot be written (the caller then reads the GGUF file)."""
    root = os.path.join(cache_root(), "models")
    key = _key(path, gguf_file)
    target = os.path.join(root, key)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    try:
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, f".{key}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)      # one process converts; the others wait, then read its result
            if not os.path.isfile(os.path.join(target, "config.json")):
                _convert_into(path, gguf_file, root, target, architecture)
    except OSError as e:
        logger.warning("cannot write the model cache under %s (%s); reading %s each time", root, e, gguf_file)
        return None
    return target


def _convert_into(path: str, gguf_file: str, root: str, target: str, architecture: str) -> None:
    logger.info("converting %s once into %s", gguf_file, target)
    tmp = tempfile.mkdtemp(prefix=".converting-", dir=root)
    try:
        _convert(path, gguf_file, tmp, architecture)
        os.rename(tmp, target)            # complete or absent: readers never see a half-written directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
