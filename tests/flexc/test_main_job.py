"""flexc run helpers: seeded Poisson load, keyword scoring, the serve loop and the chart, without a model."""
import argparse
import dataclasses
import math

import pytest

from flexc import main_job
from flexc.cli import main as cli_main


def test_arrivals_are_seeded_poisson():
    """Same seed gives the same increasing arrival times in [0, duration); the count matches rate x duration."""
    a = main_job.make_arrivals(2.0, 500.0, seed=3)
    assert a == main_job.make_arrivals(2.0, 500.0, seed=3)
    assert a != main_job.make_arrivals(2.0, 500.0, seed=4)
    assert all(0 < x < y < 500.0 for x, y in zip(a, a[1:]))
    assert abs(len(a) - 1000) < 4 * math.sqrt(1000)          # Poisson: mean 1000, sd ~32
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert abs(sum(gaps) / len(gaps) - 0.5) < 0.05           # exponential gaps of mean 1/rate
    assert main_job.make_arrivals(0.0, 10.0, seed=0) == []


def test_load_lengths_and_adapter_share():
    """Requests use built-in prompts, 16-64 output tokens, and roughly the given share asks for the adapter."""
    load = main_job.make_load(4.0, 200.0, seed=0, adapter_share=0.25, adapter="skill")
    assert load == main_job.make_load(4.0, 200.0, seed=0, adapter_share=0.25, adapter="skill")
    assert all(r.prompt in main_job.PROMPTS and 16 <= r.max_new_tokens <= 64 for r in load)
    share = sum(r.adapter == "skill" for r in load) / len(load)
    assert 0.18 < share < 0.32
    assert all(r.adapter is None for r in main_job.make_load(4.0, 20.0, seed=0))


@pytest.mark.parametrize("rate,duration", [(-1.0, 10.0), (float("nan"), 10.0), (1.0, 0.0)])
def test_bad_load_is_value_error(rate, duration):
    """A negative or NaN rate, or a non-positive duration, is a ValueError naming the flag."""
    with pytest.raises(ValueError, match="--rate|--duration"):
        main_job.make_arrivals(rate, duration, seed=0)


def test_score_answers_counts_keywords():
    """An answer counts when it contains its keyword, case-insensitively."""
    assert main_job.score_answers(["The capital is Quorinth.", "It has 7 moons", "TEAL sky"],
                                  ["quorinth", "seven", "teal"]) == pytest.approx(2 / 3)
    assert main_job.score_answers([], []) == 0.0
    with pytest.raises(ValueError):
        main_job.score_answers(["a"], [])


def test_shipped_eval_set():
    """The shipped eval file has 16 questions, each keyword stated in the training data."""
    items = main_job.load_eval()
    assert len(items) == 16
    train = open(main_job.TRAIN_FILE, encoding="utf-8").read()
    assert all(it["keyword"] in train for it in items)


@dataclasses.dataclass
class _Ev:
    request_id: str
    finished: bool


class _FakeEngine:
    """Finishes every request after ``steps_per_request`` steps; counts idle finetuning steps."""

    def __init__(self, steps_per_request: int = 3):
        self.n = steps_per_request
        self.live: dict[str, int] = {}
        self.submitted: list[str] = []
        self.steps = 0
        self.aborted: list[str] = []

    def submit(self, prompt, *, max_new_tokens, adapter, chat):
        rid = f"r{len(self.submitted)}"
        self.submitted.append(rid)
        self.live[rid] = self.n
        return rid

    def has_work(self):
        return True                          # a finetuning job always has work

    def step(self):
        self.steps += 1
        out = []
        for rid in list(self.live):
            self.live[rid] -= 1
            if self.live[rid] == 0:
                del self.live[rid]
                out.append(_Ev(rid, True))
        return out

    def result(self, rid, release=False):
        return argparse.Namespace(request_id=rid, ttft=0.01, tpot=0.01)

    def abort(self, rid):
        self.aborted.append(rid)


