"""Engine metrics on hand-built samples: interpolated percentiles, SLO attainment, tokens per second."""
import pytest

from flexc.runtime import metrics as metrics_mod
from flexc.runtime.metrics import MetricsRecorder


def _linear_percentile(values, q):
    """The q-th percentile by linear interpolation between closest ranks (rank q/100 * (n-1) of the sorted values)."""
    s = sorted(values)
    rank = q / 100 * (len(s) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (rank - lo) * (s[hi] - s[lo])


@pytest.fixture()
def clock(monkeypatch):
    """perf_counter as the metrics module reads it, set by hand."""
    now = {"t": 0.0}
    monkeypatch.setattr(metrics_mod.time, "perf_counter", lambda: now["t"])
    return now


def test_percentiles_interpolate_between_ranks():
    """p50/p99 of TTFT and TPOT are linear interpolations between the closest ranks, by hand: of ten TTFTs
    0.1..1.0 the p99 is 0.991 and the p50 0.55; one sample is every percentile."""
    rec = MetricsRecorder(tpot_slo=1.0, ttft_slo=10.0)
    ttfts = [0.1 * i for i in (7, 3, 10, 1, 5, 9, 2, 8, 4, 6)]
    tpots = [0.01 * i for i in (4, 1, 9, 16, 25, 36, 49, 64, 81, 100)]
    for a, b in zip(ttfts, tpots):
        rec.request_finished(a, b)
    m = rec.summary()
    assert m.ttft_p50 == pytest.approx(0.55) and m.ttft_p99 == pytest.approx(0.991)
    assert m.tpot_p50 == pytest.approx(_linear_percentile(tpots, 50)) == pytest.approx(0.305)
    assert m.tpot_p99 == pytest.approx(_linear_percentile(tpots, 99)) == pytest.approx(0.9829)
    one = MetricsRecorder(tpot_slo=1.0, ttft_slo=1.0)
    one.request_finished(0.4, 0.02)
    assert (one.summary().ttft_p50, one.summary().ttft_p99, one.summary().tpot_p99) == (0.4, 0.4, 0.02)


def test_slo_attainment_counts_requests_meeting_both():
    """A request attains the SLO when TTFT <= ttft_slo and TPOT <= tpot_slo (bounds included); each SLO is also
    counted alone; with no finished request attainment is 1.0 and percentiles 0."""
    rec = MetricsRecorder(tpot_slo=0.1, ttft_slo=1.0)
    samples = [(0.5, 0.05), (1.5, 0.05), (0.5, 0.2), (2.0, 0.3), (1.0, 0.1)]   # ok, ttft miss, tpot miss, both, edge
    for ttft, tpot in samples:
        rec.request_finished(ttft, tpot)
    m = rec.summary()
    assert m.requests_finished == 5
    assert (m.slo_attainment, m.ttft_slo_attainment, m.tpot_slo_attainment) == (2 / 5, 3 / 5, 3 / 5)
    empty = MetricsRecorder(tpot_slo=0.1, ttft_slo=1.0).summary()
    assert (empty.slo_attainment, empty.ttft_p99, empty.inference_tokens_per_s, empty.iterations) == (1.0, 0.0, 0.0, 0)


def test_tokens_per_second_and_busy_share_over_wall_time(clock):
    """Generated and finetuning tokens divided by the wall time since the first iteration; the busy share is the
    iterations' time over it; the history keeps each iteration's counts with t from the start."""
    rec = MetricsRecorder(tpot_slo=0.1, ttft_slo=1.0)
    for t0, sec, gen, ft in ((100.0, 0.5, 3, 0), (100.5, 0.25, 5, 16), (101.5, 0.25, 4, 8)):
        rec.iteration(t0, sec, decode_tokens=gen, prefill_tokens=7, ft_forward_tokens=8, ft_backward_layers=1,
                      generated_tokens=gen, ft_tokens_done=ft)
    clock["t"] = 104.0                                          # 4 s of wall time since the first iteration
    m = rec.summary()
    assert m.wall_seconds == 4.0 and m.iterations == 3
    assert m.inference_tokens_per_s == pytest.approx(12 / 4) and m.finetune_tokens_per_s == pytest.approx(24 / 4)
    assert m.busy_fraction == pytest.approx(1.0 / 4)
    assert [h["t"] for h in m.history] == [0.0, 0.5, 1.5] and m.history[1]["ft_tokens_done"] == 16
    assert "history" not in m.to_dict() and len(m.to_dict(with_history=True)["history"]) == 3
    rec.reset()
    assert rec.summary().iterations == 0 and rec.summary().inference_tokens_per_s == 0.0


def test_slo_misses_are_attributed():
    """Iterations over the TPOT SLO (0.1 s) are put down to inference when no finetuning ran, when the inference
    part alone was predicted over the SLO, or when its observed share was (observed 0.3 s x predicted 0.06 of
    0.09 = 0.2 s); to finetuning when inference alone fitted; unattributed without predictions. Iterations within
    the SLO or without inference tokens are no misses; observed / profiled is the median ratio, by hand."""
    rec = MetricsRecorder(tpot_slo=0.1, ttft_slo=1.0)
    cases = [  # seconds, ft tokens, predicted, predicted inference, profiled, expected
        (0.2, 0, 0.05, 0.05, 0.05, "inference"),
        (0.2, 8, 0.2, 0.15, 0.2, "inference"),
        (0.3, 8, 0.09, 0.06, 0.1, "inference"),
        (0.12, 8, 0.11, 0.05, 0.06, "finetuning"),
        (0.15, 8, None, None, None, "unattributed"),
        (0.05, 8, 0.2, 0.15, 0.025, None),
    ]
    for i, (sec, ft, pred, inf, prof, _) in enumerate(cases):
        rec.iteration(float(i), sec, decode_tokens=4, prefill_tokens=0, ft_forward_tokens=ft, ft_backward_layers=0,
                      generated_tokens=4, ft_tokens_done=0, predicted_s=pred, predicted_inference_s=inf,
                      profiled_s=prof)
    rec.iteration(9.0, 5.0, decode_tokens=0, prefill_tokens=0, ft_forward_tokens=64, ft_backward_layers=0,
                  generated_tokens=0, ft_tokens_done=0, predicted_s=0.5, predicted_inference_s=0.0, profiled_s=0.5)
    m = rec.summary()
    assert [h["slo_miss"] for h in m.history] == [c[-1] for c in cases] + [None]
    assert (m.slo_miss_iterations, m.slo_miss_inference, m.slo_miss_finetuning, m.slo_miss_unattributed) == \
        (5, 3, 1, 1)
    assert m.observed_vs_profiled == pytest.approx(2.5)    # median of 4, 1, 3, 2, 2, 10
    d = m.to_dict()
    assert {"slo_miss_inference", "slo_miss_finetuning", "observed_vs_profiled"} <= set(d)
