"""flexc simulate: the table, the JSON and the figure for a grid of rates and policies; one-line errors."""
import json

import pytest

from flexc.cli import main
from flexc.runtime.latency import LatencyModel
from tests.utils import write_config


def test_simulate_writes_table_json_and_figure(tmp_path, capsys):
    """A tiny model replaying a measured latency profile (50 ms an iteration, 1 ms a token): every (rate, policy)
    is a row of the table and of the JSON; the figure is written."""
    cfg = write_config(tmp_path, "llama")
    profile = tmp_path / "latency.json"
    LatencyModel(3, coef=[0.05, 1e-3, 1e-3, 0.0, 1e-3, 1e-3, 0.0, 0.0, 0.0, 0.0, 0.0]).save(str(profile))
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    assert main(["simulate", "--model", cfg, "--rates", "0.5,1", "--policies", "coserve,separate", "--duration",
                 "20", "--latency-profile", str(profile), "--tpot-slo", "0.2", "--seq-len", "128",
                 "--finetune-median", "48", "--json", str(out),
                 "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "SLO" in text and "ft tok/s" in text and text.count("coserve") == 2 and text.count("separate") == 2
    data = json.loads(out.read_text())
    assert (data["gpu"], data["tp"], data["cost"]) == ("measured", 1, "measured")
    rows = {(r["policy"], r["rate"]) for r in data["results"]}
    assert rows == {("coserve", 0.5), ("coserve", 1.0), ("separate", 0.5), ("separate", 1.0)}
    assert all(0 <= r["slo_attainment"] <= 1 and r["finetune_tokens_per_s"] > 0 for r in data["results"])
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize("args,needle", [
    (["--policies", "coserve,fifo"], "unknown policy 'fifo'; allowed: coserve, temporal, inference_only"),
    (["--gpu", "tpu-v5"], "unknown GPU 'tpu-v5'; allowed: a100-80gb, h100, h200"),
    (["--rates", "1,-2"], "--rates must be positive"),
    (["--arrivals", "trace"], "--arrivals trace needs --trace FILE"),
    (["--min-finetune-share", "1.5"], "--min-finetune-share must be a fraction in [0, 1], got 1.5"),
])
def test_bad_input_exits_2_with_one_line(args, needle, capsys):
    """Mistakes are caught before compiling: exit status 2 and one line naming the value and what is allowed."""
    assert main(["simulate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
