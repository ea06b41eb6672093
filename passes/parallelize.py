"""The ``parallelize`` pass: dependent parallelization of LoRA adapters over a fixed base TP plan.

The base model's tensor-parallel plan is fixed by inference: the user's plan
file (``ctx.options['tp_plan']``, JSON ``{"layers.*.self_attn.q_proj": "colwise", ...}``) if
given, else the model config's ``base_model_tp_plan``, else the Megatron default
(q/k/v/gate/up column-parallel, o/down row-parallel). For every adapter the pass
enumerates the placements of A and B (replicate, shard on input, shard on
output) and whether a Partial adapter result is reduced at once (``eager``:
an activation all-reduce) or left to flow (``lazy``: it joins the base's
reduction, or a weight gradient is reduced); each candidate is propagated
through the region's forward and backward graphs (:func:`flexc.ir.parallel.propagate`)
and scored by a cost model (a fixed latency per collective plus communication
bytes over link bandwidth plus per-rank FLOPs over peak throughput; bytes and
FLOPs are sympy in T, compared at ``tokens``; adapter memory per rank breaks ties). The cheapest is kept, and the region
graphs are copied with collectives inserted (``report.sharded``), which the
runtime (:mod:`flexc.runtime.distributed`) runs.

Expected outcome (tests/passes/test_parallelize.py): row-parallel base -> A
sharded on its input, B replicated, the adapter output joins the base's partial
sum before the base's all-reduce (no extra forward collective; dB all-reduced);
column-parallel base -> A replicated, B sharded on its output.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import json
import logging
import math
from typing import TYPE_CHECKING, Optional

import sympy
import torch.fx as fx

from flexc.ir.vocab import canonical, evaluate_at
from flexc.ir.graph import NODE_INFO
from flexc.ir.parallel import propagate
from flexc.ir.placements import Placement, Propagation, Replicate, Shard
from flexc.ir.sharded import collective_nodes, make_sharded_graph
from flexc.passes.manager import define_pass

if TYPE_CHECKING:
    from flexc.ir.graph import CompiledGraph, RegionGraph
    from flexc.passes.manager import PassContext

logger = logging.getLogger(__name__)

__all__ = ["parallelize", "ParallelizeReport", "AdapterChoice", "MEGATRON_PLAN", "make_base_plan",
           "evaluate_region", "region_inputs", "allowed_tp", "check_tp"]

MEGATRON_PLAN = {
    "layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise",
}
"""Megatron-style default base plan (module pattern -> style)."""

_STYLES = {"colwise": "colwise", "rowwise": "rowwise", "local_colwise": "colwise", "local_rowwise": "rowwise",
           "replicate": "replicate"}
_BASE_WEIGHT = {"colwise": Shard(0), "rowwise": Shard(1), "replicate": Replicate()}
_BASE_BIAS = {"colwise": Shard(0), "rowwise": Replicate(), "replicate": Replicate()}
_CHOICES = {"replicate": Replicate(), "shard_output": Shard(0), "shard_input": Shard(1)}
"""A placement of an adapter weight [out, in] by name: shard on output = Shard(0), on input = Shard(1)."""
_R = Replicate()


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterChoice:
    """Placements of one adapter's A [r, in] and B [out, r] and where a Partial adapter result is reduced."""

    A: str = "replicate"
    """``replicate``, ``shard_input`` (Shard(1)) or ``shard_output`` (Shard(0))."""
    B: str = "replicate"
    reduce: str = "whole"
    """``lazy``: a Partial result flows on (joins the base's reduction or is reduced as a weight gradient);
    ``eager``: it is all-reduced where the adapter produces it; ``whole``: the adapter computes on whole
    (gathered) tensors with its own collectives, the naive plan."""

    def to_dict(self) -> dict:
        return {"A": self.A, "B": self.B, "reduce": self.reduce}

    def __str__(self) -> str:
        return f"A {self.A}, B {self.B}, {self.reduce} reduce"


