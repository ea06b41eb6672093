"""The simulator against the real engine: a longer version of tests/runtime/test_simulator_validation.py.

    python benchmarks/simulate_validation.py --duration 120 --out benchmarks/results/simulate_validation.json

SmolLM2-135M (embedded), LoRA r=16 alpha 32 on all seven projections, policy coserve, one torch thread, token
budget 128. The engine profiles its latency model at start-up; T0 is the profiled time of a full iteration. The
load is set relative to T0 (so that it means the same on a quiet and on a busy machine): bursty arrivals (gamma,
CV 3) at ``--load`` / T0 req/s, prompts of 16-96 and outputs of 8-32 tokens (EOS ignored), the policy's TPOT
target 2.5 T0; a finetuning job (SGD, sequences of 32-96 tokens). The real run serves it for ``--duration``
seconds; the simulator replays the same load twice: priced by the start-up profile, and by the latency model as
the engine left it after the run (refined online on the run's own iterations). Both are judged by the SLO TPOT <
2.5 T and queueing + TTFT < 8 T, T the refined model's full iteration. Prints the comparison, writes the JSON.
Nothing is asserted.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

import flexc
from flexc import main_job
from flexc.runtime.policies import CoServePolicy
from flexc.runtime.simulator.report import write_json
from flexc.runtime.simulator.validation import (METRICS, attainment, compare, full_iteration, make_load, run_real,
                                                run_replay)

BUDGET = 128


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=120.0, help="seconds of the real run (default 120)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load", type=float, default=0.15, help="arrival rate x T0 (default 0.15)")
    p.add_argument("--out", default="benchmarks/results/simulate_validation.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    with main_job.quiet_stderr():
        engine = flexc.Engine.from_pretrained("smollm2-135m", lora=flexc.LoraSpec(r=16, alpha=32),
                                              token_budget=BUDGET, kv_cache_tokens=8192)
    engine.fit_latency_model()
    t0 = full_iteration(engine.latency, BUDGET)
    engine.scheduler.policy = CoServePolicy(engine.latency, 2.5 * t0)
    load = make_load(rate=args.load / t0, duration=args.duration, seed=args.seed, vocab_size=engine.vocab_size,
                     cv=3.0)
    print(f"engine ready in {time.perf_counter() - t_start:.0f} s; start-up full iteration T0 = {1000 * t0:.0f} ms: "
          f"{len(load.requests)} requests at {args.load / t0:.2f} req/s (gamma CV 3) over {args.duration:g} s",
          flush=True)
    real = run_real(engine, load, duration=args.duration, drain=60.0, tpot_slo=2.5 * t0, ttft_slo=8 * t0)
    t = full_iteration(real.latency_end, BUDGET)
    tpot_slo, ttft_slo = 2.5 * t, 8 * t
    real.metrics["slo_attainment"] = attainment(real.ttfts, real.tpots, real.requests, tpot_slo, ttft_slo)
    common = dict(policy="coserve", duration=args.duration, drain=60.0, tpot_slo=2.5 * t0, ttft_slo=8 * t0,
                  token_budget=BUDGET, kv_tokens=8192, max_model_len=engine.max_model_len)
    out = {"command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads 1, Python "
                      f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}",
           "startup_full_iteration_s": t0, "refined_full_iteration_s": t, "tpot_slo": tpot_slo,
           "ttft_slo": ttft_slo, "requests": len(load.requests),
           "real": {k: v for k, v in real.metrics.items()}, "real_iterations": real.iterations, "comparisons": {}}
    print(f"refined full iteration T = {1000 * t:.0f} ms; SLO: TPOT < {1000 * tpot_slo:.0f} ms, queueing + TTFT < "
          f"{ttft_slo:.2f} s; real run: {real.iterations} iterations", flush=True)
    rows = {}
    for name, cost in (("startup_profile", real.latency_start), ("refined_on_run", real.latency_end)):
        sim = run_replay(load, cost_latency=cost, policy_latency=real.latency_start, **common)
        sim["slo_attainment"] = attainment(sim.pop("ttfts"), sim.pop("tpots"), sim["requests"], tpot_slo, ttft_slo)
        rows[name] = compare(real.metrics, sim, METRICS)
        out["comparisons"][name] = {"latency_model": cost.to_dict(), "simulated": sim, "errors": rows[name]}
    print(f"\n{'metric':<24} {'real':>10} " + " ".join(f"{n:>22}" for n in ("sim (start-up profile)",
                                                                             "sim (refined on the run)")))
    rows = {}
    for name, cost in (("startup_profile", real.latency_start), ("refined_on_run", real.latency_end)):
        sim = run_replay(load, cost_latency=cost, policy_latency=real.latency_start, **common)
        rows[name] = compare(real.metrics, sim, METRICS)
        out["comparisons"][name] = {"latency_model": cost.to_dict(), "simulated": sim, "errors": rows[name]}
    for m in METRICS:
        cells = [f"{rows[n][m]['simulated']:>12.4g} ({100 * rows[n][m]['relative_error']:5.1f}%)" for n in rows]
        print(f"{m:<24} {real.metrics[m]:>10.4g} " + " ".join(f"{c:>22}" for c in cells))
    write_json(args.out, out)
    print(f"\nwrote {args.out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
