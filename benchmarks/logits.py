"""The vocabulary projection of a decode batch: torch's mm against ``flexc::skinny_mm``, alone and in a decode
iteration of the embedded model.

    python benchmarks/logits.py --out benchmarks/results/logits.json

1. The projection alone at SmolLM2's LM-head shape ([49152, 576] fp32): ``x @ w.T`` (what the captured logits
   graph runs) against ``flexc::skinny_mm(x, w)`` for n rows, median of ``--repeats`` calls each, interleaved.
2. A decode iteration of n sequences (64-token prompts in the cache) through the engine's executor, smollm2-135m
   fp32 with LoRA r=16 alpha 32 on all seven projections (the main job's engine): the logits region run as
   captured against its serving form (the ``serve`` pass's ``flexc::skinny_mm``), the same batches
   interleaved per repeat.

Ratios are the thing to read (this machine may be shared). Nothing is asserted: a summary is printed, a JSON
written.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from results_json import write_result
from flexc import main_job
from flexc.ir.program import RegionProgram
from flexc.ir.regions import TOKEN_INPUTS
from flexc.kernels.matmul import SKINNY_ROWS, skinny_mm
from flexc.runtime.profiling import _batch, _scratch_seq


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def projection(rows: list[int], repeats: int) -> list[dict]:
    w = torch.randn(49152, 576)
    out = []
    for n in rows:
        x = torch.randn(n, 576)
        for f in (lambda: x @ w.t(), lambda: skinny_mm(x, w)):       # warm-up
            f()
        pairs = [(_median_ms(lambda: x @ w.t(), 3), _median_ms(lambda: skinny_mm(x, w), 3)) for _ in range(repeats)]
        mm, skinny = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        err = float((x @ w.t() - skinny_mm(x, w)).abs().max())
        out.append({"rows": n, "mm_ms": round(mm, 3), "skinny_mm_ms": round(skinny, 3),
                    "speedup": round(mm / skinny, 2), "max_abs_diff": err})
        print(f"projection  {n:3d} rows: mm {mm:7.2f} ms   skinny_mm {skinny:6.2f} ms   {mm / skinny:4.2f}x   "
              f"max |diff| {err:.1e}", flush=True)
    return out


def decode_iterations(decodes: list[int], repeats: int) -> list[dict]:
    engine = main_job._build_engine(policy="coserve", tpot_slo=0.25, ttft_slo=5.0, latency_profile=None,
                                    backend="eager")
    ex, kv, runner = engine.executor, engine.kv, engine.executor.runner
    serving = runner.programs["logits"]
    region = engine.compiled.regions["logits"]
    captured = RegionProgram(region.fw, region.bw, TOKEN_INPUTS["logits"])
    if serving.fw is captured.fw:
        raise SystemExit("the engine's logits program is the captured one: the serve pass built no serving form")
    g = torch.Generator().manual_seed(0)
    ids = iter(range(10**9))

    def iteration(n: int, program: RegionProgram) -> float:
        runner.programs["logits"] = program
        seqs = [_scratch_seq(kv, f"bench_{next(ids)}", torch.randint(0, 49152, (1,), generator=g).tolist(), 64 + 8 * j)
                for j in range(n)]
        try:
            t0 = time.perf_counter()
            ex.execute(_batch(seqs))
            return time.perf_counter() - t0
        finally:
            for s in seqs:
                kv.free(s.req_id)

    out = []
    try:
        for n in decodes:
            iteration(n, captured), iteration(n, serving)                # warm-up
            a, b = [], []
            for _ in range(repeats):
                a.append(iteration(n, captured))
                b.append(iteration(n, serving))
            ma, mb = 1000 * statistics.median(a), 1000 * statistics.median(b)
            out.append({"decodes": n, "captured_ms": round(ma, 2), "serving_ms": round(mb, 2),
                        "speedup": round(ma / mb, 2)})
            print(f"decode iteration of {n:2d}: logits as captured {ma:6.1f} ms   with skinny_mm {mb:6.1f} ms   "
                  f"{ma / mb:4.2f}x", flush=True)
    finally:
        runner.programs["logits"] = serving
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--out", default="benchmarks/results/logits.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = projection([1, 2, 3, 4, 6, SKINNY_ROWS, 12, 16, 32], args.repeats)
    iters = decode_iterations([1, 2, 3, 4, 8, 16], args.repeats)
    result = {"benchmark": "vocabulary projection: mm vs flexc::skinny_mm", "threads": args.threads,
              "repeats": args.repeats, "projection": rows, "decode_iterations": iters,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "date": datetime.date.today().isoformat()}
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