NAIVE = AdapterChoice()
"""The naive plan of one adapter: A and B replicated, computed on whole tensors."""
_START = AdapterChoice(A="replicate", B="replicate", reduce="lazy")
_CANDIDATES = [NAIVE] + [AdapterChoice(A=a, B=b, reduce=r) for a, b, r in
                         itertools.product(_CHOICES, _CHOICES, ("lazy", "eager"))]


@dataclasses.dataclass(kw_only=True)
class ParallelizeReport:
    """What the pass decided; ``sharded`` (the graphs each rank runs) is left out of plan.json."""

    tp: int
    modified: bool
    base_plan_source: str = ""
    """``user`` (options['tp_plan']), ``config`` (base_model_tp_plan) or ``megatron``."""
    base_plan: dict = dataclasses.field(default_factory=dict)
    tokens: int = 0
    """Token count T at which the cost model compared the candidates and the per-token numbers are given."""
    cost_model: dict = dataclasses.field(default_factory=dict)
    adapters: list = dataclasses.field(default_factory=list)
    """Per layer template and adapter: choice, comm bytes per token, the same for the naive plan."""
    regions: dict = dataclasses.field(default_factory=dict)
    totals: dict = dataclasses.field(default_factory=dict)
    placements: dict = dataclasses.field(default_factory=dict)
    """Region -> parameter FQN (inside the region) -> placement: which shard each rank loads."""
    sharded: dict = dataclasses.field(default_factory=dict)
    """Region -> (forward, backward) GraphModules with collectives (group: ``ir.sharded.GROUP_PLACEHOLDER``)."""

    def summary_lines(self) -> list[str]:
        """The tp section of ``flexc compile``'s summary: per adapter choice and comm, dependent vs naive."""
        if self.tp == 1:
            return []
        t = self.totals
        lines = [f"tensor parallel tp={self.tp} (base plan: {self.base_plan_source}), comm bytes/token at "
                 f"T={self.tokens}: {t['comm_bytes_per_token']:,.0f} total, "
                 f"naive {t['naive_comm_bytes_per_token']:,.0f}"]
        for a in self.adapters:
            c = a["choice"]
            lines.append(f"  {a['region']:<8} {a['module']:<17} {a['base']:<8} A {c['A']:<12} B {c['B']:<12} "
                         f"{c['reduce']:<5} {a['comm_bytes_per_token']:>10,.1f} B/token (naive "
                         f"{a['naive_comm_bytes_per_token']:,.1f})")
        return lines

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sharded"}
        d["placements"] = {r: {k: v.to_dict() for k, v in ps.items()} for r, ps in self.placements.items()}
        return d


# ------------------------------------------------------------------------------------------- base plan
def make_base_plan(graph: "CompiledGraph", options: dict) -> tuple[dict[str, str], str]:
    """(module pattern -> style, source): the user's plan file, else the config's, else Megatron's."""
    path = options.get("tp_plan")
    if path:
        try:
            with open(path) as f:
                plan = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"tp_plan {path!r}: cannot read a JSON plan ({e})") from e
        source = "user"
    else:
        plan, source = dict(graph.model.get("base_tp_plan") or {}), "config"   # recorded by capture (model_shape)
        if not plan:
            plan, source = dict(MEGATRON_PLAN), "megatron"
    if not isinstance(plan, dict):
        raise ValueError(f"tp plan must map module patterns to styles, got {type(plan).__name__}")
    for k, v in plan.items():
        if v not in _STYLES:
            raise ValueError(f"tp plan {k!r}: unsupported style {v!r}; allowed: {', '.join(_STYLES)}")
    return {k: _STYLES[v] for k, v in plan.items()}, source


def _style(plan: dict[str, str], proj: str) -> str:
    """Style of a projection (``self_attn.q_proj``) in a plan keyed by ``layers.*.self_attn.q_proj``."""
    key = f"layers.0.{proj}"
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(key, pattern) or pattern == proj:
            return style
    return "replicate"


