"""The simulator predicts a real co-serving run of the embedded model: SLO attainment, finetuning tokens/s, TPOT
p50 and TTFT p50 within 15% of what the engine measured, for the same arrivals, lengths, finetuning data and
policy."""
import copy

import torch

from flexc.runtime.engine import Engine, EngineConfig
from flexc.runtime.policies import CoServePolicy
from flexc.runtime.simulator.validation import (attainment, compare, error_line, full_iteration, make_load,
                                                run_real, run_replay)

BUDGET = 64
DURATION_T0 = 80
"""The run lasts 80 full iterations of the start-up profile (about 35 s on a quiet machine): about 12 arrivals
however fast the machine is today; the same again drains it."""
TPOT_SLO_T, TTFT_SLO_T = 2.5, 12
"""The SLOs both sides are judged by, in full iterations T of the refined model. Under these bursty arrivals the
requests' queueing + TTFT spread evenly from about 2 T to 15 T, so a TTFT target in the middle of that spread
(8 T: attainment about 55%) has three or four requests within a few percent of it, and this shared machine's
noise flipped two of them in a CI run (real 13 of 24, simulated 15: 15.4%). At 12 T about one request in seven
misses and a 15% error takes three flips. Queueing is checked by the TTFT median as well (within 15%, like the
other metrics): attainment at 12 T alone would let a simulator that queues nothing pass. The TPOTs sit at 0.4-0.5
of their target either way."""


def test_simulation_matches_a_real_coserving_run(smollm2_lora):
    """SmolLM2-135M co-serving on this CPU (one torch thread): the latency model is profiled at start-up and
    refined by the engine on every iteration of the run; the simulation of the same load prices its iterations
    with that refined model (fitted on this machine, on this run's iterations) and starts its policy from the
    start-up profile, as the real policy started.

    Everything is set relative to this machine's speed (a shared machine may run several times slower than a quiet
    one): T0 = the start-up profile's full iteration (BUDGET tokens) sets the load, bursty arrivals (gamma, CV 3)
    at 0.15 / T0 req/s, and the TPOT target the policy fills to, 2.5 T0 (the token budget, not the target, caps
    the finetuning an iteration takes); T = the same from the refined model sets the SLOs both sides are judged
    by: TPOT < 2.5 T and queueing + TTFT < 12 T (see TPOT_SLO_T)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine(smollm2_lora.compiled, copy.deepcopy(smollm2_lora.model), tokenizer=smollm2_lora.tokenizer,
                        config=EngineConfig(token_budget=BUDGET, kv_cache_tokens=8192))
        engine.fit_latency_model()
        t0 = full_iteration(engine.latency, BUDGET)
        engine.scheduler.policy = CoServePolicy(engine.latency, TPOT_SLO_T * t0)   # refined online by the engine
        duration = drain = max(20.0, DURATION_T0 * t0)
        load = make_load(rate=0.15 / t0, duration=duration, seed=0, vocab_size=engine.vocab_size, cv=3.0)
        real = run_real(engine, load, duration=duration, drain=drain, tpot_slo=TPOT_SLO_T * t0,
                        ttft_slo=TTFT_SLO_T * t0)
    finally:
        torch.set_num_threads(threads)
    sim = run_replay(load, cost_latency=real.latency_end, policy_latency=real.latency_start, policy="coserve",
                     duration=duration, drain=drain, tpot_slo=TPOT_SLO_T * t0, ttft_slo=TTFT_SLO_T * t0,
                     token_budget=BUDGET, kv_tokens=8192, max_model_len=engine.max_model_len)
    t = full_iteration(real.latency_end, BUDGET)
    real.metrics["slo_attainment"] = attainment(real.ttfts, real.tpots, real.requests, TPOT_SLO_T * t,
                                                TTFT_SLO_T * t)
    sim["slo_attainment"] = attainment(sim["ttfts"], sim["tpots"], sim["requests"], TPOT_SLO_T * t, TTFT_SLO_T * t)
    rows = compare(real.metrics, sim, ("slo_attainment", "finetune_tokens_per_s", "tpot_p50", "ttft_p50"))
    assert real.requests >= 5 and real.metrics["finetune_tokens_per_s"] > 0, real.metrics
    assert all(v["relative_error"] <= 0.15 for v in rows.values()), error_line(rows)
