"""The serve pass's logits form: the vocabulary projection as flexc::skinny_mm, equal to the captured region."""
import torch

from flexc.ir.program import RegionProgram
from flexc.ir.regions import TOKEN_INPUTS
from flexc.runtime.regions import RegionRunner


def test_serving_logits_equal_the_captured_region(tiny):
    """The engine's runner runs the serving form (its graph calls flexc::skinny_mm, not aten.mm); for 1 to 12
    rows its logits equal the captured logits graph's within 1e-5."""
    t = tiny("llama")
    runner = RegionRunner(t.cm, t.model)
    serving = runner.programs["logits"]
    targets = {n.target for n in serving.fw.graph.nodes if n.op == "call_function"}
    assert torch.ops.flexc.skinny_mm.default in targets and torch.ops.aten.mm.default not in targets
    region = t.cm.regions["logits"]
    captured = RegionProgram(region.fw, region.bw, TOKEN_INPUTS["logits"])
    hidden = t.model.get_base_model().config.hidden_size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in range(1, 13):
            h = torch.randn(n, hidden, generator=g)
            (a,), _ = serving.forward(runner.logits_head, (h,))
            (b,), _ = captured.forward(runner.logits_head, (h,))
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item()), n