# ------------------------------------------------------------------------------------------- regions
def _params(region: "RegionGraph") -> dict[str, str]:
    """Forward placeholder name -> parameter FQN (inside the region)."""
    return {p.name: p.meta["flexc_ref"].target for p in region.fw.graph.find_nodes(op="placeholder")
            if p.meta["flexc_ref"].kind == "param"}


def _adapters(params: dict[str, str]) -> list[str]:
    """Adapted projections of a layer region (``self_attn.q_proj``), in graph order."""
    out = []
    for fqn in params.values():
        if ".lora_A." in fqn:
            proj = fqn.split(".lora_A.")[0].removeprefix("layer.")
            if proj not in out:
                out.append(proj)
    return out


def _param_placement(fqn: str, plan: dict[str, str], choices: dict[str, AdapterChoice]) -> Placement:
    rel = fqn.removeprefix("layer.")
    for part, attr in ((".lora_A.", "A"), (".lora_B.", "B")):
        if part in rel:
            proj = rel.split(part)[0]
            return _CHOICES[getattr(choices.get(proj, NAIVE), attr)]
    if ".base_layer." in rel or rel.endswith("_proj.weight") or rel.endswith("_proj.bias"):
        proj = rel.split(".base_layer.")[0] if ".base_layer." in rel else rel.rsplit(".", 1)[0]
        style = _style(plan, proj)
        return (_BASE_BIAS if rel.endswith("bias") else _BASE_WEIGHT)[style]
    return _R


def region_inputs(region: "RegionGraph", plan: dict[str, str], choices: dict[str, AdapterChoice]
                  ) -> dict[str, Placement]:
    """Parameter FQN -> placement for one region under a base plan and adapter choices."""
    if not region.name.startswith("layer"):
        return {fqn: _R for fqn in _params(region).values()}
    return {fqn: _param_placement(fqn, plan, choices) for fqn in _params(region).values()}


def evaluate_region(region: "RegionGraph", by_fqn: dict[str, Placement], tp: int, tokens: int,
                    eager: tuple[str, ...] = (), replicated: tuple[str, ...] = (),
                    cache: Optional[dict] = None) -> tuple[Propagation, Optional[Propagation]]:
    """Propagate placements through a region's forward and backward graphs.

    Parameters are placed by ``by_fqn``, user inputs and outputs (and their gradients) are replicated;
    ``eager`` lists module prefixes whose Partial results are all-reduced at once, ``replicated`` module
    name parts whose nodes compute on whole tensors (the naive plan).
    """
    cache = {} if cache is None else cache
    names = _params(region)
    fw_in = {name: by_fqn[fqn] for name, fqn in names.items()}
    out_refs = region.fw.graph.find_nodes(op="output")[0].meta["flexc_ref"]

    def eager_reduce(n: fx.Node) -> bool:
        if not eager:
            return False
        info = n.meta.get(NODE_INFO)
        return info is not None and info.module.startswith(eager)

    def whole(n: fx.Node) -> bool:
        if not replicated:          # NOTE: the common case in the search; this runs for every node of every walk
            return False
        info = n.meta.get(NODE_INFO)
        return info is not None and any(part in info.module for part in replicated)

    fw = propagate(region.fw, fw_in, tp, outputs=lambda i, a: _R if out_refs[i].kind == "user" else None,
                   eager_reduce=eager_reduce, replicated=whole, tokens=tokens, cache=cache)
    if region.bw is None:
        return fw, None
    bw_in = {}
    for p in region.bw.graph.find_nodes(op="placeholder"):
        ref = p.meta["flexc_ref"]
        if ref.kind == "saved":
            bw_in[p.name] = fw.placements.get(p.name, _R)
        elif ref.kind == "param":                # NOTE: a weight the backward binds itself: as each rank holds it
            bw_in[p.name] = by_fqn.get(ref.target, _R)
        else:
            bw_in[p.name] = _R
    grad_refs = region.bw.graph.find_nodes(op="output")[0].meta["flexc_ref"]

    def grad_placement(i: int, a: fx.Node) -> Optional[Placement]:
        ref = grad_refs[i]
        if ref.kind != "grad":
            return None
        return by_fqn[ref.of.target] if ref.of.kind == "param" else _R

    bw = propagate(region.bw, bw_in, tp, outputs=grad_placement, eager_reduce=eager_reduce, replicated=whole,
                   tokens=tokens, cache=cache)
    return fw, bw


