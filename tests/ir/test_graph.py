"""The annotated graph: roles, symbolic shapes, bytes and FLOPs, checked against the config and real tensors."""
import sympy
import torch
import torch.fx as fx

from flexc.ir.vocab import TOKEN_SYMBOL
from flexc.ir.graph import NODE_INFO, VIEW_OPS, RegionGraph, Role, annotate
from flexc.ir.program import RegionProgram
from flexc.ir.regions import TOKEN_INPUTS, LayerRegion, causal_lm_parts

T = TOKEN_SYMBOL
R = 4                                                  # LoRA rank of the fixture
PROJ = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
        "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128),
        "mlp.down_proj": (128, 64)}
"""(in, out) features of each projection of the tiny Llama: hidden 64, 4 heads x 16, 2 KV heads, MLP 128."""


def _matmuls(region, module):
    return [n for n in region.nodes("forward") if n.meta[NODE_INFO].module == module
            and str(n.target) == "aten.mm.default"]


def test_matmul_roles_shapes_bytes_flops_from_config(tiny_llama):
    """Every base, lora_A and lora_B matmul of the layer has its role, shape (T, out), fp32 bytes and 2*T*in*out
    FLOPs as computed by hand from the config; together they are every matmul of the forward graph."""
    layer = tiny_llama.cm.regions["layer.0"]
    total = sympy.Integer(0)
    for proj, (fin, fout) in PROJ.items():
        for suffix, role, k, n_out in ((".base_layer", Role.BASE_LINEAR, fin, fout),
                                       (".lora_A.default", Role.ADAPTER_A, fin, R),
                                       (".lora_B.default", Role.ADAPTER_B, R, fout)):
            (mm,) = _matmuls(layer, f"layer.{proj}{suffix}")
            info = mm.meta[NODE_INFO]
            assert info.role is role and info.phase == "forward" and info.dtype == "float32"
            assert info.shape == (T, n_out), (proj, suffix, info.shape)
            assert sympy.expand(info.nbytes - 4 * T * n_out) == 0
            assert sympy.expand(info.flops - 2 * T * k * n_out) == 0, (proj, suffix, info.flops)
            total += info.flops
    all_mm = [n for n in layer.nodes("forward") if str(n.target) == "aten.mm.default"]
    assert len(all_mm) == 21
    assert sympy.expand(sum((n.meta[NODE_INFO].flops for n in all_mm), sympy.Integer(0)) - total) == 0
    # 2T * (sum in*out + r * sum (in+out)) = 2T * (36864 + 4 * 1024)
    assert sympy.expand(total - 2 * T * (36864 + 4096)) == 0


def test_attention_and_head_flops(tiny_llama):
    """The attention node costs 2*T^2*heads*head_dim, the fused lm_head + loss 4*T*hidden*vocab (logits and their
    input gradient); the attention's tuple output owns no bytes, its getitem owns the [T, heads, head_dim] output."""
    layer, head = tiny_llama.cm.regions["layer.0"], tiny_llama.cm.regions["head"]
    (att,) = [n for n in layer.nodes("forward") if n.meta[NODE_INFO].role is Role.ATTENTION]
    assert sympy.expand(att.meta[NODE_INFO].flops - 2 * T * T * 4 * 16) == 0
    assert att.meta[NODE_INFO].nbytes == 0
    out = next(u for u in att.users if u.args[1] == 0)
    assert out.meta[NODE_INFO].shape == (T, 4, 16) and sympy.expand(out.meta[NODE_INFO].nbytes - 4 * T * 64) == 0
    (lce,) = [n for n in head.nodes("forward") if n.meta[NODE_INFO].role is Role.LM_HEAD]
    assert sympy.expand(lce.meta[NODE_INFO].flops - 4 * T * 64 * 256) == 0
    roles = {n.meta[NODE_INFO].role for n in head.nodes("forward")}
    assert {Role.INPUT, Role.NORM, Role.LM_HEAD, Role.LOSS, Role.OUTPUT} <= roles


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        out = super().run_node(n)
        self.values[n] = out
        return out


def test_annotation_matches_real_tensors(tiny_llama):
    """Run with real tensors at T=10, every node's annotated shape and dtype are the tensor's; a storage-owning node's
    bytes are the tensor's bytes, and every view (0 bytes, 0 FLOPs) really shares its input's storage."""
    layer = tiny_llama.cm.regions["layer.0"]
    module = LayerRegion(causal_lm_parts(tiny_llama.model).model.layers[1])
    prog = RegionProgram(layer.fw, layer.bw, TOKEN_INPUTS["layer"])
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(10, 64, generator=g), torch.randn(10, 16, generator=g), torch.randn(10, 16, generator=g),
            torch.tensor([0, 4, 10], dtype=torch.int32))
    rec = _Recorder(layer.fw)
    rec.run(*prog.bind(module, args))
    checked_views = 0
    for n, v in rec.values.items():
        info = n.meta[NODE_INFO]
        if not isinstance(v, torch.Tensor) or n.op == "placeholder":
            continue
        at10 = {T: 10}
        assert tuple(int(sympy.sympify(s).subs(at10)) for s in info.shape) == tuple(v.shape), n.name
        assert info.dtype == str(v.dtype).removeprefix("torch."), n.name
        if str(n.target) in VIEW_OPS:
            base = rec.values[n.args[0]]
            assert info.nbytes == 0 and info.flops == 0, n.name
            assert v.untyped_storage().data_ptr() == base.untyped_storage().data_ptr(), n.name
            checked_views += 1
        else:
            assert int(sympy.sympify(info.nbytes).subs(at10)) == v.numel() * v.element_size(), n.name
    assert checked_views > 50


def test_phase_and_layer_fields(tiny_llama):
    """Forward nodes are annotated 'forward', backward ones 'backward'; a template run by three layers has no layer
    index, a region run by one layer gets that layer's index."""
    region = tiny_llama.cm.regions["layer.0"]
    assert region.layers == [0, 1, 2]
    assert {n.meta[NODE_INFO].phase for n in region.nodes("forward")} == {"forward"}
    assert {n.meta[NODE_INFO].phase for n in region.nodes("backward")} == {"backward"}
    assert {n.meta[NODE_INFO].layer for n in region.nodes()} == {None}
    try:
        annotate(RegionGraph(name="layer.2", captured=region.captured, layers=[2]))
        assert {n.meta[NODE_INFO].layer for n in region.nodes()} == {2}
    finally:
        annotate(region)                                   # the fixture is shared: restore its annotation
    assert {n.meta[NODE_INFO].layer for n in region.nodes()} == {None}


def test_summary_counts_every_node(tiny_llama):
    """plan.json's region summary counts each node of both graphs once by role; its FLOPs are the nodes' sum."""
    region = tiny_llama.cm.regions["layer.0"]
    s = region.summary()
    assert sum(s["roles"].values()) == s["forward_nodes"] + s["backward_nodes"]
    assert s["roles"]["adapter_A"] >= 7 and s["roles"]["input"] == len(region.fw.graph.find_nodes(op="placeholder")) \
        + len(region.bw.graph.find_nodes(op="placeholder"))
    fw = sum((n.meta[NODE_INFO].flops for n in region.nodes("forward")), sympy.Integer(0))
    assert sympy.expand(sympy.sympify(s["forward_flops"], locals={"T": T}) - fw) == 0
