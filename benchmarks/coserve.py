"""Co-serving: SLO attainment and throughput of coserve, temporal, finetune_only and inference_only.

    python benchmarks/coserve.py --out benchmarks/results/coserve.json --png benchmarks/results/coserve.png

smollm2-135m (embedded GGUF), fp32, LoRA r=16 alpha 32 on all seven
projections. For each arrival rate the same seeded Poisson load (built-in chat
prompts, 16-64 output tokens, base model) runs for ``--duration`` seconds under
each policy, with a finetuning job (the shipped Veltrax dataset, many epochs, so
it never runs out) queued on every engine whose policy trains; requests still
running at the end are drained. ``finetune_only`` serves no requests, so it runs
once. Per policy and rate: SLO attainment (TPOT and TTFT, queueing included),
TTFT/TPOT p50/p99, generated tokens/s, finetuning tokens/s (tokens of sequences
whose forward and backward completed) and the busy fraction of the wall time.
At the rate where ``inference_only`` keeps the engine busy closest to half the
time, it reports coserve's finetuning tokens/s against what that idle time
allows (finetune_only tokens/s x the idle fraction) and against temporal's.
Nothing is asserted; a summary is printed, a JSON and a chart written.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time

import torch

from results_json import write_result
import flexc
from flexc import main_job
from flexc.runtime.engine import resolve_device
from flexc.runtime.metrics import percentile

POLICIES = ("inference_only", "finetune_only", "coserve", "temporal")


def build_engine(policy: str, args) -> "flexc.Engine":
    kwargs = dict(lora=flexc.LoraSpec(r=16, alpha=32), policy=policy, tpot_slo=args.tpot_slo, ttft_slo=args.ttft_slo,
                  token_budget=args.token_budget, kv_cache_tokens=16384, latency_profile=args.latency_profile,
                  device=args.device)
    with main_job.quiet_stderr():
        engine = flexc.Engine.from_pretrained("smollm2-135m", **kwargs)
    if policy != "finetune_only":                                    # (it never schedules requests)
        engine.generate(["Hello!"], max_new_tokens=4, chat=True)      # warm up first-call allocations
    if policy != "inference_only":
        engine.finetune(main_job.TRAIN_FILE, adapter="ft", lr=1e-4, epochs=1000, seed=0)
    return engine


def run_one(engine, policy: str, rate: float, load, args) -> dict:
    """One policy at one rate: serve the load, then summarize this run's requests and iterations."""
    h0 = len(engine.metrics().history)
    stats = main_job.serve(engine, load, args.duration, drain=True)
    hist = engine.metrics().history[h0:]
    wall = stats.wall
    res = stats.results
    ttft, tpot = [r.ttft for r in res], [r.tpot for r in res]
    ok_tpot = [x <= args.tpot_slo for x in tpot]
    ok_both = [a <= args.ttft_slo and b for a, b in zip(ttft, ok_tpot)]
    frac = (lambda xs: sum(xs) / len(xs) if xs else None)
    return {"policy": policy, "rate": rate, "wall_s": round(wall, 2), "requests": len(load),
            "finished": len(res), "slo_attainment": frac(ok_both), "tpot_slo_attainment": frac(ok_tpot),
            "ttft_p50_ms": round(1000 * percentile(ttft, 50), 1), "ttft_p99_ms": round(1000 * percentile(ttft, 99), 1),
            "tpot_p50_ms": round(1000 * percentile(tpot, 50), 1), "tpot_p99_ms": round(1000 * percentile(tpot, 99), 1),
            "inference_tokens_per_s": round(sum(len(r.token_ids) for r in res) / wall, 2),
            "finetune_tokens_per_s": round(sum(h.get("ft_tokens_done", 0) for h in hist) / wall, 2),
            "finetune_forward_tokens_per_s": round(sum(h["ft_forward_tokens"] for h in hist) / wall, 2),
            "busy_fraction": round(min(sum(h["seconds"] for h in hist) / wall, 1.0), 4),
            "iterations": len(hist)}