def _eager_prefixes(choices: dict[str, AdapterChoice]) -> tuple[str, ...]:
    return tuple(f"layer.{proj}.lora_" for proj, c in choices.items() if c.reduce == "eager")


def _whole_parts(choices: dict[str, AdapterChoice], adapters: list[str]) -> tuple[str, ...]:
    """Module-name parts of the adapters computed on whole tensors (no choice yet = naive)."""
    return tuple(f"layer.{proj}.lora_" for proj in adapters if choices.get(proj, NAIVE).reduce == "whole")


@dataclasses.dataclass
class _Eval:
    fw: Propagation
    bw: Optional[Propagation]
    region: "RegionGraph"

    def props(self) -> list[Propagation]:
        return [p for p in (self.fw, self.bw) if p is not None]

    def comm(self, pred=None) -> sympy.Expr:
        return sympy.Add(*[p.comm_bytes(pred) for p in self.props()])

    def flops(self) -> sympy.Expr:
        return sympy.Add(*[p.flops for p in self.props()])

    def num_blocking(self) -> int:
        """Collectives on the critical path: all but the weight-gradient reductions (those overlap with the
        rest of the backward and are only needed at the optimizer step)."""
        grads = _param_grad_outputs(self.region)
        n = sum(1 for r in self.fw.redistributions if r.nbytes != 0)
        if self.bw is not None:
            n += sum(1 for r in self.bw.redistributions
                     if r.nbytes != 0 and not (r.consumers and set(r.consumers) <= grads))
        return n


def _param_grad_outputs(region: "RegionGraph") -> set[str]:
    if region.bw is None:
        return set()
    refs = region.bw.graph.find_nodes(op="output")[0].meta["flexc_ref"]
    return {f"output.{i}" for i, r in enumerate(refs) if r.kind == "grad" and r.of.kind == "param"}


def _adapter_pred(region: "RegionGraph", proj: str):
    """Is a redistribution the adapter's own (made or consumed by its lora_A/lora_B nodes)?"""
    prefix = f"layer.{proj}.lora_"
    modules = {n.name: n.meta[NODE_INFO].module for n in region.nodes() if NODE_INFO in n.meta}

    def pred(r) -> bool:
        names = (r.producer,) + tuple(c for c in r.consumers if not c.startswith("output."))
        return any(modules.get(x, "").startswith(prefix) for x in names)
    return pred


def _adapter_memory(region: "RegionGraph", proj: str, choice: AdapterChoice, tp: int) -> int:
    """Per-rank bytes of the adapter's weights, fp32 gradient and two AdamW states."""
    total = 0
    for p in region.fw.graph.find_nodes(op="placeholder"):
        fqn = p.meta["flexc_ref"].target
        for part, attr in ((".lora_A.", "A"), (".lora_B.", "B")):
            if fqn.startswith(f"layer.{proj}{part}"):
                val = p.meta["val"]
                shard = getattr(choice, attr) != "replicate"
                total += val.numel() // (tp if shard else 1) * (val.element_size() + 12)
    return total


