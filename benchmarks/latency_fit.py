"""How well the co-serving engine's latency model predicts each kind of iteration, against its start-up profile
and against its online refits.

    python benchmarks/latency_fit.py --out benchmarks/results/latency_fit.json

Builds the ``coserve`` engine of ``benchmarks/coserve.py`` (smollm2-135m fp32, LoRA r=16 on all seven
projections, a finetuning job queued), serves the same seeded Poisson load for ``--duration`` seconds, then
groups the iterations by kind (inference, finetuning forward, finetuning backward, and their mixes) and prints,
per kind, the median of observed / profiled seconds (the start-up profile's coefficients) and of observed /
predicted seconds (the model as refined online at that iteration). Nothing is asserted; a JSON is written.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import statistics

import torch

from coserve import build_engine
from flexc import main_job
from flexc.runtime.latency import FEATURES


def kind_of(h: dict) -> str:
    parts = [name for name, on in (("inference", h["decode_tokens"] + h["prefill_tokens"] > 0),
                                   ("ft forward", h["ft_forward_tokens"] > 0),
                                   ("ft backward", h["ft_backward_layers"] > 0)) if on]
    return " + ".join(parts) or "empty"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=0.125, help="arrival rate, requests/s")
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of arrivals")
    ap.add_argument("--tpot-slo", type=float, default=0.8, help="seconds")
    ap.add_argument("--ttft-slo", type=float, default=5.0, help="seconds, queueing included")
    ap.add_argument("--token-budget", type=int, default=256, help="tokens per iteration")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/latency_fit.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.latency_profile, args.device = None, "cpu"
    engine = build_engine("coserve", args)
    coef = [float(c) for c in engine.latency.profiled]
    h0 = len(engine.metrics().history)
    main_job.serve(engine, main_job.make_load(args.rate, args.duration, args.seed), args.duration, drain=True)
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for h in engine.metrics().history[h0:]:
        if h.get("profiled_s") and h.get("predicted_s"):
            groups[kind_of(h)].append(h)
    rows = []
    for kind, hs in sorted(groups.items()):
        rows.append({"kind": kind, "iterations": len(hs),
                     "median_seconds": round(statistics.median(h["seconds"] for h in hs), 4),
                     "observed_over_profiled": round(statistics.median(h["seconds"] / h["profiled_s"] for h in hs), 3),
                     "observed_over_predicted": round(statistics.median(h["seconds"] / h["predicted_s"] for h in hs), 3)})
        print(f"{kind:<40} {len(hs):5d} iterations  median {rows[-1]['median_seconds']:.3f} s  "
              f"observed/profiled {rows[-1]['observed_over_profiled']:.2f}  "
              f"observed/predicted {rows[-1]['observed_over_predicted']:.2f}", flush=True)
    result = {"benchmark": "latency model fit by iteration kind", "model": "smollm2-135m", "dtype": "fp32",
              "rate": args.rate, "duration_s": args.duration, "tpot_slo_s": args.tpot_slo,
              "token_budget": args.token_budget, "threads": args.threads, "seed": args.seed,
              "profiled_coefficients": dict(zip(FEATURES, coef)),
              "rows": rows, "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "date": datetime.date.today().isoformat()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"profiled coefficients {result['profiled_coefficients']}; wrote {args.out}")


if __name__ == "__main__":
    main()