def _write_partial(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"partial": True, "rows": rows}, f, indent=2)


def compare(rows: list[dict], rates: list[float]) -> dict:
    """At the rate where inference_only is busy closest to 50%: coserve vs the idle time, and vs temporal."""
    by = {(r["policy"], r["rate"]): r for r in rows}
    io = {rate: by[("inference_only", rate)]["busy_fraction"] for rate in rates}
    rate = min(rates, key=lambda x: abs(io[x] - 0.5))
    fo = by[("finetune_only", None)]["finetune_tokens_per_s"]
    co, tm = by[("coserve", rate)], by[("temporal", rate)]
    allowed = fo * (1 - io[rate])
    return {"rate": rate, "inference_only_busy_fraction": io[rate], "finetune_only_tokens_per_s": fo,
            "idle_allowance_tokens_per_s": round(allowed, 2),
            "coserve_finetune_tokens_per_s": co["finetune_tokens_per_s"],
            "coserve_vs_idle_allowance": round(co["finetune_tokens_per_s"] / allowed, 3) if allowed else None,
            "temporal_finetune_tokens_per_s": tm["finetune_tokens_per_s"],
            "coserve_vs_temporal": (round(co["finetune_tokens_per_s"] / tm["finetune_tokens_per_s"], 3)
                                    if tm["finetune_tokens_per_s"] else None),
            "coserve_tpot_slo_attainment": co["tpot_slo_attainment"], "coserve_slo_attainment": co["slo_attainment"],
            "temporal_slo_attainment": tm["slo_attainment"]}


