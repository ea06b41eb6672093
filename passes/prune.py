"""The ``prune`` pass: flexc's own partition of every trainable region's joint graph.

Finetuning only the adapters, the backward needs far less than what autograd
keeps by default:

* frozen base weights get no gradient (the joint graph has no weight-gradient
  work for them), so nothing is kept for it;
* what is kept is exactly what the adapter gradients and the input-gradient
  chain read (the *needed* set), with aliases (views, ``detach``) of one storage
  counted once and identical forward values (PEFT's ``x.to(fp32)`` copy of a
  LoRA input, one per adapter) merged first;
* cheap values are recomputed in the backward instead of kept. Which ones is a
  cost decision, not a list: a min cut over the forward graph minimises
  ``saved bytes + price * recompute FLOPs``; every saved set some price selects
  is found (the trade-off curve, :meth:`JointAnalysis.sweep`, reported as
  ``sweeps``) and the budget (``ctx.options['activation_budget']``) picks one.

Strategies (``STRATEGIES``), each a saved set for every trainable region:

``autograd``      what PyTorch autograd keeps for the HF+PEFT model (the needed set, no merging; the
                  first layer needs no input gradient; the eager head keeps fp32 log-probs ``[T, V]``);
``checkpoint``    only the region inputs (full activation checkpointing, everything else recomputed);
``pruned``        the needed set, merged and alias-aware, recomputing only free ops (views);
``pruned_remat``  the min-cut choice under the budget.

Budget (``activation_budget``): ``"max"`` installs ``pruned``, ``"min"`` installs ``checkpoint``, a number
(bytes per finetuning token of one region; ``"64KiB"`` style units allowed) installs the cheapest
recompute whose saved bytes fit it, and ``"auto"`` (the default) the fewest saved bytes whose recompute
stays within ``ctx.options['recompute_budget']`` (a fraction of the region's training FLOPs, default
:data:`DEFAULT_RECOMPUTE_FRACTION`). ``pruned_remat`` in the report is what the budget chose.

Every forward node of an installed graph carries one :class:`~flexc.ir.graph.Decision` under
``meta[DECISION]``: ``save``, ``recompute`` (also on its copy in the backward graph) or ``drop``.

Invariant (tests/passes/test_prune.py): the graphs of every strategy give the same loss and LoRA gradients
as PEFT's ``loss.backward()``, and the bytes they actually hold equal the predicted ``saved_bytes``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Optional

import sympy
import torch.fx as fx

from flexc.ir.capture import partition_joint
from flexc.ir.spec import parse_bytes
from flexc.ir.graph import DECISION, CompiledGraph, Decision, RegionGraph, annotate, storage_root
from flexc.ir.vocab import evaluate_at, is_sym_node
from flexc.passes.joint import JointAnalysis, RegionPlan, SavedValue, SweepPoint
from flexc.passes.manager import PassContext, define_pass

logger = logging.getLogger(__name__)

__all__ = ["prune", "PruneReport", "STRATEGIES", "DEFAULT_RECOMPUTE_FRACTION", "partition_region", "parse_budget",
           "parse_recompute_budget"]

STRATEGIES = ("autograd", "checkpoint", "pruned", "pruned_remat")
DEFAULT_RECOMPUTE_FRACTION = 0.2
"""Default recompute budget of ``activation_budget='auto'``: FLOPs recomputed per region, as a fraction of
the region's forward+backward FLOPs (the issue's ceiling: recompute at most 20% of training FLOPs)."""



@dataclasses.dataclass(kw_only=True)
class PruneReport:
    """What the prune pass decided: every strategy per trainable region, and which one is installed."""

    modified: bool
    budget: str
    """The activation budget as given ('auto' when none was)."""
    recompute_budget: float
    seq_len: int
    installed: str
    """Strategy whose graphs now are ``region.fw`` / ``region.bw``."""
    budget_met: bool
    """False when even full checkpointing keeps more than a byte budget allows."""
    regions: dict[str, dict[str, RegionPlan]]
    """Region name -> strategy -> plan."""
    sweeps: dict[str, list[SweepPoint]] = dataclasses.field(default_factory=dict)
    """Region name -> every saved set some price selects (:meth:`JointAnalysis.sweep`), ascending in price:
    saved bytes against recompute FLOPs from the fewest bytes to ``pruned``."""

    def to_dict(self) -> dict:
        return {"modified": self.modified, "budget": self.budget, "recompute_budget": self.recompute_budget,
                "seq_len": self.seq_len, "installed": self.installed, "budget_met": self.budget_met,
                "regions": {r: {s: p.to_dict(self.seq_len) for s, p in plans.items()}
                            for r, plans in self.regions.items()},
                "sweeps": {r: [p.to_dict(self.seq_len) for p in pts] for r, pts in self.sweeps.items()}}


def parse_budget(value: Any) -> tuple[str, Optional[float]]:
    """``None``/'auto' -> ('auto', None); 'max'/'min'; bytes per token (int, float or '64KiB') -> ('bytes', n)."""
    if value is None or value == "auto":
        return "auto", None
    if value in ("max", "min"):
        return value, None
    try:
        num = parse_bytes(value, "activation_budget")
    except ValueError as e:
        raise ValueError(f"{e}; or 'max', 'min', 'auto'") from None
    if not num > 0:
        raise ValueError(f"activation_budget must be positive bytes per token, got {value!r}")
    return "bytes", num


def parse_recompute_budget(value: Any) -> float:
    """A recompute budget: a fraction of training FLOPs in [0, 1] (``0.3``, ``"0.3"`` or ``"30%"``)."""
    text = value.strip() if isinstance(value, str) else value
    try:
        if isinstance(text, bool):
            raise TypeError
        frac = float(text[:-1]) / 100 if isinstance(text, str) and text.endswith("%") else float(text)
    except (TypeError, ValueError):
        frac = math.nan
    if not 0 <= frac <= 1:
        raise ValueError(f"recompute_budget {value!r}: expected a fraction of training FLOPs in [0, 1] "
                         "(e.g. 0.3 or '30%')")
    return frac


# ---------------------------------------------------------------------------------------------- strategies
def _strategy(an: JointAnalysis, strategy: str, need: set[fx.Node], budget: tuple[str, Optional[float]],
              recompute_fraction: float):
    """(plan, saved nodes) of one strategy on an analysis (merged joint for the pruned ones)."""
    if strategy == "autograd":
        plan, kept, _ = an.plan("autograd", set(need), need)
        if an.kind == "layer":
            first = an.needed(input_grads=False)
            plan.first_layer_bytes = an.plan("autograd", set(first), first)[0].saved_bytes
        elif an.kind == "head":
            plan = _autograd_head(an, plan)
        return plan, kept
    if strategy == "checkpoint":
        plan, kept, _ = an.plan("checkpoint", set(an.primals), need)
        return plan, kept
    if strategy == "pruned":
        plan, kept, _ = an.plan("pruned", an.min_cut(need, None), need)
        return plan, kept
    return _remat(an, need, budget, recompute_fraction)


def _remat(an: JointAnalysis, need: set[fx.Node], budget: tuple[str, Optional[float]], fraction: float):
    mode, limit = budget
    if mode == "max":
        plan, kept = _strategy(an, "pruned", need, budget, fraction)
        return dataclasses.replace(plan, strategy="pruned_remat"), kept
    if mode == "min":
        plan, kept = _strategy(an, "checkpoint", need, budget, fraction)
        return dataclasses.replace(plan, strategy="pruned_remat"), kept
    points = an.sweep(need)         # ascending in price: bytes rise, recompute falls

    def at(e: sympy.Expr) -> float:
        return evaluate_at(e, an.seq_len)
    if mode == "bytes":
        fits = [p for p in points if at(p.plan.saved_bytes) / an.seq_len <= limit]
        if not fits:                # even the fewest bytes exceed the budget: take them (budget_met False)
            return dataclasses.replace(points[0].plan, price=None), points[0].kept
        best = min(fits, key=lambda p: (at(p.plan.recompute_flops), -p.price_low))
    else:
        # NOTE: the no-recompute end still recomputes what only a LoRA branch computes (never saved): the budget
        # is on top of that
        train, forced = at(an.train_flops(need)), at(points[-1].plan.recompute_flops)
        best = min((p for p in points if at(p.plan.recompute_flops) <= fraction * train + forced),
                   key=lambda p: (at(p.plan.saved_bytes), -p.price_low))
    return dataclasses.replace(best.plan, price=best.price), best.kept


def _autograd_head(an: JointAnalysis, plan: RegionPlan) -> RegionPlan:
    """The eager HF head keeps fp32 log-probs [T, V] and int64 labels instead of the fused op's ``dx``."""
    fused = [n for n in an.nodes if "linear_cross_entropy" in str(n.target)]
    if not fused:
        return plan
    op = fused[0]
    x, weight = op.args[0], op.args[1]
    to_expr = an.captured.to_token_expr
    t = to_expr(x.meta["val"].shape[0])
    vocab = to_expr(weight.meta["val"].shape[0])
    dx = {u.name for u in op.users}
    saved = [s for s in plan.saved if s.name not in dx]
    extra = [SavedValue(name="log_softmax", shape=(t, vocab), dtype="float32", kind="activation",
                        nbytes=4 * t * vocab),
             SavedValue(name="labels", shape=(t,), dtype="int64", kind="input", nbytes=8 * t)]
    dx_bytes = sum((s.nbytes for s in plan.saved if s.name in dx), sympy.Integer(0))
    return dataclasses.replace(plan, saved=saved + extra,
                               saved_bytes=sympy.expand(plan.saved_bytes - dx_bytes + 4 * t * vocab + 8 * t + 4))


