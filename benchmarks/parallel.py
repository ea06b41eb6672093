"""Communication of dependent vs naive adapter placement under tensor parallelism (no weights, no GPU).

For each (preset, tp) the model is compiled with LoRA r=16 on all seven
projections and the built-in pipeline (prune, memory, parallelize); the
parallelize pass's report gives, per adapter, the bytes each rank sends per
token for the chosen (dependent) placement and for the naive plan (adapter
replicated, computed on whole tensors with its own collectives), and the
totals over all layers (base communication included). Per-token numbers are at
T = --tokens tokens per iteration (weight-gradient reductions are amortized
over them). Prints a summary and writes JSON (--out). Nothing is asserted.

    python benchmarks/parallel.py [--runs qwen2.5-14b:2,qwen2.5-32b:4] [--tokens 2048] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

RUNS = "qwen2.5-14b:2,qwen2.5-32b:4"


def _machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}"


def measure(preset: str, tp: int, tokens: int, passes) -> dict:
    """Compile one preset at one tp; the parallelize report's per-adapter and total bytes per token."""
    import flexc
    t0 = time.perf_counter()
    cm = flexc.compile(preset, lora=flexc.LoraSpec(r=16, alpha=16), tp=tp, tokens=tokens, builtin_passes=passes)
    seconds = time.perf_counter() - t0
    rep = next(r.report for r in cm.passes if r.name == "parallelize")
    return {
        "preset": preset, "tp": tp, "tokens": tokens, "compile_seconds": round(seconds, 2),
        "pipeline": [r.name for r in cm.passes], "base_plan_source": rep.base_plan_source,
        "adapters": [{k: a[k] for k in ("module", "base", "choice", "comm_bytes_per_token",
                                        "naive_comm_bytes_per_token", "comm_bytes", "naive_comm_bytes")}
                     for a in rep.adapters],
        "layers": rep.adapters[0]["layers"] if rep.adapters else 0,
        "totals": rep.totals, "regions": rep.regions,
    }


def _summary(res: dict) -> list[str]:
    t = res["totals"]
    lines = [f"{res['preset']} tp={res['tp']} (T={res['tokens']}, {res['layers']} layers, pipeline "
             f"{'+'.join(res['pipeline'])}, compiled in {res['compile_seconds']} s)",
             f"  {'adapter':<17} {'base':<8} {'A':<12} {'B':<12} {'reduce':<6} {'dependent B/tok':>16} "
             f"{'naive B/tok':>12}"]
    for a in res["adapters"]:
        c = a["choice"]
        lines.append(f"  {a['module']:<17} {a['base']:<8} {c['A']:<12} {c['B']:<12} {c['reduce']:<6} "
                     f"{a['comm_bytes_per_token']:>16,.1f} {a['naive_comm_bytes_per_token']:>12,.1f}")
    lines.append(f"  adapters, all layers: dependent {t['adapter_comm_bytes_per_token']:,.0f} B/token, naive "
                 f"{t['naive_adapter_comm_bytes_per_token']:,.0f} B/token")
    lines.append(f"  whole model (base included): dependent {t['comm_bytes_per_token']:,.0f} B/token, naive "
                 f"{t['naive_comm_bytes_per_token']:,.0f} B/token")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=RUNS, help=f"preset:tp list (default {RUNS})")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per iteration T for per-token numbers")
    p.add_argument("--parallelize-only", action="store_true", help="run only the parallelize pass (no prune)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings
    warnings.filterwarnings("ignore")
    passes = ("parallelize",) if args.parallelize_only else None
    results = []
    for spec in args.runs.split(","):
        preset, _, tp = spec.partition(":")
        results.append(measure(preset, int(tp or 2), args.tokens, passes))
        print("\n".join(_summary(results[-1])), flush=True)
    meta = {"machine": _machine(), "date": datetime.date.today().isoformat(),
            "command": " ".join(["python", "benchmarks/parallel.py", *(argv if argv is not None else sys.argv[1:])]),
            "lora": {"r": 16, "alpha": 16, "targets": "all seven projections"}}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**meta, "results": results}, f, indent=2)
            f.write("\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
