"""Activation stores: saved values classified from the graph, filled chunk by chunk = the full-sequence saved values."""
from types import SimpleNamespace

import pytest
import sympy
import torch

from flexc.ir.vocab import TOKEN_SYMBOL, evaluate_at
from flexc.runtime.activations import ActivationStore, SavedSlot
from flexc.runtime.sequence import make_layouts
from tests.runtime.utils import TinyServing
from tests.utils import rel_err

L = 13
"""Length of the finetuning sequence."""


@pytest.fixture()
def serving(tiny_llama):
    return TinyServing(tiny_llama.cm, tiny_llama.model)


@pytest.fixture()
def runner(serving):
    return serving.runner


def _saved_at(runner, n: int, seed: int):
    """Layer 0's saved values for a batch of two sequences of n tokens in all."""
    g = torch.Generator().manual_seed(seed)
    ids, pos = torch.randint(0, 256, (n,), generator=g), torch.cat([torch.arange(3), torch.arange(n - 3)])
    cu = torch.tensor([0, 3, n], dtype=torch.int32)
    h, cos, sin = runner.embed_forward(ids, pos)
    _, (saved,) = runner.layers_forward(h, cos, sin, cu, layers=[0], keep_saved=True)
    return saved, cu


def test_layout_classifies_what_varies_with_the_token_count(runner):
    """Run at 7 and at 12 tokens: 'rows' values grow k*T along their token dim (the rest equal), 'static' ones keep
    their shape, 'symint' ones equal their expression at T, and 'cu_seqlens' is the batch's cu_seqlens; no weight is
    saved (the backward binds weights itself)."""
    layout = make_layouts(runner)[0]
    (a, cu_a), (b, cu_b) = _saved_at(runner, 7, 0), _saved_at(runner, 12, 1)
    kinds = {s.kind for s in layout.slots}
    assert "rows" in kinds and "static" not in kinds and len(layout.slots) == len(a) == len(b)
    for slot, x, y in zip(layout.slots, a, b):
        if slot.kind == "rows":
            assert x.shape[slot.dim] == 7 * slot.per_token and y.shape[slot.dim] == 12 * slot.per_token
            assert [d for i, d in enumerate(x.shape) if i != slot.dim] == \
                [d for i, d in enumerate(y.shape) if i != slot.dim]
        elif slot.kind == "static":
            assert not isinstance(x, torch.Tensor) or x.shape == y.shape
        elif slot.kind == "symint":
            assert (x, y) == (int(slot.expr.subs(TOKEN_SYMBOL, 7)), int(slot.expr.subs(TOKEN_SYMBOL, 12)))
        else:
            assert slot.kind == "cu_seqlens" and torch.equal(x, cu_a) and torch.equal(y, cu_b)


class _Recorder:
    """What the executor calls for a finetuning chunk, writing into an ActivationStore."""

    def __init__(self, store: ActivationStore):
        self.store = store

    def record_layer(self, layer, saved, rows, position):
        self.store.write(layer, saved, rows, position)

    def record_output(self, hidden, rows, position):
        pass


