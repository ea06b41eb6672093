"""The IR's vocabulary: what a graph input or output means, the token symbol, a captured region.

Small on purpose and free of Dynamo: every room that reads captured graphs
imports these names from here, and only :mod:`flexc.ir.capture` (which makes
them) touches torch's private capture APIs.

Every placeholder of a flexc graph carries ``meta['flexc_ref']``, an
:class:`InputRef` whose ``kind`` says what the runtime binds to it::

    InputRef(InputKind.PARAM, target="layer.self_attn.q_proj.base_layer.weight")
    InputRef(InputKind.USER, index=0)                 # the region's first positional argument
    InputRef(InputKind.LORA_A_STACK, target="layer.mlp.down_proj.lora_A.default.weight")

and the output node carries a list of :class:`OutputRef`, one per output.
Shapes use :data:`TOKEN_SYMBOL` for the token count T of the flat batch.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Optional

import sympy
import torch

__all__ = ["InputKind", "OutputKind", "InputRef", "OutputRef", "CapturedRegion", "TOKEN_SYMBOL", "canonical",
           "evaluate_at", "is_sym_node"]

TOKEN_SYMBOL = sympy.Symbol("T", integer=True, positive=True)
"""The symbol every captured shape uses for the number of tokens in the flat batch."""


class InputKind(str, enum.Enum):
    """What a graph placeholder is bound to at run time."""

    PARAM = "param"
    """A parameter of the region module; ``target`` is its FQN inside the region."""
    BUFFER = "buffer"
    """A buffer of the region module; ``target`` is its FQN inside the region."""
    USER = "user"
    """A positional argument of the region; ``index`` says which."""
    SAVED = "saved"
    """(backward graphs) a value the forward kept; ``target`` is the forward node's name."""
    TANGENT = "tangent"
    """(backward graphs) the gradient of user output ``index``."""
    LORA_A_STACK = "lora_A_stack"
    """``[num_adapters, r, H_in]``: every resident adapter's ``lora_A`` of the parameter named by ``target``."""
    LORA_B_STACK = "lora_B_stack"
    """``[num_adapters, H_out, r]``: every resident adapter's ``lora_B`` of the parameter named by ``target``."""
    LORA_SCALING = "lora_scaling"
    """fp32 ``[num_adapters]``: each adapter's scaling for the linear named by ``target``."""
    SEG_STARTS = "seg_starts"
    """int32 ``[S+1]``: bounds of the flat batch's adapter segments (shared by every LoRA branch)."""
    SEG_ADAPTER = "seg_adapter"
    """int32 ``[S]``: adapter slot of each segment, -1 for none."""
    K_CACHE = "k_cache"
    """The paged key cache of the layer being run: ``[num_blocks, block_size, Hkv, D]`` (mutated)."""
    V_CACHE = "v_cache"
    """The paged value cache of the layer being run (mutated)."""
    BLOCK_TABLES = "block_tables"
    """int32 ``[N, max_blocks]``: physical block of each logical block per sequence, -1 unused."""
    CONTEXT_LENS = "context_lens"
    """int32 ``[N]``: tokens of each sequence already in the cache before this batch."""
    SLOT_MAPPING = "slot_mapping"
    """int64 ``[T]``: cache slot of each new token's K/V."""
    TRAIN_ROWS = "train_rows"
    """int64 ``[Tf]``: rows of the flat batch that belong to finetuning sequences (their saved values are
    returned for the backward, nobody else's)."""


class OutputKind(str, enum.Enum):
    """What a graph output means."""

    USER = "user"
    """Region output ``index``."""
    SAVED = "saved"
    """Kept for the backward."""
    GRAD = "grad"
    """The gradient of the input ``of``."""
    NONE = "none"
    """An input without gradient."""


@dataclasses.dataclass(frozen=True)
class InputRef:
    """What a graph placeholder is bound to (see :class:`InputKind` for ``target`` and ``index``)."""

    kind: InputKind
    target: str = ""
    index: int = -1

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", InputKind(self.kind))


@dataclasses.dataclass(frozen=True)
class OutputRef:
    """What a graph output means (see :class:`OutputKind`); ``of`` is set for gradients."""

    kind: OutputKind
    index: int = -1
    of: Optional[InputRef] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", OutputKind(self.kind))


@dataclasses.dataclass
class CapturedRegion:
    """Joint and partitioned graphs of one region, with flexc-typed descriptors.

    ``fw`` placeholders and ``bw`` outputs carry ``meta['flexc_ref']``
    (:class:`InputRef` / :class:`OutputRef`); ``fw`` outputs are the user
    outputs followed by the saved values, ``bw`` placeholders are the saved
    values (same node names as in ``fw``) followed by the tangents.
    """

    fw: Any
    """The forward ``fx.GraphModule``."""
    bw: Any
    """The backward ``fx.GraphModule`` (None for forward-only regions)."""
    joint: Any
    """The joint forward+backward ``fx.GraphModule`` the partition was cut from (None when forward-only)."""
    num_fwd_outputs: int
    num_user_outputs: int
    token_exprs: list[sympy.Expr]
    """Expressions of the token dimension (several aliases of T); see :meth:`to_token_expr`."""
    shape_env: Any
    seconds: dict[str, float]

    def to_token_expr(self, value: Any) -> sympy.Expr:
        """A SymInt/int -> sympy expression in :data:`TOKEN_SYMBOL` (other symbols kept as they are)."""
        if not isinstance(value, torch.SymInt):
            return sympy.Integer(int(value))
        expr = self.shape_env.simplify(value.node.expr)
        subs = {s: TOKEN_SYMBOL for t in self.token_exprs for s in t.free_symbols}
        return canonical(expr.xreplace(subs))


def canonical(expr: Any) -> sympy.Expr:
    """The expanded form of a size or byte count (a polynomial in T with rational coefficients): the one
    form flexc compares and prints. NOTE: not ``sympy.simplify``, which gives the same form for these
    expressions but imports ``sympy.physics`` on first use (0.3 s of every compile)."""
    return sympy.expand(expr)


def evaluate_at(expr: Any, tokens: int, num_seqs: int = 1) -> float:
    """Value of a shape/cost expression at T = ``tokens`` for a batch of ``num_seqs`` sequences.

    The only other symbol a captured graph has is the length of ``cu_seqlens`` (the sequence count + 1),
    so every other symbol is bound to ``num_seqs + 1``. Example: ``evaluate_at(4*T + s0, 2048) == 8194``.
    """
    e = sympy.sympify(expr)
    if not e.free_symbols:
        return float(e)
    return float(e.xreplace({s: (tokens if s == TOKEN_SYMBOL else num_seqs + 1) for s in e.free_symbols}))


def is_sym_node(node: Any) -> bool:
    """Whether an FX node computes a symbolic size (SymInt/SymFloat/SymBool) rather than a tensor."""
    return isinstance(getattr(node, "meta", {}).get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))
