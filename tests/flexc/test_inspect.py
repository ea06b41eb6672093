"""flexc inspect: tables, PNG and JSON from plan.json; damaged or foreign plans end with one line, exit 2."""
import json

import pytest

from flexc.cli import main
from tests.utils import write_config


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("inspect")
    out = d / "plan.json"
    assert main(["compile", write_config(d, "llama"), "--lora-r", "4", "--seq-len", "16", "--device-memory",
                 "64MiB", "-o", str(out)]) == 0
    return out


def test_tables_and_png(plan_path, tmp_path, capsys):
    """The text has the per-region saved tensors, the four strategies and the breakdown; the PNG is written."""
    capsys.readouterr()
    png = tmp_path / "plan.png"
    assert main(["inspect", str(plan_path), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    for needle in ("region layer.0 (x3)", "saved tensor", "[1, T, 64]", "autograd", "checkpoint", "pruned_remat",
                   "base_weights", "KV cache tokens left for inference"):
        assert needle in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_matches_plan(plan_path, capsys):
    """--json prints the strategies with the same numbers as plan.json's memory section."""
    capsys.readouterr()
    assert main(["inspect", str(plan_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = json.loads(plan_path.read_text())
    for name, s in plan["memory"]["strategies"].items():
        assert out["strategies"][name]["activation_bytes"] == s["activation_bytes"]
    assert out["kv_tokens_for_inference"] == plan["memory"]["kv_tokens_for_inference"] > 0


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not a flexc plan (invalid JSON"),
    ('{"name": "some other tool"}', "not a flexc plan (no schema_version"),
    ('{"schema_version": 99, "memory": {}}', "schema_version 99 is not supported"),
    ('{"schema_version": 1}', "plan has no memory plan"),
    ('{"schema_version": 1, "memory": {"strategies": {}, "regions": {}, "seq_len": 8}}', "memory.breakdown is missing"),
])
def test_bad_plan_exits_2_with_one_line(tmp_path, capsys, content, needle):
    """A damaged or foreign file gives exit status 2 and one line naming the problem."""
    bad = tmp_path / "plan.json"
    bad.write_text(content)
    assert main(["inspect", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


def test_pareto_table_and_curve(plan_path, tmp_path, capsys, monkeypatch):
    """--pareto prints one row per point of memory.pareto, descending in recompute, marks the strategies that lie
    on it (pruned at the top, the installed pruned_remat), and with a path draws that curve to a PNG."""
    import matplotlib.figure
    drawn = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (drawn.append(fig), save(fig, *a, **k))[1])
    curve = json.loads(plan_path.read_text())["memory"]["pareto"]
    capsys.readouterr()
    assert main(["inspect", str(plan_path), "--pareto"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [ln for ln in lines if "%" in ln and "-" in ln.split()[0]]
    assert len(rows) == len(curve) >= 3
    assert rows[0].endswith("<- pruned") and any(r.endswith("<- pruned_remat") for r in rows)
    assert "off the curve: autograd" in "\n".join(lines) and drawn == []
    png = tmp_path / "pareto.png"
    assert main(["inspect", str(plan_path), "--pareto", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    (fig,) = drawn
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == pytest.approx([100 * p["recompute_fraction"] for p in curve])
    assert list(line.get_ydata()) == pytest.approx([p["activation_bytes"] / 2**30 for p in curve])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_of_a_plan_without_sweep_is_one_line(plan_path, tmp_path, capsys):
    """A plan written before the sweep existed has no memory.pareto: exit status 2 and one line saying so."""
    plan = json.loads(plan_path.read_text())
    del plan["memory"]["pareto"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(plan))
    capsys.readouterr()
    assert main(["inspect", str(old), "--pareto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plan has no recompute sweep" in err[0]
