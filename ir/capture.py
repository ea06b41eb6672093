"""Capture of one region module as joint forward + backward FX graphs.

This is the ONE module of flexc that touches private torch APIs (pinned to
torch==2.13.0); everything it returns is described with flexc's own types, so
the rest of the compiler never imports ``torch._*``.

Route (torch 2.13, transformers 5.x):

1. ``dynamo_graph_capture_for_export`` traces the region with FakeTensor
   example inputs whose token dimension is marked dynamic;
2. ``_extract_fake_inputs`` takes Dynamo's *symbolic* fakes (passing the
   original fakes to AOT silently gives a static graph), and
   ``_fakify_params_buffers`` re-fakes the parameters in Dynamo's fake mode;
3. ``aot_export_joint_with_descriptors`` builds the joint forward+backward graph
   with input/output descriptors, and ``aot_compile_joint_with_descriptors``
   partitions it with our ``partition_fn`` (which records the joint graph, so
   passes can re-partition it later with :func:`partition_joint`).

Invariant (tested in tests/ir/test_capture.py): run with real tensors after the
capture has finished, the forward graph returns what the region returns and the
backward graph returns the region's gradients, for any token count T.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import sympy
import torch
import torch.fx as fx
from torch import nn

# ---- private torch APIs (pinned: torch==2.13.0) -------------------------------------------------
from torch._dynamo.functional_export import dynamo_graph_capture_for_export
from torch._export.utils import _fakify_params_buffers
from torch._functorch._aot_autograd import descriptors as _desc
from torch._functorch.aot_autograd import (aot_compile_joint_with_descriptors,
                                           aot_export_joint_with_descriptors)
from torch._functorch.partitioners import _extract_fwd_bwd_modules, default_partition
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export._trace import _extract_fake_inputs
from torch.fx._graph_pickler import GraphPickler, Options
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from flexc.ir.vocab import CapturedRegion, InputKind, InputRef, OutputKind, OutputRef

__all__ = ["capture_region", "partition_joint", "fake_mode", "dump_captured", "load_captured", "compile_dynamic",
           "DynamicallyCompiled", "forget_inherited_compile_workers"]


def fake_mode() -> FakeTensorMode:
    """A FakeTensorMode in which weights of any size can be 'allocated' on the CPU device."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def _input_ref(desc: Any) -> InputRef:
    if isinstance(desc, _desc.ParamAOTInput):
        return InputRef(InputKind.PARAM, target=desc.target)
    if isinstance(desc, _desc.BufferAOTInput):
        return InputRef(InputKind.BUFFER, target=desc.target)
    if isinstance(desc, _desc.PlainAOTInput):
        return InputRef(InputKind.USER, index=desc.idx)
    if isinstance(desc, _desc.TangentAOTInput):
        out = desc.output
        return InputRef(InputKind.TANGENT, index=getattr(out, "idx", -1))
    raise NotImplementedError(f"flexc capture: unsupported graph input descriptor {desc!r}")


def _output_ref(desc: Any) -> OutputRef:
    if desc is None:
        return OutputRef(OutputKind.NONE)
    if isinstance(desc, _desc.PlainAOTOutput):
        return OutputRef(OutputKind.USER, index=desc.idx)
    if isinstance(desc, (_desc.SavedForBackwardsAOTOutput, _desc.SavedForBackwardsNoVcCheckAOTOutput)):
        return OutputRef(OutputKind.SAVED)
    if isinstance(desc, _desc.GradAOTOutput):
        return OutputRef(OutputKind.GRAD, of=_input_ref(desc.grad_of))
    raise NotImplementedError(f"flexc capture: unsupported graph output descriptor {desc!r}")


