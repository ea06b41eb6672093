"""Session fixture of the ir tests: one tiny Llama compiled once, with a real PEFT model of the same shape."""
import dataclasses

import pytest
import torch

import flexc
from flexc.models import LoraSpec, load_model, resolve_model
from tests.utils import randomize_lora, write_config


@dataclasses.dataclass
class TinyLlama:
    """Tiny Llama (hidden 64, 4 heads, 2 KV heads, intermediate 128, vocab 256, 3 layers), LoRA r=4 alpha=8 on
    all seven projections, compiled at seq_len 16 with the default passes; ``model`` has random weights and
    non-zero lora_B, fp32, flexc attention."""

    cm: "flexc.CompiledModel"
    model: torch.nn.Module
    config: dict


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> TinyLlama:
    path = write_config(tmp_path_factory.mktemp("ir-llama"), "llama")
    src = resolve_model(path)
    spec = LoraSpec(r=4, alpha=8)
    cm = flexc.compile(src, lora=spec, seq_len=16)
    model = load_model(src, spec, "fp32", seed=3)
    randomize_lora(model)
    return TinyLlama(cm=cm, model=model, config=src.config.to_dict())
