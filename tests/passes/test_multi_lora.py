"""The multi-LoRA rewrite: one flexc::lora node per adapted linear, the captured graph's outputs per segment."""
import pytest
import torch
import torch.fx as fx

import flexc
from flexc.ir.vocab import InputKind, InputRef
from flexc.ir.program import RegionProgram
from flexc.ir.spec import LoraSpec
from flexc.models import load_model, resolve_model
from flexc.passes.multi_lora import branch_internals, rewrite_multi_lora
from flexc.runtime.regions import RegionRunner
from tests.utils import packed_batch, rel_err, write_config

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _inference_copy(program: RegionProgram) -> fx.Graph:
    """The layer's forward graph returning only the region output (what the executor rewrites)."""
    g = fx.Graph()
    env = {}
    for n in program.fw.graph.nodes:
        if n.op == "output":
            g.output(tuple(env[n.args[0][i]] for i in program.user_idx))
        else:
            env[n] = g.node_copy(n, lambda x: env[x])
    g.eliminate_dead_code()
    return g


def _lora_nodes(g: fx.Graph) -> list[fx.Node]:
    return [n for n in g.nodes if n.op == "call_function" and n.target is torch.ops.flexc.lora.default]


@pytest.mark.parametrize("arch,dtype,targets", [("llama", "fp32", ALL), ("qwen2", "fp32", ("q_proj", "v_proj",
                                                                                            "down_proj")),
                                                ("llama", "bf16", ALL)])
def test_one_lora_op_per_adapted_linear(tmp_path, arch, dtype, targets):
    """Every adapted linear becomes exactly one flexc::lora node; no lora_A/lora_B parameter or matmul is left
    (fp32 and bf16 with fp32 adapters, with and without biases)."""
    src = resolve_model(write_config(tmp_path, arch, num_hidden_layers=1))
    cm = flexc.compile(src, lora=LoraSpec(r=4, alpha=8, targets=targets), dtype=dtype, seq_len=16)
    r = cm.regions["layer.0"]
    g = _inference_copy(RegionProgram(r.fw, r.bw))
    report = rewrite_multi_lora(g)
    assert report.modified and report.num_lora_ops == len(targets) == len(_lora_nodes(g))
    assert sorted(report.linears) == sorted(f"layer.{'mlp' if t in ALL[4:] else 'self_attn'}.{t}" for t in targets)
    assert set(report.scaling.values()) == {2.0}
    refs = [p.meta["flexc_ref"] for p in g.find_nodes(op="placeholder")]
    assert not any(".lora_" in x.target for x in refs if x.kind == "param")
    assert [x.kind for x in refs].count(InputKind.LORA_A_STACK) == len(targets) and [x.kind for x in refs].count(InputKind.SEG_STARTS) == 1
    mms = [n for n in g.nodes if n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)]
    assert len(mms) == 7                                          # only the seven base linears are left
    assert report.num_nodes_after < report.num_nodes_before


def test_base_graph_is_left_alone(tmp_path):
    """A graph without LoRA parameters is not modified."""
    src = resolve_model(write_config(tmp_path, "llama", num_hidden_layers=1))
    cm = flexc.compile(src, lora=None, dtype="fp32", builtin_passes=())
    r = cm.regions["layer.0"]
    g = _inference_copy(RegionProgram(r.fw, r.bw))
    before = [n.name for n in g.nodes]
    report = rewrite_multi_lora(g)
    assert not report.modified and report.num_lora_ops == 0 and [n.name for n in g.nodes] == before


