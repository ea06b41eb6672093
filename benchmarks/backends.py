"""One pass per iteration, measured: finetuning tokens added to a decode batch, and eager vs Inductor.

    python benchmarks/backends.py --out benchmarks/results/backends.json

smollm2-135m (the embedded GGUF), fp32, LoRA r=16 alpha 32 on all seven projections. For each backend an
engine is built; then, timed by the median of ``--repeats`` iterations after warm-up:

* a decode iteration of ``--decodes`` sequences (each with a 64-token prompt already in the cache), run
  through the engine's step;
* the forward of a ``--chunk``-token finetuning chunk (one flat batch through the serving graphs, its
  saved rows recorded), run through the executor.

* the marginal cost of finetuning tokens riding in a decode iteration: for k in ``--mix-tokens``, the
  median time of a synthetic iteration of ``--decodes`` decodes alone (D), of the same decodes with a
  k-token finetuning chunk (D+k), and of the k-token chunk alone (k); per finetuning token, (D+k - D) / k
  against k / k. All three are the same executor call on batches built the same way, interleaved per repeat.

Inductor's first compile of the serving graph and its recompiles for new shapes are reported apart (the
time of the first iteration of each shape). Nothing is asserted: a summary is printed, a JSON written.
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


def _decode_seqs(kv, n: int, ctx: int, tag: str) -> list[ScheduledSequence]:
    """``n`` decodes, each with ``ctx`` tokens already in (scratch) KV blocks."""
    out = []
    for i in range(n):
        rid = f"{tag}-dec-{i}"
        kv.allocate_slots(rid, ctx + 1)
        out.append(ScheduledSequence(req_id=rid, kind=SeqKind.DECODE, adapter_id=None, token_ids=[100 + i],
                                     num_computed_tokens=ctx, block_ids=list(kv.get_block_ids(rid)), sample=True))
    return out


def _ft_chunk(ex, kv, k: int, tag: str) -> tuple[ScheduledSequence, FinetuneSequence]:
    """The first ``k`` tokens of a fresh finetuning sequence of ``k`` tokens, as a scheduled chunk."""
    ids = tuple(range(200, 200 + k))
    fs = FinetuneSequence(TrainingSequence(ids, ids), make_layouts(ex.runner), 1.0 / k, f"{tag}-ft")
    kv.allocate_slots(fs.seq_id, k)
    start, tok, _ = fs.next_chunk(k)
    return ScheduledSequence(req_id=fs.seq_id, kind=SeqKind.FINETUNE, adapter_id=None, token_ids=tok,
                             num_computed_tokens=start, block_ids=list(kv.get_block_ids(fs.seq_id)),
                             sample=False), fs


def time_mixed(engine, decodes: int, k: int, repeats: int) -> dict:
    """Median seconds of D (decodes alone), D+k (with a k-token finetuning chunk) and k (the chunk alone)."""
    ex, kv = engine.executor, engine.kv
    times: dict[str, list[float]] = {"D": [], "D+k": [], "k": []}
    for i in range(repeats + 1):
        for name in times:
            seqs, ft = [], {}
            if name != "k":
                seqs += _decode_seqs(kv, decodes, 64, f"mix{i}{name}")
            if name != "D":
                s, fs = _ft_chunk(ex, kv, k, f"mix{i}{name}")
                seqs.append(s)
                ft[fs.seq_id] = fs
            batch = SchedulerOutput(seqs=seqs, num_scheduled_tokens={s.req_id: len(s.token_ids) for s in seqs},
                                    total_num_scheduled_tokens=sum(len(s.token_ids) for s in seqs))
            t0 = time.perf_counter()
            ex.execute(batch, ft)
            ex.synchronize()
            if i:                                          # NOTE: the first repeat warms up this shape
                times[name].append(time.perf_counter() - t0)
            for s in seqs:
                kv.free(s.req_id)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"finetune_tokens": k, "decodes": decodes, "decode_ms": round(1000 * med["D"], 2),
            "decode_plus_finetune_ms": round(1000 * med["D+k"], 2), "finetune_only_ms": round(1000 * med["k"], 2),
            "marginal_ms_per_token_in_decode_batch": round(1000 * (med["D+k"] - med["D"]) / k, 4),
            "ms_per_token_finetune_only": round(1000 * med["k"] / k, 4),
            "ratio": round((med["D+k"] - med["D"]) / med["k"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decodes", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--mix-tokens", default="32,128,512", help="finetuning tokens added to the decode batch")
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
        mixed = [time_mixed(engine, args.decodes, int(k), args.repeats) for k in args.mix_tokens.split(",")]
        for m in mixed:
            print(f"{backend:<9} {m['decodes']} decodes + {m['finetune_tokens']} finetuning tokens: "
                  f"{m['marginal_ms_per_token_in_decode_batch']:.3f} ms per added token vs "
                  f"{m['ms_per_token_finetune_only']:.3f} ms per token alone (ratio {m['ratio']})", flush=True)
        rows[backend] = {"mixed": mixed, "decode_iteration_ms": round(1000 * decode_s, 2),
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
    write_result(args.out, result)
    print(f"inductor speed-up: decode {result['inductor_speedup_decode']}x, chunk {result['inductor_speedup_chunk']}x;"
          f" wrote {args.out}")


if __name__ == "__main__":
    main()
