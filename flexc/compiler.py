"""``flexc.compile``: capture a model with its LoRA adapters into region graphs and run the passes.

The compiled artifact (:class:`CompiledModel`) holds the annotated region
graphs, the pass records and ``plan.json``'s content. Nothing here needs the
model's weights: capture runs on FakeTensors, so a 32B preset compiles on a
laptop.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence

import torch

from flexc.capture_cache import CaptureCache, capture_key
from flexc.ir.artifact import CompiledModel, model_shape
from flexc.ir.capture import capture_region, fake_mode
from flexc.ir.graph import CompiledGraph, RegionGraph, annotate
from flexc.ir.regions import TOKEN_INPUTS, EmbedRegion, HeadRegion, LayerRegion, LogitsRegion, causal_lm_parts
from flexc.ir.spec import LoraSpec, ModelSource, parse_dtype
from flexc.models import DEFAULT_MODEL, FakeTemplates, build_fake_templates, resolve_model
from flexc.passes.manager import PassContext, PassManager

logger = logging.getLogger(__name__)

__all__ = ["compile", "capture_model", "DEFAULT_PASSES"]

DEFAULT_PASSES: tuple[str, ...] = ("prune", "memory", "parallelize", "serve")
"""Built-in pipeline run before user passes. NOTE: serve runs last: it builds the serving graphs from the
partition prune installed and, at tp > 1, from the sharded graphs parallelize made."""


CAPTURE_TOKENS = 61
"""The token count of the example inputs a region is captured with. The token dimension is symbolic in the
graphs, so any count gives the same graphs (tested); one count for every ``seq_len`` lets compiles that differ
only in ``seq_len`` share the capture cache's entries. A prime, so that it equals no model dimension (a
size Dynamo saw equal to a constant could be specialized)."""


def _example_inputs(cfg: Any, mode: Any, dtype: torch.dtype):
    T = CAPTURE_TOKENS
    hidden = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    cu = [0, T // 2, T]                                   # values are invisible to capture (opaque op)
    with mode:
        ids = torch.zeros(T, dtype=torch.long)
        pos = torch.zeros(T, dtype=torch.long)
        h = torch.empty(T, hidden, dtype=dtype, requires_grad=True)
        cos = torch.empty(T, head_dim, dtype=dtype)
        sin = torch.empty(T, head_dim, dtype=dtype)
        cu_t = torch.tensor(cu, dtype=torch.int32)
        labels = torch.zeros(T, dtype=torch.long)
    return ids, pos, h, cos, sin, cu_t, labels


def _arg_spec(t: torch.Tensor) -> list:
    return [list(t.shape), str(t.dtype), bool(t.requires_grad)]


def _model_facts(fake: FakeTemplates) -> dict:
    return {"members": fake.members, "parameters": fake.parameters,
            "trainable_parameters": fake.trainable_parameters}


def capture_model(source: ModelSource, lora: Optional[LoraSpec], dtype: str,
                  cache: Optional[CaptureCache] = None,
                  progress: Optional[Callable[[str], None]] = None) -> CompiledGraph:
    """Capture embed, one template per distinct decoder-layer structure, head and logits regions (each loaded
    from ``cache`` instead when it holds the same capture, and kept there otherwise). ``progress`` is called
    with a line per region as it is done (a capture takes seconds).

    NOTE: when the cache holds the model's facts (which layers share a template, parameter counts) and every
    region, no model is built at all: the FakeTensor model (and PEFT) is only made for what must be captured.
    """
    cache = cache or CaptureCache(None)
    mode = fake_mode()
    ids, pos, h, cos, sin, cu, labels = _example_inputs(source.config, mode, parse_dtype(dtype))
    trainable = lora is not None
    model_parts = {"config": source.config.to_dict(), "lora": lora.to_dict() if lora else None, "dtype": dtype}
    built: list[FakeTemplates] = []

    def templates() -> FakeTemplates:
        if not built:
            built.append(build_fake_templates(source, lora, dtype, mode))
        return built[0]

    facts_key = capture_key({**model_parts, "region": "model facts"})
    facts = cache.load_facts(facts_key)
    if facts is None or set(facts) != {"members", "parameters", "trainable_parameters"}:
        facts = _model_facts(templates())
        cache.store_facts(facts_key, facts)
    members: list[list[int]] = facts["members"]
    regions: dict[str, RegionGraph] = {}

    def add(name: str, kind: str, module_of, args, grad: bool, layers=()):
        t0 = time.perf_counter()
        key = capture_key({**model_parts, "region": name, "kind": kind, "trainable": grad,
                           "args": [_arg_spec(a) for a in args]})
        cap = cache.load(key)
        if cap is None:
            cap = capture_region(module_of(causal_lm_parts(templates().model)), args,
                                 dynamic_inputs=range(len(args)), token_inputs=TOKEN_INPUTS[kind], trainable=grad)
            cache.store(key, cap)
        how = "loaded" if "load" in cap.seconds else "captured"
        regions[name] = annotate(RegionGraph(name=name, captured=cap, layers=list(layers)))
        seconds = time.perf_counter() - t0
        logger.info("%s %s in %.2f s (%d fw nodes)", how, name, seconds, len(cap.fw.graph.nodes))
        if progress is not None:
            progress(f"{name:<10} {how} in {seconds:.1f} s")

    add("embed", "embed", EmbedRegion, (ids, pos), False)
    # NOTE: one template per equivalence class of layers; the signature holds every constant a capture bakes in
    layer_regions = [""] * source.config.num_hidden_layers
    for k, group in enumerate(members):
        name = f"layer.{group[0]}"
        add(name, "layer", lambda lm, k=k: LayerRegion(lm.model.layers[k]), (h, cos, sin, cu), trainable, group)
        for i in group:
            layer_regions[i] = name
    add("head", "head", HeadRegion, (h, labels), trainable)
    add("logits", "logits", LogitsRegion, (h,), False)
    model = {**model_shape(source), "dtype": dtype, "parameters": facts["parameters"],
             "trainable_parameters": facts["trainable_parameters"]}
    return CompiledGraph(regions=regions, layer_regions=layer_regions, model=model,
                         lora=lora.to_dict() if lora else None)


def compile(model: Any = DEFAULT_MODEL, *, lora: Any = True, dtype: Optional[str] = None, seq_len: int = 2048,
            passes: Sequence[Any] = (), builtin_passes: Optional[Sequence[str]] = None, cache: bool = True,
            progress: Optional[Callable[[str], None]] = None, **options: Any) -> CompiledModel:
    """Capture ``model`` (name, path or :class:`ModelSource`) with LoRA and run the pass pipeline.

    ``lora``: True (r=16, alpha=16, all seven projections), a :class:`LoraSpec`, a dict of its fields,
    a ``peft.LoraConfig``, or None for the base model only. ``dtype`` defaults to bf16 for presets and
    fp32 for models with weights. ``passes`` are user passes run after the built-ins; ``options``
    reach every pass as ``ctx.options`` (e.g. ``activation_budget``, ``device_memory``, ``tp``). ``cache``:
    load regions captured before from the capture cache (:mod:`flexc.capture_cache`) and keep new ones there.
    ``progress``: called with a line per region captured or loaded (``flexc compile`` prints them).
    """
    t0 = time.perf_counter()
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    spec = LoraSpec.coerce(lora)
    dtype = dtype or ("bf16" if source.kind == "preset" else "fp32")
    parse_dtype(dtype)
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    graph = capture_model(source, spec, dtype, CaptureCache.default(cache), progress)
    pipeline = list(DEFAULT_PASSES if builtin_passes is None else builtin_passes) + list(passes)
    ctx = PassContext(options={"seq_len": seq_len, "dtype": dtype, **options})
    records = PassManager(pipeline).run(graph, ctx)
    return CompiledModel(source=source, lora=spec, dtype=dtype, seq_len=seq_len, graph=graph, passes=records,
                         compile_seconds=time.perf_counter() - t0, options=ctx.options)