def _annotate(fw: fx.GraphModule, bw: Optional[fx.GraphModule]) -> None:
    """Translate torch's descriptors into flexc refs on placeholders/outputs (meta['flexc_ref'])."""
    for ph in fw.graph.find_nodes(op="placeholder"):
        ph.meta["flexc_ref"] = _input_ref(ph.meta["desc"])
    out = fw.graph.find_nodes(op="output")[0]
    out.meta["flexc_ref"] = [_output_ref(d) for d in out.meta["desc"]]
    if bw is None:
        return
    weights = {p.name: p.meta["flexc_ref"] for p in fw.graph.find_nodes(op="placeholder")
               if p.meta["flexc_ref"].kind in (InputKind.PARAM, InputKind.BUFFER)}
    for ph in bw.graph.find_nodes(op="placeholder"):
        d = ph.meta.get("desc")
        if isinstance(d, _desc.TangentAOTInput):
            ph.meta["flexc_ref"] = _input_ref(d)
        else:   # a weight the forward passes on is bound as that weight (any adapter's can be bound there)
            ph.meta["flexc_ref"] = weights.get(ph.name, InputRef(InputKind.SAVED, target=ph.name))
    out = bw.graph.find_nodes(op="output")[0]
    out.meta["flexc_ref"] = [_output_ref(d) for d in out.meta["desc"]]