def test_segments_give_each_adapters_captured_output(tmp_path):
    """Three sequences with adapters 2, none and 0 in ONE call of the rewritten graph give, row for row, what
    the captured graph gives with that adapter's tensors bound (B = 0 for none), within 1e-5 (fp32)."""
    src = resolve_model(write_config(tmp_path, "qwen2", num_hidden_layers=1))
    spec = LoraSpec(r=4, alpha=8)
    cm = flexc.compile(src, lora=spec, dtype="fp32", seq_len=16)
    model = load_model(src, spec, "fp32", seed=2)
    runner = RegionRunner(cm, model)
    prog, module = runner.layer_program(0), runner.layer_modules[0]
    g = _inference_copy(prog)
    report = rewrite_multi_lora(g)
    rewritten = fx.GraphModule(prog.fw, g)

    gen = torch.Generator().manual_seed(0)
    lora = {r.target: module.get_parameter(r.target) for r in prog.fw_inputs if ".lora_" in r.target}
    adapters = [{k: torch.randn(p.shape, generator=gen) * 0.2 for k, p in lora.items()} for _ in range(3)]
    ids, pos, cu, _, _ = packed_batch([5, 1, 7], src.config.vocab_size)
    h, cos, sin = runner.embed_forward(ids, pos)
    seg_adapter = torch.tensor([2, -1, 0], dtype=torch.int32)
    args = {0: h, 1: cos, 2: sin, 3: cu}
    vals = []
    for r in (p.meta["flexc_ref"] for p in g.find_nodes(op="placeholder")):
        if r.kind == "param":
            vals.append(module.get_parameter(r.target))
        elif r.kind in (InputKind.LORA_A_STACK, InputKind.LORA_B_STACK):
            vals.append(torch.stack([a[r.target] for a in adapters]))
        elif r.kind is InputKind.LORA_SCALING:
            vals.append(torch.full((3,), report.scaling[r.target]))
        else:
            vals.append({InputKind.SEG_STARTS: cu, InputKind.SEG_ADAPTER: seg_adapter}.get(r.kind, args.get(r.index)))
    (out,) = rewritten(*vals)
    for j, a in enumerate(seg_adapter.tolist()):
        bound = adapters[a] if a >= 0 else {k: torch.zeros_like(p) for k, p in lora.items()}
        (want,), _ = prog.forward(module, (h, cos, sin, cu), bound)
        rows = slice(int(cu[j]), int(cu[j + 1]))
        assert rel_err(out[rows], want[rows]) < 1e-5, (j, a)


def _hand_graph(transpose_a: bool) -> fx.Graph:
    """y = x W^T + 2 * (x A^T) B^T written by hand, optionally with A used untransposed."""
    g = fx.Graph()

    def ph(name, ref):
        p = g.placeholder(name)
        p.meta["flexc_ref"] = ref
        return p
    aten = torch.ops.aten
    x = ph("x", InputRef("user", index=0))
    w, a, b = (ph(n, InputRef("param", f"layer.proj.{t}.weight"))
               for n, t in (("w", "base_layer"), ("a", "lora_A.default"), ("b", "lora_B.default")))
    y = g.call_function(aten.mm.default, (x, g.call_function(aten.t.default, (w,))))
    u = g.call_function(aten.mm.default, (x, g.call_function(aten.t.default, (a,)) if transpose_a else a))
    v = g.call_function(aten.mm.default, (u, g.call_function(aten.t.default, (b,))))
    g.output((g.call_function(aten.add.Tensor, (y, g.call_function(aten.mul.Tensor, (v, 2.0)))),))
    return g


def test_hand_written_branch_is_rewritten_and_a_wrong_one_refused():
    """A hand-written PEFT-shaped branch is rewritten and computes the same; lora_A used without its transpose is
    a ValueError naming the linear and the node."""
    g = _hand_graph(transpose_a=True)
    gen = torch.Generator().manual_seed(0)
    x, w, a, b = (torch.randn(s, generator=gen) for s in ((5, 8), (6, 8), (3, 8), (6, 3)))
    want = fx.GraphModule({}, g)(x, w, a, b)[0]
    report = rewrite_multi_lora(g)
    assert report.linears == ["layer.proj"] and report.scaling == {"layer.proj": 2.0}
    one = torch.tensor([0, 5], dtype=torch.int32)
    got = fx.GraphModule({}, g)(x, w, a[None], b[None], torch.tensor([2.0]), one, torch.tensor([0], dtype=torch.int32))
    torch.testing.assert_close(got[0], want)
    assert branch_internals(_hand_graph(transpose_a=True)) == {"layer.proj": ["mm_default_1", "mm_default_2",
                                                                             "mul_tensor"]}
    with pytest.raises(ValueError, match=r"layer\.proj .* not transposed .* at node a"):
        rewrite_multi_lora(_hand_graph(transpose_a=False))
