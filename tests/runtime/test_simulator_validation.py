"""The simulator predicts a real co-serving run of the embedded model: SLO attainment, finetuning tokens/s and TPOT
p50 within 15% of what the engine measured, for the same arrivals, lengths, finetuning data and policy."""
import pytest
import torch

import flexc
from flexc.runtime.policies import CoServePolicy
from flexc.runtime.latency import IterationWork
from flexc.runtime.simulator.validation import compare, error_line, make_load, run_real, run_replay

BUDGET = 128
DURATION = 30.0
DRAIN = 30.0


@pytest.mark.slow_model
def test_simulation_matches_a_real_coserving_run():
    """SmolLM2-135M co-serving on this CPU (one torch thread): the latency model is profiled at start-up and
    refined by the engine on every iteration of the run; the simulation of the same load prices its iterations
    with that refined model (fitted on this machine, on this run's iterations) and starts its policy from the
    start-up profile, as the real policy started.

    The load is set relative to this machine's speed (a shared machine may run several times slower than a quiet
    one): T = the profiled time of a full iteration (BUDGET tokens); TPOT SLO 2.5 T (the token budget, not the
    SLO, caps how much finetuning an iteration takes), queueing + TTFT SLO 5 T, bursty arrivals (gamma, CV 3) at
    0.25 / T requests/s, so that bursts queue and part of the requests miss their TTFT."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = flexc.Engine.from_pretrained("smollm2-135m", lora=flexc.LoraSpec(r=16, alpha=32),
                                              token_budget=BUDGET, kv_cache_tokens=8192)
        engine.fit_latency_model()
        full = engine.latency.predict(IterationWork(decode_tokens=4, ft_forward_tokens=BUDGET - 4,
                                                    attention_pairs=(BUDGET - 4) * 64))
        tpot_slo, ttft_slo = 2.5 * full, 5.0 * full
        engine.scheduler.policy = CoServePolicy(engine.latency, tpot_slo)   # refined online by the engine
        load = make_load(rate=0.25 / full, duration=DURATION, seed=0, vocab_size=engine.vocab_size, cv=3.0)
        real = run_real(engine, load, duration=DURATION, drain=DRAIN, tpot_slo=tpot_slo, ttft_slo=ttft_slo)
    finally:
        torch.set_num_threads(threads)
    sim = run_replay(load, cost_latency=real.latency_end, policy_latency=real.latency_start, policy="coserve",
                     duration=DURATION, drain=DRAIN, tpot_slo=tpot_slo, ttft_slo=ttft_slo, token_budget=BUDGET,
                     kv_tokens=8192, max_model_len=engine.max_model_len)
    rows = compare(real.metrics, sim, ("slo_attainment", "finetune_tokens_per_s", "tpot_p50"))
    assert real.metrics["requests"] >= 10 and real.metrics["finetune_tokens_per_s"] > 0, real.metrics
    assert all(v["relative_error"] <= 0.15 for v in rows.values()), error_line(rows)