def partition_joint(captured: CapturedRegion, saved_values: Sequence[fx.Node],
                    saved_sym_nodes: Sequence[fx.Node]) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split the joint graph into forward/backward graphs that pass exactly ``saved_values``.

    Any forward node the backward needs and that is computable from the saved
    values is copied into the backward graph (that is recomputation). The
    returned graphs carry ``flexc_ref`` annotations like the captured ones.
    """
    assert captured.joint is not None, "forward-only regions have nothing to partition"
    fw, bw = _extract_fwd_bwd_modules(captured.joint, list(saved_values), saved_sym_nodes=list(saved_sym_nodes),
                                      num_fwd_outputs=captured.num_fwd_outputs)
    for g in (fw, bw):
        g.graph.eliminate_dead_code()
        g.recompile()
        # the extracted placeholders share their meta dicts with the joint graph's: give each its own, so that
        # annotating a saved primal (a norm weight, cu_seqlens) as "saved" cannot rewrite its forward binding
        for ph in g.graph.find_nodes(op="placeholder"):
            ph.meta = dict(ph.meta)
    _copy_descs(captured.fw, fw)
    _annotate(fw, bw)
    return fw, bw


def _copy_descs(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    # _extract_fwd_bwd_modules keeps placeholder descs but builds output descs from the joint; make sure the
    # forward placeholders keep the same descriptors as the captured forward graph
    by_name = {p.name: p for p in src.graph.find_nodes(op="placeholder")}
    for ph in dst.graph.find_nodes(op="placeholder"):
        if "desc" not in ph.meta and ph.name in by_name:
            ph.meta["desc"] = by_name[ph.name].meta["desc"]


def _token_exprs(gm: fx.GraphModule, shape_env: Any, token_inputs: Sequence[int]) -> list[sympy.Expr]:
    exprs = []
    for ph in gm.graph.find_nodes(op="placeholder"):
        d = ph.meta.get("desc")
        if isinstance(d, _desc.PlainAOTInput) and d.idx in token_inputs:
            size = ph.meta["val"].shape[0]
            if isinstance(size, torch.SymInt):
                exprs.append(shape_env.simplify(size.node.expr))
    return exprs


def capture_region(region: nn.Module, example_args: Sequence[torch.Tensor], *,
                   dynamic_inputs: Sequence[int], token_inputs: Sequence[int],
                   trainable: bool) -> CapturedRegion:
    """Capture ``region(*example_args)`` as forward (+ backward) graphs with a symbolic token count.

    ``example_args`` are FakeTensors (any fake mode); dim 0 of each input in
    ``dynamic_inputs`` is symbolic, and inputs in ``token_inputs`` have the
    token count T as dim 0. With ``trainable`` the region is captured as a
    joint graph and partitioned with torch's default partition (passes may
    re-partition it with :func:`partition_joint`); otherwise only a forward
    graph is produced.

    Example: a decoder layer region ``(h[T,H], cos[T,D], sin[T,D], cu[N+1])``
    with ``dynamic_inputs=(0,1,2,3)``, ``token_inputs=(0,1,2)``.
    """
    seconds: dict[str, float] = {}
    torch._dynamo.reset()   # Dynamo keeps automatic-dynamic state per code object: reset before every capture
    for i in dynamic_inputs:
        torch._dynamo.mark_dynamic(example_args[i], 0)
    t0 = time.perf_counter()
    # NOTE: FakeTensor's dispatch cache does not pay here: nearly every op of a region meets new symbolic
    # shapes, and building the entries cost about 10% of a decoder layer's capture
    with torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
        gm = dynamo_graph_capture_for_export(region)(*example_args)
    seconds["dynamo"] = time.perf_counter() - t0
    dyn_mode = gm.meta["fake_mode"]
    fake_args, _, _ = _extract_fake_inputs(gm, tuple(example_args), {})
    fake_params = _fakify_params_buffers(dyn_mode, gm)

    rec: dict[str, Any] = {}

    def partition_fn(joint, joint_inputs, *, num_fwd_outputs, **kwargs):
        rec["joint"], rec["num_fwd_outputs"] = joint, num_fwd_outputs
        return default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)

    def grab(key):
        def compiler(g, _example_inputs):
            rec[key] = g
            return _boxed(g)
        return compiler

    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.nn.utils.stateless._reparametrize_module(
            gm, fake_params, tie_weights=True, strict=True, stack_weights=True))
        stack.enter_context(torch._guards.tracing(torch._guards.TracingContext(dyn_mode)))
        grad_ctx = contextlib.nullcontext() if trainable else torch.no_grad()
        with grad_ctx:
            jd = aot_export_joint_with_descriptors(stack, gm, tuple(fake_args))
            seconds["joint"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            # NOTE: with logging on (the default), stage 2 renders the joint, forward and backward graphs as text
            # for torch's structured log whether or not anything reads it: 0.2 s of a decoder layer's capture
            jd._aot_state.aot_config = dataclasses.replace(jd._aot_state.aot_config, enable_log=False)
            aot_compile_joint_with_descriptors(jd, partition_fn=partition_fn,
                                               fw_compiler=grab("fw"), bw_compiler=grab("bw"))
    # NOTE: the graphs may only be run with real tensors after the ExitStack closed (inside it, Dynamo's
    # fake mode silently turns real inputs into FakeTensors).
    seconds["partition"] = time.perf_counter() - t0
    fw, bw = rec["fw"], rec.get("bw")
    if trainable and bw is None:
        raise ValueError("region has nothing trainable: no parameter or input requires grad")
    _annotate(fw, bw)
    num_user = sum(1 for r in fw.graph.find_nodes(op="output")[0].meta["flexc_ref"] if r.kind is OutputKind.USER)
    return CapturedRegion(
        fw=fw, bw=bw, joint=rec.get("joint"), num_fwd_outputs=rec.get("num_fwd_outputs", num_user),
        num_user_outputs=num_user, token_exprs=_token_exprs(fw, dyn_mode.shape_env, token_inputs),
        shape_env=dyn_mode.shape_env, seconds=seconds)


def dump_captured(captured: CapturedRegion) -> bytes:
    """``captured`` as bytes: its graphs with every node's metadata (FakeTensor values with their symbolic
    shapes, descriptors, flexc refs) and the shape environment they share. Dump before passes annotate it.

    NOTE: this is a pickle (torch's GraphPickler, which also keeps flexc's own ops): load only bytes this
    machine's user wrote.
    """
    keep_all = Options(ops_filter=None, node_metadata_key_filter=None)   # flexc's ops; module stacks name roles
    with _module_stacks_as_names(captured):
        return GraphPickler.dumps(dataclasses.replace(captured, seconds={}), keep_all)


_STACK_KEYS = ("nn_module_stack", "fwd_nn_module_stack")


@contextlib.contextmanager
def _module_stacks_as_names(captured: CapturedRegion):
    """While dumping, the module classes in the nodes' module stacks are their qualified names: flexc reads only
    the paths (:func:`flexc.ir.graph.module_fqn`), and a class would make loading import its module (PEFT's and
    the model's, 0.5 s)."""
    saved = []
    for g in (captured.fw, captured.bw, captured.joint):
        for n in g.graph.nodes if g is not None else ():
            for key in _STACK_KEYS:
                stack = n.meta.get(key)
                if stack:
                    saved.append((n.meta, key, stack))
                    n.meta[key] = {k: (path, cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}")
                                   for k, (path, cls) in stack.items()}
    try:
        yield
    finally:
        for meta, key, stack in saved:
            meta[key] = stack


def load_captured(data: bytes) -> CapturedRegion:
    """The :class:`CapturedRegion` :func:`dump_captured` wrote, in a fresh fake mode and shape environment,
    with runnable graphs (regenerated from the graphs, as the capture made them)."""
    t0 = time.perf_counter()
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)     # torch's own pytree deprecation, inside loads
        captured = GraphPickler.loads(data, mode)
    if not isinstance(captured, CapturedRegion):
        raise ValueError(f"not a captured region: {type(captured).__name__}")
    for g in (captured.fw, captured.bw, captured.joint):
        if g is not None:
            g.recompile()
    captured.seconds = {"load": time.perf_counter() - t0}
    return captured


