"""Inference throughput and latency: flexc's engine vs transformers ``generate`` on the same 32 requests.

    python benchmarks/inference.py --out benchmarks/results/inference.json

smollm2-135m (embedded GGUF), fp32, CPU. 32 requests with mixed prompt lengths
(16-256 tokens) and output lengths (16-128 tokens), seeded. flexc runs them
with continuous batching (all submitted at once); transformers runs all 32 in
one left-padded batch with ``generate(do_sample=False)`` and
``max_new_tokens`` = the longest request (its fastest mode here), and only the
tokens each request asked for are counted. Both ignore EOS so both produce
exactly the requested tokens. TTFT is measured from the start of the run
(all requests arrive at t=0); TPOT is (last token - first token) / (n - 1)
per request. Nothing is asserted; a summary is printed and a JSON written.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from results_json import write_result
import flexc
from flexc.runtime.metrics import percentile


def make_requests(n: int, seed: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(16, 257, (n,), generator=g).tolist()
    outs = torch.randint(16, 129, (n,), generator=g).tolist()
    prompts = [torch.randint(100, vocab, (m,), generator=g).tolist() for m in lens]
    return prompts, outs


def summarize(name: str, wall: float, ntok: int, ttft: list[float], tpot: list[float]) -> dict:
    return {"system": name, "wall_s": round(wall, 3), "output_tokens": ntok,
            "output_tokens_per_s": round(ntok / wall, 2),
            **{f"ttft_p{q}_ms": round(1000 * percentile(ttft, q), 1) for q in (50, 90, 99)},
            **{f"tpot_p{q}_ms": round(1000 * percentile(tpot, q), 1) for q in (50, 90, 99)}}


def run_flexc(engine, prompts, outs) -> tuple[dict, list[list[int]]]:
    t0 = time.perf_counter()
    res = engine.generate(prompts, max_new_tokens=outs, ignore_eos=True)
    wall = time.perf_counter() - t0
    assert all(len(r.token_ids) == m for r, m in zip(res, outs))
    return (summarize("flexc", wall, sum(outs), [r.ttft for r in res], [r.tpot for r in res]),
            [r.token_ids for r in res])


class _StepClock:
    """A transformers streamer that records when each generation step's tokens appear."""

    def __init__(self):
        self.times: list[float] = []
        self.first = True

    def put(self, value):
        if self.first:           # the prompt
            self.first = False
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_hf(model, prompts, outs, pad_id: int) -> tuple[dict, list[list[int]]]:
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    clock = _StepClock()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(outs), do_sample=False,
                             eos_token_id=None, pad_token_id=pad_id, streamer=clock)
    steps = clock.times
    # request i is done when its outs[i]-th token exists; count only those tokens
    wall_done = steps[max(outs) - 1] - t0
    ttft = [steps[0] - t0] * n
    tpot = [(steps[m - 1] - steps[0]) / (m - 1) for m in outs]
    toks = [out[i, width:width + m].tolist() for i, m in enumerate(outs)]
    return summarize("transformers", wall_done, sum(outs), ttft, tpot), toks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--token-budget", type=int, default=2048, help="flexc tokens per iteration")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results/inference.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = flexc.Engine.from_pretrained("smollm2-135m", kv_cache_tokens=32768, token_budget=args.token_budget,
                                         device="cpu")
    from transformers import AutoModelForCausalLM
    src = engine.compiled.source                       # the same GGUF weights, loaded as transformers does
    model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32).eval()
    print(f"transformers attention: {model.config._attn_implementation}, "
          f"use_cache: {model.generation_config.use_cache}", flush=True)
    prompts, outs = make_requests(args.requests, args.seed, engine.vocab_size)
    pad_id = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0

    # warm up both (first-call allocations, lazy inits)
    engine.generate(prompts[:4], max_new_tokens=4, ignore_eos=True)
    run_hf(model, prompts[:4], [4] * 4, pad_id)

    fx_stats, fx_toks = run_flexc(engine, prompts, outs)
    print(f"flexc done: {fx_stats['output_tokens_per_s']} tok/s", flush=True)
    hf_stats, hf_toks = run_hf(model, prompts, outs, pad_id)
    print(f"transformers done: {hf_stats['output_tokens_per_s']} tok/s", flush=True)
    same = sum(a == b for a, b in zip(fx_toks, hf_toks))
    ratio = fx_stats["output_tokens_per_s"] / hf_stats["output_tokens_per_s"]
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}", "model": "smollm2-135m", "dtype": "fp32",
        "requests": args.requests, "prompt_lens": [len(p) for p in prompts], "output_lens": outs,
        "token_budget": args.token_budget, "flexc": fx_stats, "transformers": hf_stats,
        "throughput_ratio": round(ratio, 3), "identical_outputs": f"{same}/{len(outs)}",
    }
    print(f"{'':14}{'tok/s':>8}{'TTFT p50/p90/p99 ms':>26}{'TPOT p50/p90/p99 ms':>26}")
    for s in (fx_stats, hf_stats):
        print(f"{s['system']:14}{s['output_tokens_per_s']:>8}"
              f"{s['ttft_p50_ms']:>10}{s['ttft_p90_ms']:>8}{s['ttft_p99_ms']:>8}"
              f"{s['tpot_p50_ms']:>10}{s['tpot_p90_ms']:>8}{s['tpot_p99_ms']:>8}")
    print(f"flexc / transformers output tokens/s: {ratio:.2f}x; identical greedy outputs {same}/{len(outs)} "
          f"(left padding changes transformers' numerics slightly)")
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
