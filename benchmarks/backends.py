"""Serving graphs run eagerly vs compiled by Inductor: a decode iteration and a finetuning chunk.

    python benchmarks/backends.py --out benchmarks/results/backends.json

smollm2-135m (the embedded GGUF), fp32, LoRA r=16 alpha 32 on all seven projections. For each backend an
engine is built; then, timed by the median of ``--repeats`` iterations after warm-up:

* a decode iteration of ``--decodes`` sequences (each with a 64-token prompt already in the cache), run
  through the engine's step;
* the forward of a ``--chunk``-token finetuning chunk (one flat batch through the serving graphs, its
  saved rows recorded), run through the executor.

Inductor's first compile of the serving graph and its recompiles for new shapes are reported apart (the
time of the first iteration of each shape). Nothing is asserted: a summary is printed, a JSON written.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

import flexc
from flexc import main_job
from flexc.ir.spec import LoraSpec
from flexc.runtime.batch import ScheduledSequence, SchedulerOutput, SeqKind
from flexc.runtime.dataset import TrainingSequence
from flexc.runtime.sequence import FinetuneSequence, make_layouts

SPEC = LoraSpec(r=16, alpha=32)


def time_decode(engine, decodes: int, repeats: int) -> tuple[float, float]:
    """(median seconds of a decode iteration of ``decodes`` sequences, seconds of the first decode iteration)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(decodes):
        engine.submit(torch.randint(10, 40000, (64,), generator=g).tolist(), max_new_tokens=repeats + 4,
                      ignore_eos=True)
    while any(engine.scheduler.next_kind(r).value == "prefill" for r in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    engine.run_until_idle()
    return statistics.median(times[1:]), times[0]


def time_chunk(engine, chunk: int, repeats: int) -> tuple[float, float]:
    """(median seconds of the forward of a ``chunk``-token finetuning chunk, seconds of the first one)."""
    ex, kv = engine.executor, engine.kv
    layouts = make_layouts(ex.runner)
    times = []
    for i in range(repeats + 1):
        ids = tuple(range(100 + i, 100 + i + chunk))
        fs = FinetuneSequence(TrainingSequence(ids, ids), layouts, 1.0 / chunk, f"bench-{i}")
        kv.allocate_slots(fs.seq_id, chunk)
        start, tok, _ = fs.next_chunk(chunk)
        seq = ScheduledSequence(req_id=fs.seq_id, kind=SeqKind.FINETUNE, adapter_id=None, token_ids=tok,
                                num_computed_tokens=start, block_ids=list(kv.get_block_ids(fs.seq_id)), sample=False)
        batch = SchedulerOutput(seqs=[seq], num_scheduled_tokens={fs.seq_id: chunk}, total_num_scheduled_tokens=chunk)
        t0 = time.perf_counter()
        ex.execute(batch, {fs.seq_id: fs})
        times.append(time.perf_counter() - t0)
        kv.free(fs.seq_id)
    return statistics.median(times[1:]), times[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decodes", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="benchmarks/results/backends.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for backend in ("eager", "inductor"):
        with main_job.quiet_stderr():
            engine = flexc.Engine.from_pretrained("smollm2-135m", lora=SPEC, backend=backend, kv_cache_tokens=8192,
                                                  token_budget=args.chunk)
        t0 = time.perf_counter()
        chunk_s, chunk_first = time_chunk(engine, args.chunk, args.repeats)
        decode_s, decode_first = time_decode(engine, args.decodes, args.repeats)
        rows[backend] = {"decode_iteration_ms": round(1000 * decode_s, 2),
                         "finetune_chunk_ms": round(1000 * chunk_s, 2),
                         "first_decode_iteration_s": round(decode_first, 2), "first_chunk_s": round(chunk_first, 2),
                         "compile_seconds_first_graph": round(engine.executor.compile_seconds, 2),
                         "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{backend:<9} decode x{args.decodes}: {1000 * decode_s:7.1f} ms   chunk {args.chunk}: "
              f"{1000 * chunk_s:7.1f} ms   (first chunk {chunk_first:.1f} s, first decode {decode_first:.1f} s)",
              flush=True)
        del engine
    e, i = rows["eager"], rows["inductor"]
    result = {"benchmark": "serving graphs: eager vs inductor", "model": "smollm2-135m", "dtype": "fp32",
              "lora": SPEC.to_dict(), "decodes": args.decodes, "chunk": args.chunk, "repeats": args.repeats,
              "threads": args.threads, "backends": rows,
              "inductor_speedup_decode": round(e["decode_iteration_ms"] / i["decode_iteration_ms"], 3),
              "inductor_speedup_chunk": round(e["finetune_chunk_ms"] / i["finetune_chunk_ms"], 3),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "date": datetime.date.today().isoformat()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"inductor speed-up: decode {result['inductor_speedup_decode']}x, chunk {result['inductor_speedup_chunk']}x;"
          f" wrote {args.out}")


if __name__ == "__main__":
    main()