def test_serve_submits_on_arrival_and_steps_when_idle():
    """Every request arriving in the window is submitted and collected; the engine keeps stepping between."""
    load = [main_job.LoadRequest(arrival=t, prompt="hi", max_new_tokens=16) for t in (0.0, 0.05, 0.1)]
    eng = _FakeEngine()
    stats = main_job.serve(eng, load, 0.3)
    assert stats.submitted == 3 and len(stats.results) == 3 and stats.aborted == 0
    assert eng.steps > 9


def test_plot_throughput_draws_the_history(tmp_path, monkeypatch):
    """The chart has one axis with two series, inference (generated tokens/s) and finetuning (forward tokens/s),
    whose points are the history's tokens per bucket over the bucket's width (the last bucket partial), by hand;
    the PNG is 8 x 3.6 in at 110 dpi and has both lines' colours drawn in it."""
    import matplotlib.figure
    import matplotlib.image
    from matplotlib.colors import to_rgb

    drawn = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (drawn.append(fig), save(fig, *a, **k))[1])
    rows = [(0.0, 2, 10), (0.5, 2, 10), (1.0, 2, 10), (1.5, 2, 10),   # bucket [0, 2): 8 and 40 tokens
            (2.0, 3, 0), (2.5, 3, 20),                                # bucket [2, 4): 6 and 20 tokens
            (4.2, 1, 5)]                                              # bucket [4, 4.5): 1 and 5 tokens in 0.5 s
    hist = [dict(t=t, seconds=0.3, decode_tokens=9, prefill_tokens=0, ft_forward_tokens=ft, ft_backward_layers=0,
                 generated_tokens=gen, ft_tokens_done=0) for t, gen, ft in rows]
    path = tmp_path / "t.png"
    main_job.plot_throughput(hist, str(path), bucket=2.0, title="run")
    (fig,) = drawn
    (ax,) = fig.axes
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    inf, ft = lines["inference (generated tokens/s)"], lines["finetuning (forward tokens/s)"]
    assert list(inf.get_xdata()) == pytest.approx([1.0, 3.0, 4.25])
    assert list(inf.get_ydata()) == pytest.approx([8 / 2, 6 / 2, 1 / 0.5])
    assert list(ft.get_ydata()) == pytest.approx([40 / 2, 20 / 2, 5 / 0.5])
    assert ax.get_title() == "run" and ax.get_ylabel() == "tokens/s"
    img = matplotlib.image.imread(str(path))
    assert img.shape[:2] == (round(3.6 * 110), 8 * 110)
    for line in (inf, ft):
        rgb = to_rgb(line.get_color())
        assert ((abs(img[..., :3] - rgb) < 0.02).all(axis=-1)).sum() > 100, line.get_label()
    with pytest.raises(ValueError, match="nothing to plot"):
        main_job.plot_throughput([], str(tmp_path / "empty.png"))


def test_cli_bad_rate_is_one_line(capsys):
    """A bad flag value ends with exit status 2 and one line, before any model is built."""
    assert cli_main(["run", "--rate", "-2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rate" in err[0]


@pytest.mark.parametrize("tp,needle", [(0, "--tp must be >= 1, got 0"),
                                       (2, "--tp=2 does not divide num_heads=9; allowed tp for this model: 1, 3")])
def test_cli_bad_tp_is_one_line(capsys, tp, needle):
    """A --tp that is not positive or does not split SmolLM2's 9 heads is one line naming the allowed values,
    before any rank starts."""
    assert cli_main(["run", "--tp", str(tp), "--duration", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_progress_line_says_when_iterations_drift_from_the_profile():
    """The live line names the latency model's drift (observed / profiled iteration time) while it lasts."""
    from flexc.runtime.latency import Drift
    stats = main_job.ServeStats(wall=10.0, submitted=0)
    calm = main_job._progress_line(10.0, stats, None, 0.25, 5.0)
    assert "profiled" not in calm
    line = main_job._progress_line(10.0, stats, None, 0.25, 5.0, Drift(ratio=2.4, window=16, since=3))
    assert line.startswith(calm) and line.endswith("iterations 2.40x the profiled time")