# ------------------------------------------------------------------------------------------- the pass
@define_pass("parallelize")
def parallelize(graph: "CompiledGraph", ctx: "PassContext") -> ParallelizeReport:
    """Choose adapter placements under the base TP plan and build the sharded region graphs."""
    tp = ctx.options.get("tp", 1) or 1
    check_tp(graph.model, tp)
    if tp == 1:
        return ParallelizeReport(tp=1, modified=False)
    plan, source = make_base_plan(graph, ctx.options)
    tokens = int(ctx.options.get("tokens") or ctx.options.get("seq_len") or 2048)
    cost = _CostModel(link_bandwidth=float(ctx.options.get("tp_link_bandwidth", 150e9)),
                      collective_latency=float(ctx.options.get("tp_collective_latency", 20e-6)),
                      peak_flops=float(ctx.options.get("tp_peak_flops", 300e12)), tokens=tokens)
    report = ParallelizeReport(tp=tp, modified=True, base_plan_source=source, base_plan=plan, tokens=tokens,
                               cost_model=dataclasses.asdict(cost))
    templates = graph.layer_templates()
    total = {"dependent": sympy.Integer(0), "naive": sympy.Integer(0)}
    for name, region in graph.regions.items():
        if name in templates:
            choices = _choose(region, plan, tp, cost, report)
        else:
            choices = {}
        by_fqn = region_inputs(region, plan, choices)
        adapters = _adapters(_params(region))
        ev = _Eval(*evaluate_region(region, by_fqn, tp, tokens, _eager_prefixes(choices),
                                    _whole_parts(choices, adapters)), region)
        naive = _Eval(*evaluate_region(region, region_inputs(region, plan, {}), tp, tokens,
                                       replicated=_whole_parts({}, adapters)), region)
        _write_placements(region, ev)
        fw = make_sharded_graph(region.fw, ev.fw, tp)
        bw = make_sharded_graph(region.bw, ev.bw, tp) if ev.bw is not None else None
        report.sharded[name] = (fw, bw)
        report.placements[name] = by_fqn
        n_layers = len(templates.get(name, [0]))
        report.regions[name] = {
            "layers": n_layers,
            "forward_collectives": len(collective_nodes(fw)),
            "backward_collectives": len(collective_nodes(bw)) if bw is not None else 0,
            "comm_bytes": str(canonical(ev.comm())),
            "comm_bytes_per_token": round(evaluate_at(ev.comm(), tokens) / tokens, 3),
            "naive_comm_bytes_per_token": round(evaluate_at(naive.comm(), tokens) / tokens, 3),
        }
        total["dependent"] += ev.comm() * n_layers
        total["naive"] += naive.comm() * n_layers
    adapters_dep = sum(a["comm_bytes_per_token"] * a["layers"] for a in report.adapters)
    adapters_naive = sum(a["naive_comm_bytes_per_token"] * a["layers"] for a in report.adapters)
    report.totals = {
        "comm_bytes_per_token": round(evaluate_at(total["dependent"], tokens) / tokens, 3),
        "naive_comm_bytes_per_token": round(evaluate_at(total["naive"], tokens) / tokens, 3),
        "adapter_comm_bytes_per_token": round(adapters_dep, 3),
        "naive_adapter_comm_bytes_per_token": round(adapters_naive, 3),
    }
    logger.info("parallelize: tp=%d, %d adapters placed, %.0f B/token (naive %.0f)", tp, len(report.adapters),
                report.totals["comm_bytes_per_token"], report.totals["naive_comm_bytes_per_token"])
    return report


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CostModel:
    """Seconds of one region's forward+backward at T=tokens: a latency per collective on the critical path
    (weight-gradient reductions overlap and pay only bandwidth), bytes over bandwidth, per-rank FLOPs at
    peak; adapter memory per rank breaks ties."""

    link_bandwidth: float
    """Bytes/s each rank sends (options['tp_link_bandwidth'], default 150e9)."""
    collective_latency: float
    """Seconds of fixed cost per collective (options['tp_collective_latency'], default 20e-6)."""
    peak_flops: float
    """FLOP/s of one rank (options['tp_peak_flops'], default 300e12)."""
    tokens: int
    """T at which the sympy costs are compared (options['tokens'], default seq_len)."""

    def seconds(self, ev: "_Eval") -> float:
        return (ev.num_blocking() * self.collective_latency + evaluate_at(ev.comm(), self.tokens) / self.link_bandwidth
                + evaluate_at(ev.flops(), self.tokens) / self.peak_flops)


