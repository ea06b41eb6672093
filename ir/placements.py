"""Parallel tensor states (the DTensor vocabulary) and what moving between them costs.

Every tensor of a region graph, on ``tp`` ranks, is in one of three states:

* :class:`Replicate`: every rank holds the whole tensor;
* :class:`Shard` ``(dim)``: rank i holds the i-th of ``tp`` equal chunks along ``dim``;
* :class:`Partial`: every rank holds a full-size tensor and the value is their sum.

A :class:`Redistribution` turns one into another (Partial -> Replicate is an all-reduce, Shard -> Replicate
an all-gather, Replicate -> Shard a free local chunk); :func:`redistribution` gives its kind and the bytes
each rank sends (ring algorithms). A :class:`Propagation` is the placement of every node of one graph.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import sympy

__all__ = ["Placement", "Replicate", "Shard", "Partial", "R", "P", "NoRuleError", "Redistribution", "Propagation",
           "redistribution", "redistribution_cost"]


@dataclasses.dataclass(frozen=True)
class Replicate:
    """Every rank holds the whole tensor."""

    def to_dict(self) -> dict:
        return {"type": "replicate"}

    def __str__(self) -> str:
        return "R"


@dataclasses.dataclass(frozen=True)
class Shard:
    """Rank i holds chunk i of ``tp`` equal chunks along ``dim``."""

    dim: int

    def to_dict(self) -> dict:
        return {"type": "shard", "dim": self.dim}

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclasses.dataclass(frozen=True)
class Partial:
    """Every rank holds a full-size tensor; the value is the sum over ranks."""

    def to_dict(self) -> dict:
        return {"type": "partial", "reduce": "sum"}

    def __str__(self) -> str:
        return "P"


Placement = Any   # Replicate | Shard | Partial, or a tuple of them for multi-output ops
R, P = Replicate(), Partial()


class NoRuleError(NotImplementedError):
    """An op of a region graph has no placement rule (the message names the op)."""


@dataclasses.dataclass(frozen=True)
class Redistribution:
    """One change of placement: ``src`` of ``producer``'s value becomes ``dst`` for ``consumers``.

    ``consumers`` is empty for a producer-side change every use sees (eager reduction); a consumer
    ``output.i`` is output i of the graph.
    ``kind``: ``all_reduce``, ``all_gather``, ``chunk`` (local, free) or ``all_reduce+chunk``.
    ``nbytes``: bytes each rank sends (ring algorithm), sympy in T.
    """

    producer: str
    consumers: tuple[str, ...]
    src: Placement
    dst: Placement
    kind: str
    nbytes: sympy.Expr


@dataclasses.dataclass
class Propagation:
    """Placements of one graph and the redistributions they need."""

    placements: dict[str, Placement]
    """Node name -> placement of the value the node makes available to its users."""
    redistributions: list[Redistribution]
    flops: sympy.Expr
    """FLOPs each rank computes (sharded work divided by tp)."""

    def comm_bytes(self, pred: Optional[Callable[[Redistribution], bool]] = None) -> sympy.Expr:
        """Bytes each rank sends, summed over the redistributions ``pred`` accepts (all by default)."""
        return sympy.Add(*[r.nbytes for r in self.redistributions if pred is None or pred(r)])


def redistribution(src: Placement, dst: Placement, nbytes: sympy.Expr, tp: int) -> Optional[tuple[str, sympy.Expr]]:
    """(kind, bytes sent per rank) of turning src into dst, None if not possible."""
    if src == dst:
        return "", sympy.Integer(0)
    ar = nbytes * sympy.Rational(2 * (tp - 1), tp)
    ag = nbytes * sympy.Rational(tp - 1, tp)
    if src == R and isinstance(dst, Shard):
        return "chunk", sympy.Integer(0)
    if isinstance(src, Shard) and dst == R:
        return "all_gather", ag
    if isinstance(src, Shard) and isinstance(dst, Shard):
        return "all_gather+chunk", ag
    if src == P and dst == R:
        return "all_reduce", ar
    if src == P and isinstance(dst, Shard):
        return "all_reduce+chunk", ar
    return None   # R -> P, S -> P: never needed


def redistribution_cost(src: Placement, dst: Placement, nbytes: float, tp: int) -> Optional[float]:
    """Numeric bytes of :func:`redistribution` (the propagation compares options with it)."""
    if src == dst or (src == R and isinstance(dst, Shard)):
        return 0.0
    if isinstance(src, Shard) and (dst == R or isinstance(dst, Shard)):
        return nbytes * (tp - 1) / tp
    if src == P and (dst == R or isinstance(dst, Shard)):
        return nbytes * 2 * (tp - 1) / tp
    return None
