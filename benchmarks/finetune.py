"""Finetuning alone: flexc ``finetune_only`` against HF+PEFT plain training, side by side in one run.

    python benchmarks/finetune.py --out benchmarks/results/finetune.json

smollm2-135m (the embedded GGUF), fp32 for both, LoRA r=16 alpha 32 on all seven projections, AdamW
(lr 1e-4, one optimizer step per sequence), the same ``--sequences`` sequences of ``--length`` tokens
(seeded random ids, every position labelled) in the same order. HF+PEFT runs ``model(ids)``, the mean
cross-entropy, ``loss.backward()`` and ``optimizer.step()`` per sequence, with transformers' SDPA attention.
flexc runs ``Engine.finetune`` under the ``finetune_only`` policy (chunked forward through the serving
graphs, layer-windowed backward, fp32 masters) with the given backend, twice: with the default memory plan
(``pruned_remat``: about a quarter of autograd's activation bytes, recomputing ~14% of the training FLOPs) and
with ``activation_budget="max"`` (``pruned``: every value the backward needs is saved, ~85% of autograd's
bytes, nothing recomputed but the LoRA branches). The two alternate for ``--rounds``
rounds, each round timing one full pass over the sequences after a warm-up sequence; tokens/s counts the
tokens whose forward and backward completed. Nothing is asserted: a summary is printed and a JSON written.
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
from flexc.models import load_model, resolve_model
from flexc.runtime.dataset import TrainingSequence

SPEC = LoraSpec(r=16, alpha=32)


def make_data(n: int, length: int, vocab: int, seed: int = 0) -> list[TrainingSequence]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(10, vocab, (length + 1,), generator=g).tolist()
        out.append(TrainingSequence(tuple(ids[:-1]), tuple(ids[1:])))
    return out


def run_peft(model, data: list[TrainingSequence], lr: float) -> float:
    """Seconds for one pass of plain training (forward, loss, backward, AdamW step per sequence)."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()

    def step(s: TrainingSequence) -> None:
        out = model(input_ids=torch.tensor([s.input_ids]))
        loss = torch.nn.functional.cross_entropy(out.logits[0], torch.tensor(s.labels), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step(data[0])                                                   # warm-up (allocations, first-call costs)
    t0 = time.perf_counter()
    for s in data:
        step(s)
    return time.perf_counter() - t0


def run_flexc(engine, data: list[TrainingSequence], lr: float, name: str) -> tuple[float, dict]:
    """Seconds for one pass of ``finetune_only`` over ``data`` (after a one-sequence warm-up job)."""
    engine.finetune(data[:1], adapter=f"{name}-warm", optimizer="adamw", lr=lr)
    engine.run_until_idle()
    job = engine.finetune(data, adapter=name, optimizer="adamw", lr=lr)
    t0 = time.perf_counter()
    engine.run_until_idle()
    seconds = time.perf_counter() - t0
    engine.adapters.remove(f"{name}-warm")
    engine.adapters.remove(name)
    return seconds, {"steps": job.step, "loss_first": job.loss_history[0], "loss_last": job.loss_history[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--length", type=int, default=511)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--backend", choices=("eager", "inductor"), default="eager")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", default="benchmarks/results/finetune.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = resolve_model("smollm2-135m")
    engines = {}
    with main_job.quiet_stderr():
        for plan, opts in (("pruned_remat", {}), ("pruned", {"activation_budget": "max"})):
            engines[plan] = flexc.Engine.from_pretrained(
                "smollm2-135m", lora=SPEC, policy="finetune_only", token_budget=args.length + 1,
                kv_cache_tokens=4096, backend=args.backend, max_adapters=4, compile_options=opts)
        peft = load_model(src, SPEC, "fp32")
    peft.get_base_model().set_attn_implementation("sdpa")
    data = make_data(args.sequences, args.length, src.config.vocab_size)
    tokens = sum(len(s) for s in data)
    rows = []
    for r in range(args.rounds):
        hf_s = run_peft(peft, data, args.lr)
        row = {"round": r, "hf_peft_tokens_per_s": round(tokens / hf_s, 1)}
        line = f"round {r}: HF+PEFT {tokens / hf_s:7.1f} tok/s"
        for plan, engine in engines.items():
            fx_s, job = run_flexc(engine, data, args.lr, f"round{r}")
            row[plan] = {"flexc_tokens_per_s": round(tokens / fx_s, 1), "ratio": round(hf_s / fx_s, 3), **job}
            line += f"   flexc {plan} {tokens / fx_s:7.1f} tok/s ({hf_s / fx_s:.3f}x)"
        rows.append(row)
        print(line, flush=True)
    ratio = {plan: statistics.median(x[plan]["ratio"] for x in rows) for plan in engines}
    result = {"benchmark": "finetune_only vs HF+PEFT plain training", "model": "smollm2-135m", "dtype": "fp32",
              "lora": SPEC.to_dict(), "optimizer": "adamw", "sequences": args.sequences, "length": args.length,
              "backend": args.backend, "threads": args.threads, "rounds": rows, "median_ratio": ratio,
              "compile_seconds": {p: round(e.executor.compile_seconds, 2) for p, e in engines.items()},
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "date": datetime.date.today().isoformat()}
    write_result(args.out, result)
    print(f"median flexc/HF+PEFT tokens/s: {ratio}  ({args.sequences} x {args.length} tokens, {args.rounds} "
          f"rounds, {args.threads} threads, backend {args.backend}); wrote {args.out}")


if __name__ == "__main__":
    main()
