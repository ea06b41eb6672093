"""A user pass: count the LoRA matmuls and their FLOPs per token in every region.

Run it with the CLI:

    flexc compile smollm2-135m --pass examples.user_pass:lora_flops

or from Python: ``flexc.compile("smollm2-135m", passes=["examples.user_pass:lora_flops"])``.
Its report lands in plan.json under ``passes[-1].report``. A package can also
publish it as an entry point in the group ``flexc.passes``.
"""
from __future__ import annotations

import dataclasses

import sympy

from flexc.ir.vocab import TOKEN_SYMBOL
from flexc.ir.graph import NODE_INFO, Role


@dataclasses.dataclass
class LoraFlopsReport:
    """What the pass found (it changes nothing)."""

    modified: bool
    lora_matmuls: dict[str, int]
    """Forward LoRA matmul nodes per region."""
    lora_flops_per_token: dict[str, float]
    """Forward FLOPs of the LoRA matmuls per token, per region (one layer for templates)."""


def lora_flops(graph, ctx) -> LoraFlopsReport:
    """Sum the forward FLOPs of nodes whose role is adapter_A or adapter_B."""
    counts, flops = {}, {}
    for name, region in graph.regions.items():
        total, n = sympy.Integer(0), 0
        for node in region.nodes("forward"):
            info = node.meta[NODE_INFO]
            if info.role in (Role.ADAPTER_A, Role.ADAPTER_B) and info.flops != 0:
                total += info.flops
                n += 1
        counts[name] = n
        flops[name] = float(sympy.simplify(total / TOKEN_SYMBOL)) if n else 0.0
    return LoraFlopsReport(modified=False, lora_matmuls=counts, lora_flops_per_token=flops)
