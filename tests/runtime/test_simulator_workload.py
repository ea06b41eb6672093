"""Workloads are seeded and have the statistics they are named for; traces in the Azure layout load; the GPU
table loads from JSON with errors that name the field."""
import json

import numpy as np
import pytest

from flexc.runtime.simulator.hardware import BUILTIN_GPUS, load_gpus, resolve_gpu
from flexc.runtime.simulator.workload import (CONVERSATION, SHAREGPT, GammaArrivals, LogNormal, PoissonArrivals,
                                              TraceArrivals, TraceLengths, Workload, finetune_sequences, read_trace)


def test_same_seed_same_requests_other_seed_others():
    """A workload is a pure function of its seed; arrivals and lengths come from separate streams."""
    wl = Workload(arrivals=GammaArrivals(rate=3.0, cv=2.0), lengths=SHAREGPT)
    a, b, c = wl.requests(120, seed=1), wl.requests(120, seed=1), wl.requests(120, seed=2)
    assert a == b and a != c
    other_rate = Workload(arrivals=GammaArrivals(rate=1.5, cv=2.0), lengths=SHAREGPT).requests(120, seed=1)
    assert [r.prompt_tokens for r in other_rate] == [r.prompt_tokens for r in a][:len(other_rate)]


@pytest.mark.parametrize("arrivals, cv", [(PoissonArrivals(rate=4.0), 1.0), (GammaArrivals(rate=4.0, cv=3.0), 3.0)])
def test_arrival_rate_and_burstiness(arrivals, cv):
    """Mean rate and the coefficient of variation of the gaps match the parameters (20,000 arrivals)."""
    times = arrivals.times(5000.0, np.random.default_rng(0))
    gaps = np.diff(times)
    assert len(times) / 5000.0 == pytest.approx(4.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)
    assert np.all(gaps >= 0) and times[-1] < 5000.0


def test_length_presets_have_their_medians_and_means():
    """ShareGPT-like: prompt median 40 / mean 262, response median 239 / mean 269 (means before the cap);
    conversation medians 1,020 / 129; prompt + output never above 8,192."""
    for lengths, med_p, med_o in ((SHAREGPT, 40, 239), (CONVERSATION, 1020, 129)):
        p, o = lengths.sample(100_000, np.random.default_rng(0))
        assert np.median(p) == pytest.approx(med_p, rel=0.05) and np.median(o) == pytest.approx(med_o, rel=0.05)
        assert (p + o).max() <= 8192 and p.min() >= 1 and o.min() >= 1
    for dist, mean in ((SHAREGPT.prompt, 262), (SHAREGPT.output, 269)):   # before the 8,192-token cap
        assert dist.median * np.exp(dist.sigma ** 2 / 2) == pytest.approx(mean)
        x = dist.sample(400_000, np.random.default_rng(1), 1, 10 ** 9)
        assert x.mean() == pytest.approx(mean, rel=0.1)


def test_finetune_sequences_are_long_and_capped():
    seqs = finetune_sequences(2000, seed=0)
    lengths = np.array([s.length for s in seqs])
    assert lengths.max() == 8192 and lengths.min() >= 64
    assert np.median(lengths) == pytest.approx(3000, rel=0.05)
    assert all(s.num_loss_tokens == s.length - 1 for s in seqs)
    with pytest.raises(ValueError, match="median"):
        LogNormal(0, 1.0)


def test_azure_trace(tmp_path):
    """The Azure LLM inference trace layout: datetime stamps relative to the first, failed rows dropped, rescaled
    to a rate; lengths replayed in order."""
    path = tmp_path / "trace.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n"
                    "2023-11-16 18:15:50.1805900,396,109\n"
                    "2023-11-16 18:15:49.1805900,879,0\n"
                    "2023-11-16 18:15:48.6805900,1200,20\n")
    rows = read_trace(str(path))
    assert [r.arrival for r in rows] == pytest.approx([0.0, 2.0, 3.5])
    assert [(r.prompt_tokens, r.output_tokens) for r in rows] == [(374, 44), (1200, 20), (396, 109)]
    native = TraceArrivals(tuple(rows)).times(100.0, None)
    doubled = TraceArrivals(tuple(rows), rate=2 * TraceArrivals(tuple(rows)).native_rate).times(100.0, None)
    assert doubled == pytest.approx(native / 2)
    reqs = Workload(arrivals=TraceArrivals(tuple(rows)), lengths=TraceLengths(tuple(rows))).requests(10.0, seed=0)
    assert [(r.arrival, r.prompt_tokens, r.output_tokens) for r in reqs] == [(0.0, 374, 44), (2.0, 1200, 20),
                                                                              (3.5, 396, 109)]
    bad = tmp_path / "bad.csv"
    bad.write_text("time,prompt,output\n1,2,3\n")
    with pytest.raises(ValueError, match="TIMESTAMP,ContextTokens,GeneratedTokens"):
        read_trace(str(bad))


def test_gpu_table_and_json(tmp_path):
    """Built-ins carry the datasheet numbers; a JSON file adds GPUs; a bad field is named."""
    a100 = resolve_gpu("A100-80GB")
    assert (a100.peak_flops, a100.memory_bandwidth, a100.interconnect_bandwidth) == (312e12, 2.039e12, 600e9)
    assert BUILTIN_GPUS["h100"].peak_flops == BUILTIN_GPUS["h200"].peak_flops == 989e12
    assert BUILTIN_GPUS["h200"].memory_bandwidth == 4.8e12
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps({"gpus": [{"name": "l40s", "peak_flops": 362e12, "memory_bandwidth": 864e9,
                                          "interconnect_bandwidth": 64e9, "memory_bytes": 48e9}]}))
    assert load_gpus(str(path))["l40s"].memory_bandwidth == 864e9
    assert resolve_gpu("l40s", str(path)).name == "l40s"
    with pytest.raises(ValueError, match="unknown GPU 'l40s'; allowed: a100-80gb, h100, h200"):
        resolve_gpu("l40s")
    path.write_text(json.dumps([{"name": "x", "peak_flops": -1, "memory_bandwidth": 1, "interconnect_bandwidth": 1,
                                 "memory_bytes": 1}]))
    with pytest.raises(ValueError, match="peak_flops must be a positive number"):
        load_gpus(str(path))
    path.write_text(json.dumps({"name": "x", "tflops": 1}))
    with pytest.raises(ValueError, match="unknown field"):
        load_gpus(str(path))
