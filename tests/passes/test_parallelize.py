"""The parallelize pass: adapter placements under a fixed base TP plan, costs, and the sharded graphs."""
import json

import pytest
import torch.fx as fx

import flexc
from flexc.ir.graph import NODE_INFO
from flexc.ir.sharded import collective_nodes, make_sharded_graph
from flexc.passes.parallelize import evaluate_region, region_inputs
from tests.utils import write_config

ROW = ("self_attn.o_proj", "mlp.down_proj")
COL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


def _compile(path, **kw):
    kw.setdefault("tokens", 2048)
    return flexc.compile(path, builtin_passes=("parallelize",), seq_len=16, **kw)


def _report(cm):
    return next(r.report for r in cm.passes if r.name == "parallelize")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("cfg"), "llama")


@pytest.fixture(scope="module")
def cm(cfg):
    return _compile(cfg, tp=2)


def test_tp1_is_a_no_op(cfg):
    """At tp=1 the pass reports tp=1 and modified=False."""
    rep = _report(_compile(cfg, tp=1, lora={"r": 4, "targets": ("down_proj",)}))
    assert rep.tp == 1 and rep.modified is False


def test_dependent_placements(cm):
    """Row-parallel base: A sharded on input, B replicated (lazy); column-parallel base: A replicated, B on output."""
    rep = _report(cm)
    assert rep.base_plan_source == "config"
    by_module = {a["module"]: a for a in rep.adapters}
    assert set(by_module) == set(ROW + COL)
    for m in ROW:
        assert by_module[m]["base"] == "rowwise"
        assert by_module[m]["choice"] == {"A": "shard_input", "B": "replicate", "reduce": "lazy"}
    for m in COL:
        assert by_module[m]["base"] == "colwise"
        assert by_module[m]["choice"]["A"] == "replicate" and by_module[m]["choice"]["B"] == "shard_output"


def test_dependent_comm_at_most_naive(cm):
    """Every adapter's communication, and each region's, is at most the naive plan's (and below it in total)."""
    rep = _report(cm)
    for a in rep.adapters:
        assert a["comm_bytes_per_token"] <= a["naive_comm_bytes_per_token"], a
    for r in rep.regions.values():
        assert r["comm_bytes_per_token"] <= r["naive_comm_bytes_per_token"]
    assert rep.totals["comm_bytes_per_token"] < rep.totals["naive_comm_bytes_per_token"]


def _fw_collectives(cm, name="layer.0"):
    return len(collective_nodes(_report(cm).sharded[name][0]))


def test_row_parallel_adapters_add_no_forward_collective(cfg, cm):
    """The forward graph with LoRA on o/down has as many collectives as the LoRA-free base; the naive plan more."""
    base = _compile(cfg, tp=2, lora=None)
    row = _compile(cfg, tp=2, lora={"r": 16, "targets": ("o_proj", "down_proj")})
    assert _fw_collectives(base) == 2                       # Megatron: one all-reduce per attention and MLP
    assert _fw_collectives(row) == _fw_collectives(base)
    assert _fw_collectives(cm) == _fw_collectives(base)     # all seven adapters: no extra forward collective
    region = row.regions["layer.0"]
    naive_fw, _ = evaluate_region(region, region_inputs(region, _report(row).base_plan, {}), 2, 2048,
                                  replicated=(".lora_",))   # the naive plan: adapters on whole tensors
    assert len(collective_nodes(make_sharded_graph(region.fw, naive_fw, 2))) > _fw_collectives(base)


def test_row_parallel_dB_is_all_reduced(cm):
    """In the backward, the gradient of o_proj's B is all-reduced (it comes from a Partial rank-r activation)."""
    _, bw = _report(cm).sharded["layer.0"]
    reduced = [n.args[0] for n in collective_nodes(bw) if "all_reduce" in str(n.target)]
    modules = [a.meta[NODE_INFO].module for a in reduced if isinstance(a, fx.Node) and NODE_INFO in a.meta]
    assert any(m.startswith("layer.self_attn.o_proj.lora_B") for m in modules), modules


def test_choice_depends_on_token_count(cfg):
    """At a few tokens the row-parallel adapter's reduction moves to the rank-r activation (eager), cheaper there."""
    rep = _report(_compile(cfg, tp=2, tokens=8, lora={"r": 16, "targets": ("o_proj",)}))
    (a,) = rep.adapters
    assert a["choice"]["reduce"] == "eager" and a["comm_bytes_per_token"] <= a["naive_comm_bytes_per_token"]


def test_placements_written_on_every_node(cm):
    """After the pass every tensor node of a layer graph has a placement in its NodeInfo."""
    region = cm.regions["layer.0"]
    for n in region.nodes():
        val = n.meta.get("val")
        if n.op != "output" and hasattr(val, "shape"):
            assert n.meta[NODE_INFO].placement is not None, n.name


def test_user_plan_file_and_bad_style(cfg, tmp_path):
    """A user plan file replaces the base plan (all replicated: no collectives); an unknown style is a ValueError."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers.*.mlp.down_proj": "replicate"}))
    rep = _report(_compile(cfg, tp=2, tp_plan=str(plan), lora={"r": 4, "targets": ("down_proj",)}))
    assert rep.base_plan_source == "user" and rep.regions["layer.0"]["forward_collectives"] == 0
    plan.write_text(json.dumps({"layers.*.mlp.down_proj": "diagonal"}))
    with pytest.raises(ValueError, match="diagonal"):
        _compile(cfg, tp=2, tp_plan=str(plan), lora={"r": 4, "targets": ("down_proj",)})


def test_tp_must_divide_heads(tmp_path):
    """tp that does not divide the KV heads is a ValueError naming the value."""
    path = write_config(tmp_path, "mistral")                 # 1 KV head
    with pytest.raises(ValueError, match="num_kv_heads=1"):
        _compile(path, tp=2, lora={"r": 4, "targets": ("down_proj",)})