def test_chunked_store_equals_full_sequence_saved_values(serving, runner):
    """A 13-token sequence run in chunks of 5, 5 and 3, each beside another request's tokens in the batch, leaves
    in the store exactly what one full-sequence forward saves (1e-5), every layer, and the backward from the store
    gives the full-sequence gradients."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (L,), generator=g).tolist()
    other = torch.randint(0, 256, (12,), generator=g).tolist()
    store = ActivationStore(make_layouts(runner), L)
    rec = _Recorder(store)
    for k, (a, b) in enumerate([(0, 5), (5, 10), (10, L)]):
        chunks = [("other", other[4 * k:4 * k + 4], list(range(4 * k, 4 * k + 4)), None),
                  ("ft", ids[a:b], list(range(a, b)), rec)]
        if k == 1:
            chunks.reverse()                                  # the finetuning rows first in the batch once
        assert not store.complete(0)
        serving.run(chunks)
    h, cos, sin = runner.embed_forward(torch.tensor(ids), torch.arange(L))
    _, full = runner.layers_forward(h, cos, sin, torch.tensor([0, L], dtype=torch.int32), keep_saved=True)
    for layer, want in enumerate(full):
        assert store.complete(layer)
        got = store.backward_inputs(layer)
        for slot, x, y in zip(store.layouts[layer].slots, got, want):
            if isinstance(y, torch.Tensor):
                assert x.shape == y.shape and x.dtype == y.dtype, slot
                assert rel_err(x.float(), y.float()) < 1e-5 if y.is_floating_point() else torch.equal(x, y)
            else:
                assert x == y, slot
        dh = torch.randn(L, 64, generator=g)
        g_store = runner.layer_backward(layer, got, dh)[1]
        g_full = runner.layer_backward(layer, want, dh)[1]
        assert max(rel_err(g_store[k], v) for k, v in g_full.items()) < 1e-5


class _Keeping(_Recorder):
    """A recorder that also keeps the saved lists the forward handed over."""

    def __init__(self, store: ActivationStore):
        super().__init__(store)
        self.handed: dict[int, list] = {}

    def record_layer(self, layer, saved, rows, position):
        self.handed[layer] = list(saved)
        super().record_layer(layer, saved, rows, position)


def test_one_chunk_sequence_keeps_the_forward_outputs(serving, runner):
    """A sequence whose forward is one chunk alone in its batch keeps the forward's own token tensors (no copy),
    and its backward from the store still gives the full-sequence gradients."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 256, (L,), generator=g).tolist()
    store = ActivationStore(make_layouts(runner), L)
    rec = _Keeping(store)
    serving.run([("ft", ids, list(range(L)), rec)])
    h, cos, sin = runner.embed_forward(torch.tensor(ids), torch.arange(L))
    _, full = runner.layers_forward(h, cos, sin, torch.tensor([0, L], dtype=torch.int32), keep_saved=True)
    for layer, want in enumerate(full):
        got = store.backward_inputs(layer)
        kept = [i for i, slot in enumerate(store.layouts[layer].slots)
                if slot.kind == "rows" and got[i] is rec.handed[layer][i]]
        assert kept, f"layer {layer}: every token tensor was copied"
        dh = torch.randn(L, 64, generator=g)
        g_store = runner.layer_backward(layer, got, dh)[1]
        g_full = runner.layer_backward(layer, want, dh)[1]
        assert max(rel_err(g_store[k], v) for k, v in g_full.items()) < 1e-5


def test_nbytes_counts_distinct_storages_as_the_plan_predicts(serving, runner):
    """The filled store holds, per layer, the bytes the installed plan saves at T = the sequence length, shared
    inputs (cos, sin) included as the store keeps them per layer, cu_seqlens excluded (rebuilt as [0, L]); a value
    saved twice under one view is stored once."""
    layouts = make_layouts(runner)
    store = ActivationStore(layouts, L)
    rec = _Recorder(store)
    serving.run([("ft", list(range(L)), list(range(L)), rec)])
    plan = runner.compiled.passes[0].report.regions["layer.0"][runner.compiled.passes[0].report.installed]
    token_sized = [v for v in plan.saved if any(TOKEN_SYMBOL in sympy.sympify(d).free_symbols for d in v.shape)]
    cu_bytes = evaluate_at(plan.saved_bytes + plan.shared_bytes - sum(v.nbytes for v in token_sized), L)
    assert cu_bytes == 4 * 2                                  # only cu_seqlens (N+1 = 2) is not token-sized
    assert store.nbytes() == 3 * evaluate_at(sum(v.nbytes for v in token_sized), L)
    # the same tensor twice in the saved list: one buffer, counted once
    twice = ActivationStore([SimpleNamespace(slots=[SavedSlot("rows", dim=0)] * 2)], 4)
    x = torch.randn(4, 64)
    twice.write(0, [x, x], (0, 4), 0)
    assert twice.nbytes() == x.numel() * 4
    twice.release(0)
    assert twice.nbytes() == 0


def test_store_refuses_overruns_and_incomplete_backward(runner):
    """A chunk past the sequence end, or a backward before the forward covered every token, is a ValueError."""
    store = ActivationStore(make_layouts(runner), 4)
    with pytest.raises(ValueError, match="runs past the sequence length 4"):
        store.write(0, [], (0, 5), 0)
    with pytest.raises(ValueError, match="forward covered 0 of 4 tokens"):
        store.backward_inputs(0)