def plot(rows: list[dict], rates: list[float], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    by = {(r["policy"], r["rate"]): r for r in rows}
    colors = {"coserve": "tab:green", "temporal": "tab:red", "inference_only": "tab:blue", "finetune_only": "tab:gray"}
    for pol in ("coserve", "temporal", "inference_only"):
        rs = [by[(pol, x)] for x in rates]
        axes[0].plot(rates, [100 * (r["slo_attainment"] or 0) for r in rs], "o-", color=colors[pol], label=pol)
        axes[1].plot(rates, [r["tpot_p99_ms"] for r in rs], "o-", color=colors[pol], label=pol)
        if pol != "inference_only":
            axes[2].plot(rates, [r["finetune_tokens_per_s"] for r in rs], "o-", color=colors[pol], label=pol)
    fo = by[("finetune_only", None)]["finetune_tokens_per_s"]
    axes[2].plot(rates, [fo * (1 - by[("inference_only", x)]["busy_fraction"]) for x in rates], "s--",
                 color=colors["finetune_only"], label="finetune_only x idle fraction")
    axes[2].axhline(fo, color=colors["finetune_only"], lw=0.8, label="finetune_only")
    for ax, yl in zip(axes, ("SLO attainment (%)", "TPOT p99 (ms)", "finetuning tokens/s")):
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="0.125,0.25,0.5", help="comma-separated arrival rates, requests/s")
    ap.add_argument("--duration", type=float, default=50.0, help="seconds of arrivals per policy and rate")
    ap.add_argument("--tpot-slo", type=float, default=0.25, help="seconds")
    ap.add_argument("--ttft-slo", type=float, default=5.0, help="seconds, queueing included")
    ap.add_argument("--token-budget", type=int, default=256, help="tokens per iteration")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--latency-profile", default=None, help="latency model JSON to load or write")
    ap.add_argument("--out", default="benchmarks/results/coserve.json")
    ap.add_argument("--png", default="benchmarks/results/coserve.png")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.device = str(resolve_device(args.device))
    except ValueError as e:
        ap.error(str(e))
    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    loads = {rate: main_job.make_load(rate, args.duration, args.seed) for rate in rates}
    machine = (torch.cuda.get_device_name(0) if args.device.startswith("cuda") else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"torch threads {torch.get_num_threads()}")
    t_start = time.perf_counter()
    rows: list[dict] = []
    for policy in POLICIES:
        t0 = time.perf_counter()
        engine = build_engine(policy, args)
        print(f"{policy}: engine ready in {time.perf_counter() - t0:.0f} s", flush=True)
        for rate in ([None] if policy == "finetune_only" else rates):
            row = run_one(engine, policy, rate, [] if rate is None else loads[rate], args)
            rows.append(row)
            _write_partial(args.out, rows)          # NOTE: a crash later keeps the measured rows
            print(f"  rate {rate}: busy {row['busy_fraction']:.2f}, SLO {row['slo_attainment']}, "
                  f"ft {row['finetune_tokens_per_s']} tok/s, inf {row['inference_tokens_per_s']} tok/s", flush=True)
        del engine
        gc.collect()
    cmp = compare(rows, rates)
    title = (f"smollm2-135m fp32 LoRA r=16, {machine}, TPOT SLO {1000 * args.tpot_slo:.0f} ms, "
             f"TTFT SLO {args.ttft_slo:g} s, {args.duration:g} s per run, {datetime.date.today().isoformat()}")
    result = {"date": datetime.date.today().isoformat(), "machine": machine, "device": args.device,
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "model": "smollm2-135m",
              "dtype": "fp32", "lora": {"r": 16, "alpha": 32, "targets": "all seven"},
              "token_budget": args.token_budget, "tpot_slo_s": args.tpot_slo, "ttft_slo_s": args.ttft_slo,
              "duration_s": args.duration, "rates": rates, "seed": args.seed,
              "requests_per_rate": {str(r): len(loads[r]) for r in rates}, "rows": rows, "comparison": cmp,
              "total_seconds": round(time.perf_counter() - t_start, 1)}

    print(f"\n{title}")
    print(f"{'rate':>5} {'policy':<15}{'SLO%':>6}{'TPOT%':>7}{'TTFT p50/p99 ms':>18}{'TPOT p50/p99 ms':>17}"
          f"{'inf tok/s':>10}{'ft tok/s':>9}{'busy':>6}")
    for r in rows:
        slo = "-" if r["slo_attainment"] is None else f"{100 * r['slo_attainment']:.1f}"
        tslo = "-" if r["tpot_slo_attainment"] is None else f"{100 * r['tpot_slo_attainment']:.1f}"
        print(f"{'-' if r['rate'] is None else r['rate']:>5} {r['policy']:<15}{slo:>6}{tslo:>7}"
              f"{r['ttft_p50_ms']:>9.0f}/{r['ttft_p99_ms']:<8.0f}{r['tpot_p50_ms']:>8.0f}/{r['tpot_p99_ms']:<8.0f}"
              f"{r['inference_tokens_per_s']:>10.1f}{r['finetune_tokens_per_s']:>9.1f}{r['busy_fraction']:>6.2f}")
    c = cmp
    print(f"at {c['rate']} req/s inference_only is busy {100 * c['inference_only_busy_fraction']:.0f}% of the time: "
          f"coserve finetunes {c['coserve_finetune_tokens_per_s']} tok/s = {c['coserve_vs_idle_allowance']}x of "
          f"finetune_only {c['finetune_only_tokens_per_s']} tok/s x idle {1 - c['inference_only_busy_fraction']:.2f} "
          f"(= {c['idle_allowance_tokens_per_s']}), {c['coserve_vs_temporal']}x temporal "
          f"({c['temporal_finetune_tokens_per_s']} tok/s); TPOT SLO attainment coserve "
          f"{c['coserve_tpot_slo_attainment']}, SLO attainment temporal {c['temporal_slo_attainment']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    write_result(args.out, result)
    plot(rows, rates, args.png, title)
    print(f"wrote {args.out}, {args.png} ({result['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