_SPLIT_SIZES = ("num_heads", "num_kv_heads", "intermediate_size")
"""Model sizes (keys of ``CompiledGraph.model``) the Megatron plan splits over the ranks."""


def allowed_tp(model: dict) -> list[int]:
    """Tensor-parallel degrees that split every head count and the MLP width of ``model`` evenly."""
    sizes = [model[k] for k in _SPLIT_SIZES if model.get(k) is not None]
    g = math.gcd(*sizes) if sizes else 1
    return [d for d in range(1, g + 1) if g % d == 0]


def check_tp(model: dict, tp: int) -> None:
    """ValueError naming ``tp`` and the allowed degrees unless ``tp`` splits ``model``'s heads and MLP evenly."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    for key in _SPLIT_SIZES:
        v = model.get(key)
        if v is not None and v % tp:
            raise ValueError(f"tp={tp} does not divide {key}={v}; allowed tp for this model: "
                             f"{', '.join(map(str, allowed_tp(model)))}")


def _choose(region: "RegionGraph", plan: dict[str, str], tp: int, cost: "_CostModel",
            report: ParallelizeReport) -> dict[str, AdapterChoice]:
    """Coordinate descent over the adapters: each takes its cheapest admissible candidate with the others
    fixed; a second sweep runs if the first changed anything after the start."""
    tokens = cost.tokens
    params = _params(region)
    adapters = _adapters(params)
    choices: dict[str, AdapterChoice] = {}

    cache: dict = {}
    evals: dict[tuple, _Eval] = {}

    def run(ch: dict[str, AdapterChoice]) -> _Eval:
        key = tuple(ch.get(proj) for proj in adapters)      # a sweep meets the same assignment again
        if key not in evals:
            evals[key] = _Eval(*evaluate_region(region, region_inputs(region, plan, ch), tp, tokens,
                                                _eager_prefixes(ch), _whole_parts(ch, adapters), cache), region)
        return evals[key]

    naive = run({})
    preds = {proj: _adapter_pred(region, proj) for proj in adapters}
    limits = {proj: evaluate_at(naive.comm(preds[proj]), tokens) * (1 + 1e-9) for proj in adapters}
    # NOTE: start from adapters that reuse the base's layout (replicated weights used as local slices, lazy
    # reductions), not from the naive plan: a naive neighbour's gathers would make any choice look free
    choices = {proj: _START for proj in adapters}
    for _sweep in range(2):
        changed = False
        for proj in adapters:
            # only candidates that send at most the naive plan's bytes for this adapter are admissible
            # (the naive plan itself always is); among them the cost model picks
            best = None
            for cand in _CANDIDATES:
                ev = run({**choices, proj: cand})
                if evaluate_at(ev.comm(preds[proj]), tokens) > limits[proj]:
                    continue
                key = (round(cost.seconds(ev), 12), _adapter_memory(region, proj, cand, tp))
                if best is None or key < best[0]:
                    best = (key, cand)
            changed |= best[1] != choices[proj]
            choices[proj] = best[1]
        if not changed:
            break
    final = run(choices)
    n_layers = len(region.layers) or 1
    for proj in adapters:
        dep, nv = final.comm(preds[proj]), naive.comm(preds[proj])
        report.adapters.append({
            "region": region.name, "layers": n_layers, "module": proj, "base": _style(plan, proj),
            "choice": choices[proj].to_dict(),
            "comm_bytes": str(canonical(dep)),
            "comm_bytes_per_token": round(evaluate_at(dep, tokens) / tokens, 3),
            "naive_comm_bytes": str(canonical(nv)),
            "naive_comm_bytes_per_token": round(evaluate_at(nv, tokens) / tokens, 3),
        })
    return choices


def _write_placements(region: "RegionGraph", ev: _Eval) -> None:
    for prop, gm in ((ev.fw, region.fw), (ev.bw, region.bw)):
        if prop is None or gm is None:
            continue
        for n in gm.graph.nodes:
            info = n.meta.get(NODE_INFO)
            if info is not None:
                info.placement = prop.placements.get(n.name)
