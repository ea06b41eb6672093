"""Activation memory of LoRA finetuning per strategy, from the compiled plans (compile only, no weights).

For llama-3.1-8b, qwen2.5-14b and qwen2.5-32b in bf16, one sequence of 2048 and 8192 tokens, LoRA r=16
on all seven linear layers and on down_proj only (the FlexLLM paper's setting): the bytes kept for the
backward by each strategy (autograd = what PyTorch autograd keeps for HF+PEFT, checkpoint, pruned,
pruned_remat with the default budget), the reduction against autograd, and the recompute as a fraction of
the training FLOPs. Prints a one-screen table and writes JSON (``--out``) and, with ``--png``, the
``flexc inspect`` chart of the first configuration.

    python benchmarks/memory.py --out benchmarks/results/memory.json \\
        --png benchmarks/results/memory-llama-3.1-8b-8192.png
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import flexc
from flexc.inspect import summarize, write_png

PRESETS = ("llama-3.1-8b", "qwen2.5-14b", "qwen2.5-32b")
SEQ_LENS = (8192, 2048)
TARGETS = {"all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
           "down_proj": ("down_proj",)}
_GIB = 2**30


def run(presets=PRESETS, seq_lens=SEQ_LENS, targets=tuple(TARGETS)) -> list[dict]:
    rows = []
    for preset in presets:
        for seq_len in seq_lens:
            for tname in targets:
                t0 = time.perf_counter()
                cm = flexc.compile(preset, lora=flexc.LoraSpec(r=16, alpha=16, targets=TARGETS[tname]),
                                   seq_len=seq_len, device_memory=80 * 2**30)
                plan = cm.plan()
                mem = plan["memory"]
                rows.append({"model": preset, "seq_len": seq_len, "lora": tname, "dtype": cm.dtype,
                             "compile_seconds": round(time.perf_counter() - t0, 2),
                             "strategies": mem["strategies"], "plan": plan})
                print(f"  compiled {preset} {seq_len} {tname} in {rows[-1]['compile_seconds']} s", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'model':<13} {'tokens':>6} {'LoRA':<9} {'autograd':>9} {'checkpoint':>16} {'pruned':>16} "
            f"{'pruned_remat':>22}")
    out = [head, "-" * len(head)]
    for r in rows:
        s = r["strategies"]
        ag = s["autograd"]["activation_bytes"]

        def cell(name, with_rec=False):
            st = s[name]
            txt = f"{st['activation_bytes'] / _GIB:6.2f} ({st['activation_bytes'] / ag * 100:4.1f}%)"
            return txt + (f" +{st['recompute_fraction'] * 100:4.1f}%F" if with_rec else "")
        out.append(f"{r['model']:<13} {r['seq_len']:>6} {r['lora']:<9} {ag / _GIB:8.2f}G "
                   f"{cell('checkpoint'):>16} {cell('pruned'):>16} {cell('pruned_remat', True):>22}")
    out.append("GiB kept for the backward of one sequence (% of autograd); +F: recompute as % of training FLOPs")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/memory.json", help="JSON results file")
    p.add_argument("--png", default=None, help="chart of the first configuration (flexc inspect's chart)")
    p.add_argument("--presets", default=",".join(PRESETS))
    args = p.parse_args()
    t0 = time.perf_counter()
    rows = run(presets=tuple(args.presets.split(",")))
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, {platform.system()} (compile only, no weights)"
    print(table(rows))
    print(f"{machine}; {datetime.date.today()}; {time.perf_counter() - t0:.0f} s")
    if args.png:
        write_png(summarize(rows[0]["plan"]), args.png)
        print(f"wrote {args.png}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": str(datetime.date.today()), "machine": machine,
                   "command": "python " + " ".join(sys.argv),
                   "rows": [{k: v for k, v in r.items() if k != "plan"} for r in rows]}, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
