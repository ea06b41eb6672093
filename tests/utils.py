"""Shared builders for tests: tiny random configs and packed batches."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch

TINY = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=64,
                    intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                    vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    sliding_window=None),
}


def write_config(tmp_path, arch: str = "llama", **overrides) -> str:
    """Write a tiny config.json for ``arch`` and return its path."""
    cfg = dict(TINY[arch], **overrides)
    path = os.path.join(str(tmp_path), f"{arch}-config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def randomize_lora(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """PEFT initialises lora_B to zero; give it values so adapters change outputs and lora_A gets gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def packed_batch(lens, vocab: int, seed: int = 1):
    """A flat batch of sequences: ids[T], positions[T], cu_seqlens int32[N+1], labels[T] (next token, -100 at ends)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lens]
    ids = torch.cat(seqs)
    pos = torch.cat([torch.arange(n) for n in lens])
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    labels = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs])
    return ids, pos, cu, labels, seqs


def eager_peft_loss_grads(model, seqs):
    """Reference: HF+PEFT with its own (sdpa/eager) attention, one padded-free sequence at a time, mean CE over
    all labelled tokens, ordinary loss.backward(). Returns (logits list, grads by name)."""
    model.zero_grad(set_to_none=True)
    total = sum(len(s) - 1 for s in seqs)
    logits_all = []
    loss = 0.0
    for s in seqs:
        out = model(input_ids=s[None])
        lg = out.logits[0].to(torch.promote_types(out.logits.dtype, torch.float32))     # fp64 stays fp64
        logits_all.append(lg.detach())
        loss = loss + torch.nn.functional.cross_entropy(lg[:-1], s[1:], reduction="sum")
    (loss / total).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits_all, grads, loss.detach()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a-b|| / ||b||."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@dataclasses.dataclass
class TinyLlama:
    """The tiny Llama (hidden 64, 4 heads of 16, 2 KV heads, MLP 128, vocab 256, 3 layers) with LoRA r=4 alpha=8 on
    all seven projections, compiled at seq_len 16 with the default passes, and its PEFT model with random weights
    and non-zero lora_B (fp32, flexc attention). Shared by tests: do not leave it changed."""

    cm: Any
    model: torch.nn.Module


def build_tiny_llama(tmp_path) -> TinyLlama:
    import flexc
    from flexc.ir.spec import LoraSpec
    from flexc.models import load_model, resolve_model
    src = resolve_model(write_config(tmp_path, "llama"))
    spec = LoraSpec(r=4, alpha=8)
    cm = flexc.compile(src, lora=spec, seq_len=16)
    model = load_model(src, spec, "fp32", seed=3)
    randomize_lora(model)
    return TinyLlama(cm=cm, model=model)