def partition_region(region: RegionGraph, strategy: str, seq_len: int, budget: Any = None,
                     recompute_fraction: float = DEFAULT_RECOMPUTE_FRACTION):
    """Forward and backward graphs of one strategy for a trainable region: ``(fw, bw, plan)``.

    The graphs are new; the region keeps its installed ones. ``plan.saved_bytes`` is the prediction that
    :func:`flexc.passes.memory.measure_saved_bytes` checks against real tensors.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    an = JointAnalysis(region, seq_len, merge=strategy != "autograd")
    need = an.needed()
    plan, kept = _strategy(an, strategy, need, parse_budget(budget), recompute_fraction)
    fw, bw = _partition(an, kept, set(plan.recomputed))
    return fw, bw, plan


def _partition(an: JointAnalysis, kept: list[fx.Node], recomputed: set[str]):
    syms = [n for n in an.nodes if n in an.fwd and is_sym_node(n)]
    # NOTE: a weight (or a view of one) is never passed as a saved value: the backward reads the parameter
    # itself (capture binds it by name) and redoes the free views, so any adapter's weights can be bound there
    passed: dict[fx.Node, None] = {}
    for n in kept:
        root = storage_root(n)
        passed[root if an.storage_kind(root) == "param" else n] = None
    fw, bw = partition_joint(an.captured, list(passed), syms)
    saved = {ph.name for ph in bw.graph.find_nodes(op="placeholder") if ph.meta["flexc_ref"].kind == "saved"}
    for gm, phase in ((fw, "forward"), (bw, "backward")):
        for n in gm.graph.nodes:
            if n.op == "output" or n.name not in an.fwd_names:
                continue
            if n.name in recomputed:
                n.meta[DECISION] = Decision.RECOMPUTE
            elif n.name in saved:
                n.meta[DECISION] = Decision.SAVE
            elif phase == "forward":
                n.meta[DECISION] = Decision.DROP
    return fw, bw


@define_pass("prune")
def prune(graph: CompiledGraph, ctx: PassContext) -> PruneReport:
    """Partition every trainable region for each strategy; install the one the budget selects."""
    budget = parse_budget(ctx.options.get("activation_budget"))
    fraction = parse_recompute_budget(ctx.options.get("recompute_budget", DEFAULT_RECOMPUTE_FRACTION))
    seq_len = int(ctx.options.get("seq_len", 2048))
    install = {"max": "pruned", "min": "checkpoint"}.get(budget[0], "pruned_remat")
    plans: dict[str, dict[str, RegionPlan]] = {}
    sweeps: dict[str, list[SweepPoint]] = {}
    met = True
    for name, region in graph.regions.items():
        if region.captured.joint is None or region.bw is None:
            continue
        plans[name] = {}
        original = JointAnalysis(region, seq_len, merge=False)
        merged = JointAnalysis(region, seq_len, merge=True)
        chosen = None
        for strategy in STRATEGIES:
            an = original if strategy == "autograd" else merged
            need = an.needed()
            plan, kept = _strategy(an, strategy, need, budget, fraction)
            plans[name][strategy] = plan
            if strategy == install:
                chosen = (an, kept, plan)
        sweeps[name] = merged.sweep(merged.needed())
        an, kept, plan = chosen
        if budget[0] == "bytes" and evaluate_at(plan.saved_bytes, seq_len) / seq_len > budget[1]:
            met = False
        fw, bw = _partition(an, kept, set(plan.recomputed))
        region.captured.fw, region.captured.bw = fw, bw
        annotate(region)
        logger.info("prune %s: %s saves %.0f B/token (autograd %.0f), recomputes %d nodes", name, install,
                    evaluate_at(plan.saved_bytes, seq_len) / seq_len,
                    evaluate_at(plans[name]["autograd"].saved_bytes, seq_len) / seq_len, len(plan.recomputed))
    budget_text = str(ctx.options.get("activation_budget") or "auto")
    return PruneReport(modified=bool(plans), budget=budget_text, recompute_budget=fraction, seq_len=seq_len,
                       installed=install, budget_met=met, regions=plans, sweeps=sweeps)
