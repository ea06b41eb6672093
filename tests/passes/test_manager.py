"""Pass manager: user passes by module:function, by registered name and by entry point; records and errors."""
import dataclasses
import json
import sys
import types

import pytest

import flexc
from flexc.ir.spec import LoraSpec
from flexc.passes.manager import PassContext, PassError, PassManager, define_pass, resolve_pass
from tests.utils import write_config


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("cfg"), "llama")


def test_example_user_pass_report_reaches_plan(cfg_path, tmp_path):
    """examples/user_pass.py runs through --pass and its report is in plan.json with its time."""
    from flexc.cli import main
    out = tmp_path / "plan.json"
    assert main(["compile", cfg_path, "--lora-r", "4", "--seq-len", "8", "--pass", "examples.user_pass:lora_flops",
                 "-o", str(out)]) == 0
    plan = json.loads(out.read_text())
    rec = plan["passes"][-1]
    assert rec["name"] == "lora_flops" and rec["seconds"] >= 0
    assert rec["report"]["lora_matmuls"]["layer.0"] == 14          # 7 projections x (A, B)
    # 2*r*(in+out) per projection and token: q(64,64) k(64,32) v(64,32) o(64,64) gate/up(64,128) down(128,64)
    expected = sum(2 * 4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128),
                                                  (128, 64)])
    assert rec["report"]["lora_flops_per_token"]["layer.0"] == expected


def test_registered_pass_and_context_options(cfg_path):
    """A pass given as a function gets the compile options through ctx.options and earlier reports through ctx.results."""
    seen = {}

    @define_pass("test_seen")
    def test_seen(graph, ctx):
        seen.update(ctx.options)
        return {"modified": False, "regions": len(graph.regions)}

    cm = flexc.compile(cfg_path, lora=LoraSpec(r=2), seq_len=8, passes=[test_seen], device_memory=123)
    assert seen["device_memory"] == 123 and seen["seq_len"] == 8
    assert cm.plan()["passes"][-1] == {**cm.plan()["passes"][-1], "name": "test_seen",
                                       "report": {"modified": False, "regions": 4}}


def test_entry_point_pass(monkeypatch):
    """A pass published as an entry point in group flexc.passes is found by name."""
    mod = types.ModuleType("fake_ep_mod")
    mod.my_pass = lambda g, c: {"modified": False}
    monkeypatch.setitem(sys.modules, "fake_ep_mod", mod)

    class EP:
        name, value = "ep_pass", "fake_ep_mod:my_pass"

        def load(self):
            return mod.my_pass

    import flexc.passes.manager as m
    monkeypatch.setattr(m, "entry_points", lambda group: [EP()] if group == "flexc.passes" else [])
    name, fn = resolve_pass("ep_pass")
    assert fn is mod.my_pass


def test_failing_pass_names_itself_and_predecessors():
    """A crashing pass is re-raised naming the pass and the passes that ran before it."""
    ok = ("ok", lambda g, c: {"modified": False})

    def boom(g, c):
        raise RuntimeError("kaput")
    with pytest.raises(PassError, match=r"pass 'boom' failed: RuntimeError: kaput \(passes before it: \['ok'\]\)"):
        PassManager([ok, ("boom", boom)]).run(graph=None, ctx=PassContext())


def test_requires_is_checked():
    """A pass whose required pass has not run is refused before it runs."""
    fn = define_pass("needs_prune_test", requires=("prune_missing",))(lambda g, c: {})
    with pytest.raises(PassError, match="requires"):
        PassManager([("needs_prune_test", fn)]).run(graph=None, ctx=PassContext())


@pytest.mark.parametrize("spec,msg", [("nosuchpass", "unknown pass"), ("", "must be a name"), ("json:nope", "has no function"),
                                      ("no_such_module_x:f", "cannot import")])
def test_bad_pass_specs(spec, msg):
    """Unknown names, missing functions and unimportable modules are ValueErrors naming the spec."""
    with pytest.raises(ValueError, match=msg):
        resolve_pass(spec)
