"""How well the co-serving engine's latency model predicts each kind of iteration, against its start-up profile
and against its online refits.

    python benchmarks/latency_fit.py --out benchmarks/results/latency_fit.json

Builds the ``coserve`` engine of ``benchmarks/coserve.py`` (smollm2-135m fp32, LoRA r=16 on all seven
projections, a finetuning job queued), serves the same seeded Poisson load for ``--duration`` seconds, then
groups the iterations by kind (inference, finetuning forward, finetuning backward, and their mixes) and prints,
per kind, the median of observed / profiled seconds (the start-up profile's coefficients) and of observed /
predicted seconds (the model as refined online at that iteration). It also prints the start-up profile's
backward samples (a sequence's first window, which runs the loss head, and a later one) and how the run's
backward time splits between the layer windows and the job's per-window work (gradient bookkeeping and
optimizer steps, which the profile never runs). Nothing is asserted; a JSON is written.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import statistics
import time

import torch

from results_json import write_result
from coserve import build_engine
from flexc import main_job
from flexc.runtime.finetune import FinetuneJob
from flexc.runtime.latency import FEATURES
from flexc.runtime.sequence import FinetuneSequence


def kind_of(h: dict) -> str:
    parts = [name for name, on in (("inference", h["decode_tokens"] + h["prefill_tokens"] > 0),
                                   ("ft forward", h["ft_forward_tokens"] > 0),
                                   ("ft backward", h["ft_backward_layers"] > 0)) if on]
    return " + ".join(parts) or "empty"


class _Timer:
    """Seconds spent in a method of a class while active (wraps it; ``restore`` puts it back)."""

    def __init__(self, cls, name: str):
        self.cls, self.name, self.orig, self.seconds = cls, name, getattr(cls, name), []
        orig, seconds = self.orig, self.seconds

        def timed(obj, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(obj, *args, **kwargs)
            finally:
                seconds.append(time.perf_counter() - t0)
        setattr(cls, name, timed)

    def restore(self) -> None:
        setattr(self.cls, self.name, self.orig)

    def summary(self) -> dict:
        s = self.seconds
        return {"calls": len(s), "total_s": round(sum(s), 3),
                "median_s": round(statistics.median(s), 4) if s else None}


def backward_samples(latency) -> list[dict]:
    """The profile's backward-only samples: layers, tokens per layer, whether the loss head ran, and seconds
    (the feature rows scale layer counts and layer tokens by 1 / num_layers)."""
    i_tok, i_lay, i_loss = (FEATURES.index(f) for f in ("ft_backward_layer_tokens", "ft_backward_layers",
                                                         "ft_loss_tokens"))
    out = []
    for row, seconds in latency.samples:
        if row[i_lay] > 0 and not any(row[j] for j in range(1, len(FEATURES)) if j not in (i_tok, i_lay, i_loss)):
            layers = round(row[i_lay] * latency.num_layers)
            out.append({"layers": layers, "tokens": round(row[i_tok] * latency.num_layers / layers),
                        "loss_head": bool(row[i_loss]), "seconds": round(seconds, 4)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=0.5, help="arrival rate, requests/s (flexc run's)")
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of arrivals")
    ap.add_argument("--tpot-slo", type=float, default=0.25, help="seconds (flexc run's)")
    ap.add_argument("--ttft-slo", type=float, default=5.0, help="seconds, queueing included")
    ap.add_argument("--token-budget", type=int, default=256, help="tokens per iteration")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/latency_fit.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.latency_profile, args.device = None, "cpu"
    engine = build_engine("coserve", args)
    coef = [float(c) for c in engine.latency.profiled]
    grid = backward_samples(engine.latency)
    for g in grid:
        print(f"profile: backward window of {g['layers']} layer(s) over {g['tokens']} tokens"
              f"{' with the loss head' if g['loss_head'] else ''}: {g['seconds']:.3f} s")
    h0 = len(engine.metrics().history)
    timers = {"layer windows": _Timer(FinetuneSequence, "backward_window"),
              "job per-window work": _Timer(FinetuneJob, "on_window"),
              "optimizer steps": _Timer(FinetuneJob, "_optimizer_step")}
    try:
        main_job.serve(engine, main_job.make_load(args.rate, args.duration, args.seed), args.duration, drain=True)
    finally:
        for t in timers.values():
            t.restore()
    backward = {name: t.summary() for name, t in timers.items()}
    for name, b in backward.items():
        print(f"{name:<22} {b['calls']:5d} calls, {b['total_s']:.2f} s in all, median {b['median_s']} s")
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
              "profile_backward_samples": grid, "backward_time": backward,
              "rows": rows, "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "date": datetime.date.today().isoformat()}
    write_result(args.out, result)
    print(f"profiled coefficients {result['profiled_coefficients']}; wrote {args.out}")


if __name__ == "__main__":
    main()