def compile_dynamic(gm: fx.GraphModule, *, token_args: Sequence[int] = (),
                    before_first_call: Optional[Callable[[], None]] = None,
                    after_first_compile: Optional[Callable[[], None]] = None) -> "DynamicallyCompiled":
    """``gm`` through ``torch.compile`` (Inductor), compiled once for every batch size.

    A serving graph's inputs change size every iteration (tokens, sequences, segments, finetuning rows); with
    ``dynamic=True`` alone Dynamo still specializes sizes it first sees as 0 or 1 and ties sizes that happen to
    be equal ("duck sizing"), so batches with no finetuning rows, one sequence or as many segments as sequences
    each recompiled (six compiles in one co-serving test). Each call runs with both turned off.

    ``token_args``: the arguments whose dim 0 is the batch's token count. It is compiled as a size nothing may be
    assumed of ("unbacked"); otherwise Inductor's lowering of a view guards on it being above 1, and the first
    batch of one token (one sequence decoding) compiled the graph a second time (about 10 s for a tiny layer on
    this CPU, in the middle of serving).

    ``before_first_call`` runs once, before the first call; ``after_first_compile`` once, when Inductor has
    compiled the graph and before the compiled code first runs. Tensor-parallel ranks take turns with them:
    rank 0 compiles first, the other ranks wait and then find its kernels in Inductor's on-disk cache (their
    graphs are the same), instead of every rank compiling the same kernels at once.
    """
    return DynamicallyCompiled(gm, tuple(token_args), before_first_call, after_first_compile)


class DynamicallyCompiled:
    """A graph compiled by :func:`compile_dynamic` (call it as the graph); ``compiles`` counts Inductor's compiles
    of it so far."""

    def __init__(self, gm: fx.GraphModule, token_args: tuple[int, ...],
                 before_first_call: Optional[Callable[[], None]], after_first_compile: Optional[Callable[[], None]]):
        self.compiles = 0
        self._token_args, self._before, self._after = token_args, before_first_call, after_first_compile
        self._first = True
        self._compiled = torch.compile(gm, dynamic=True, fullgraph=True, backend=_CountingInductor(self))

    def compiled_once_more(self) -> None:
        """Called by the backend after each compile, before the compiled code runs."""
        self.compiles += 1
        if self._after is not None:
            after, self._after = self._after, None
            after()

    def __call__(self, *args: Any) -> Any:
        from torch.fx.experimental import _config as shape_config
        if self._first:
            self._first = False
            if self._before is not None:
                self._before()
            for j in self._token_args:
                torch._dynamo.decorators.mark_unbacked(args[j], 0)
        with shape_config.patch(use_duck_shape=False, backed_size_oblivious=True):
            return self._compiled(*args)


class _CountingInductor(torch._TorchCompileInductorWrapper):
    """torch.compile's own Inductor backend (same options, same cache keys) that tells ``owner`` of each compile."""

    def __init__(self, owner: DynamicallyCompiled):
        super().__init__(None, None, True)
        self._owner = owner

    def __call__(self, model_: Any, inputs_: Any, **kwargs: Any) -> Any:
        out = super().__call__(model_, inputs_, **kwargs)
        self._owner.compiled_once_more()
        return out


def forget_inherited_compile_workers() -> None:
    """Call first thing in a process forked from one that compiled with Inductor.

    Inductor compiles its C++ kernels on a thread pool it creates once per process (and never resets at fork,
    unlike its process pool). A forked child inherits the pool object without its threads, so its first kernel
    compile would wait forever. Dropping the pool makes the child create its own. Nothing to do when the parent
    never imported Inductor's compiler (a spawned process, or one that ran eagerly)."""
    async_compile = sys.modules.get("torch._inductor.async_compile")
    if async_compile is not None:
        async_compile.AsyncCompile.pool.cache_clear()


def _boxed(g: fx.GraphModule):
    from functorch.compile import make_boxed_func
    return make_boxed_func(g.forward)
