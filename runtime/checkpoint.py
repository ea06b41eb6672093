"""Adapter files and training checkpoints on disk: PEFT-format adapters, atomic step directories, resume.

A checkpoint of a finetuning job is a directory ``<root>/step-NNNNNN`` holding
the adapter in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``,
loadable by ``peft.PeftModel.from_pretrained``), ``trainer.pt`` (fp32 masters,
optimizer and learning-rate schedule state) and ``trainer_state.json`` (step,
data position, losses, ...). It is written under a ``.tmp`` name and renamed,
then ``<root>/latest`` is replaced to name it, so a process killed at any moment
leaves the previous checkpoint intact.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

__all__ = ["save_peft_adapter", "Checkpoint", "write_checkpoint", "read_latest_checkpoint"]


def save_peft_adapter(directory: str, params: dict[str, torch.Tensor], adapter_name: str, peft_config: Any) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as ``PeftModel.save_pretrained`` does.

    ``params`` are named as in ``model.named_parameters()`` (``...lora_A.<adapter_name>.weight``).
    """
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    tensors = {name.replace(f".{adapter_name}.", "."): t.detach().to("cpu").contiguous()
               for name, t in params.items()}
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config.save_pretrained(directory)


@dataclasses.dataclass(kw_only=True)
class Checkpoint:
    """One training checkpoint as read back (or about to be written)."""

    step: int
    """Optimizer steps taken when it was written (the directory is ``step-{step:06d}``)."""
    tensors: dict[str, Any]
    """What ``trainer.pt`` holds: ``master`` (fp32 adapter tensors), ``optimizer``, ``scheduler`` state dicts."""
    state: dict[str, Any]
    """What ``trainer_state.json`` holds (JSON-serializable progress: position, losses, ...)."""
    path: Optional[str] = None
    """Its directory (set when read)."""


def write_checkpoint(root: str, ckpt: Checkpoint, adapter: Optional[tuple[dict, str, Any]] = None) -> str:
    """Write ``root/step-N`` atomically and point ``root/latest`` at it; returns its path. ``adapter``:
    (tensors, adapter name, peft config) to include in PEFT format."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{ckpt.step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter is not None:
        save_peft_adapter(tmp, *adapter)
    os.makedirs(tmp, exist_ok=True)
    torch.save(ckpt.tensors, os.path.join(tmp, "trainer.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump({"step": ckpt.step, **ckpt.state}, f, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = os.path.join(root, "latest.tmp")
    with open(latest_tmp, "w") as f:
        f.write(os.path.basename(final))
    os.replace(latest_tmp, os.path.join(root, "latest"))
    return final


def read_latest_checkpoint(root: str) -> Optional[Checkpoint]:
    """The checkpoint ``root/latest`` names, or None when there is none; a damaged one is a ValueError naming
    its path."""
    latest = os.path.join(root, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        path = os.path.join(root, f.read().strip())
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        tensors = torch.load(os.path.join(path, "trainer.pt"), weights_only=True)
    except (OSError, json.JSONDecodeError, RuntimeError) as e:
        raise ValueError(f"cannot resume from {path}: {e}") from e
    return Checkpoint(step=int(state.pop("step")), tensors=tensors, state=state, path=path)
