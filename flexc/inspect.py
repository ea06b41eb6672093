"""``flexc inspect plan.json``: the memory plan as tables, a chart, or JSON.

Three tables: per trainable region what the installed partition saves (tensors
with shapes, bytes per token) and recomputes (FLOPs); the strategies side by
side (bytes, reduction against autograd, recompute as a fraction of training
FLOPs); the device-memory breakdown. ``--png FILE`` draws the strategies and the
breakdown (matplotlib, Agg backend); ``--json`` prints the same content as JSON.
``--pareto [PNG]`` prints the whole model's saved bytes against recompute FLOPs
over the prune pass's price sweep (``plan.json['memory']['pareto']``), the
strategies marked where they lie on it, and with a path draws the curve.
A file that is not a flexc plan (or is damaged) is a ``ValueError`` saying why.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from flexc.ir.schema import SCHEMA_VERSION

__all__ = ["add_arguments", "main", "load_plan", "summarize", "format_tables", "write_png", "format_pareto",
           "write_pareto_png"]

_GIB = 2**30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="plan.json written by flexc compile")
    p.add_argument("--png", metavar="FILE", default=None, help="also draw strategies and device memory to FILE")
    p.add_argument("--json", action="store_true", help="print the tables as JSON instead of text")
    p.add_argument("--pareto", nargs="?", const="", default=None, metavar="PNG",
                   help="print saved bytes against recompute FLOPs over the compile's sweep of budgets; "
                        "with a path also draw the curve to PNG")


def load_plan(path: str) -> dict:
    """Read and check a plan.json; ValueError naming what is wrong with it."""
    from flexc.runtime.dataset import read_text
    text = read_text(path, "plan")          # "plan: no such file: ..."
    try:
        plan = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a flexc plan (invalid JSON at line {e.lineno}: {e.msg})") from e
    if not isinstance(plan, dict) or "schema_version" not in plan:
        raise ValueError(f"{path}: not a flexc plan (no schema_version; write one with 'flexc compile')")
    if plan["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"{path}: plan schema_version {plan['schema_version']!r} is not supported "
                         f"(this flexc reads version {SCHEMA_VERSION})")
    mem = plan.get("memory")
    if not isinstance(mem, dict):
        raise ValueError(f"{path}: plan has no memory plan (compile with the built-in passes 'prune' and "
                         "'memory', and with LoRA)")
    for key in ("strategies", "regions", "breakdown", "seq_len"):
        if key not in mem:
            raise ValueError(f"{path}: damaged plan: memory.{key} is missing")
    for name, s in mem["strategies"].items():
        if not isinstance(s, dict) or not {"activation_bytes", "recompute_flops"} <= set(s):
            raise ValueError(f"{path}: damaged plan: memory.strategies.{name} lacks activation_bytes/recompute_flops")
    return plan


def _report(plan: dict, name: str) -> dict:
    """The last report of pass ``name`` in a plan ({} if it did not run)."""
    for rec in reversed(plan.get("passes", [])):
        if isinstance(rec, dict) and rec.get("name") == name and isinstance(rec.get("report"), dict):
            return rec["report"]
    return {}


def summarize(plan: dict) -> dict:
    """The three tables as plain data."""
    mem = plan["memory"]
    prune = _report(plan, "prune")
    installed = mem.get("installed", "pruned_remat")
    regions = []
    for name, info in mem["regions"].items():
        chosen = prune.get("regions", {}).get(name, {}).get(installed, {})
        regions.append({
            "region": name, "layers": info.get("num_layers", 1),
            "saved_bytes_per_token": chosen.get("saved_bytes_per_token"),
            "recompute_flops": chosen.get("recompute_flops_at_seq_len"),
            "forward_peak_bytes": info.get("forward_peak_bytes"), "backward_peak_bytes": info.get("backward_peak_bytes"),
            "saved": [{"name": s["name"], "shape": s["shape"], "dtype": s["dtype"], "kind": s["kind"],
                       "bytes_per_token": s["bytes_per_token"]} for s in chosen.get("saved", [])],
        })
    strategies = {name: {"activation_bytes": s["activation_bytes"],
                         "bytes_per_token": s.get("activation_bytes_per_token"),
                         "reduction_vs_autograd": s.get("reduction_vs_autograd"),
                         "recompute_flops": s["recompute_flops"], "recompute_fraction": s.get("recompute_fraction")}
                  for name, s in mem["strategies"].items()}
    return {"model": plan.get("model", {}).get("name"), "seq_len": mem["seq_len"], "installed": installed,
            "regions": regions, "strategies": strategies, "breakdown": mem["breakdown"],
            "device_memory": mem.get("device_memory"), "kv_tokens_for_inference": mem.get("kv_tokens_for_inference"),
            "kv_cache_bytes_per_token": mem.get("kv_cache_bytes_per_token"), "pareto": mem.get("pareto"),
            "serving": _report(plan, "serve")}


def _size(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("GiB", _GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _flops(n: Any) -> str:
    if not n:
        return "0"
    n = float(n)
    for unit, div in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} FLOP"


def format_tables(s: dict) -> str:
    """Text tables of :func:`summarize`'s data."""
    out = [f"memory plan of {s['model']} for one {s['seq_len']}-token finetuning sequence "
           f"(installed: {s['installed']})", ""]
    for r in s["regions"]:
        out.append(f"region {r['region']} (x{r['layers']}): saves {_size(r['saved_bytes_per_token'])}/token, "
                   f"recomputes {_flops(r['recompute_flops'])}, transient peak fw {_size(r['forward_peak_bytes'])} "
                   f"bw {_size(r['backward_peak_bytes'])}")
        out.append(f"  {'saved tensor':<16} {'shape':<22} {'dtype':<9} {'kind':<10} {'bytes/token':>12}")
        for t in r["saved"]:
            shape = "[" + ", ".join(t["shape"]) + "]"
            out.append(f"  {t['name']:<16} {shape:<22} {t['dtype']:<9} {t['kind']:<10} {t['bytes_per_token']:>12.1f}")
        out.append("")
    out.append(f"{'strategy':<14} {'activations':>12} {'bytes/token':>12} {'vs autograd':>12} {'recompute':>14} "
               f"{'of training':>12}")
    for name, st in s["strategies"].items():
        red = st["reduction_vs_autograd"]
        frac = st["recompute_fraction"]
        out.append(f"{name:<14} {_size(st['activation_bytes']):>12} {st['bytes_per_token'] or 0:>12.0f} "
                   f"{(1 - red) * 100 if red is not None else 0:>11.1f}% {_flops(st['recompute_flops']):>14} "
                   f"{(frac or 0) * 100:>11.1f}%")
    out.append("")
    dev = s["device_memory"]
    out.append("device memory" + (f" ({_size(dev)})" if dev else " (no --device-memory given)"))
    for part, n in s["breakdown"].items():
        out.append(f"  {part:<18} {_size(n):>12}")
    if s["kv_tokens_for_inference"] is not None:
        out.append(f"  KV cache tokens left for inference: {s['kv_tokens_for_inference']:,} "
                   f"({_size(s['kv_cache_bytes_per_token'])}/token)")
    if s.get("serving"):
        from flexc.passes.serve_summary import serving_summary_lines
        out += ["", *serving_summary_lines(s["serving"])]
    return "\n".join(out)


def write_png(s: dict, path: str) -> None:
    """Bar chart of the strategies' activation memory and the device-memory breakdown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(s["strategies"])           # empty for a plan without adapters
    vals = [s["strategies"][n]["activation_bytes"] / _GIB for n in names]
    bars = ax1.bar(names, vals, color=["#999999", "#6baed6", "#3182bd", "#08519c"][:len(names)])
    for b, n in zip(bars, names):
        frac = s["strategies"][n]["recompute_fraction"] or 0
        ax1.annotate(f"{_size(s['strategies'][n]['activation_bytes'])}\n+{frac * 100:.0f}% FLOPs", (b.get_x() + b.get_width() / 2,
                     b.get_height()), ha="center", va="bottom", fontsize=8)
    ax1.set_ylim(0, max(vals + [1e-9]) * 1.18)
    ax1.set_ylabel("GiB kept for the backward")
    ax1.set_title(f"{os.path.basename(str(s['model']))}: activations of one {s['seq_len']}-token sequence", fontsize=9)
    bottom = 0.0
    for part, n in s["breakdown"].items():
        ax2.bar(["device memory"], [n / _GIB], bottom=bottom, label=f"{part} ({_size(n)})")
        bottom += n / _GIB
    ax2.set_ylabel("GiB")
    ax2.set_title(f"breakdown (installed: {s['installed']})", fontsize=9)
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _on_curve(s: dict, point: dict) -> list[str]:
    """Strategies whose whole-model bytes and recompute FLOPs are this curve point's."""
    return [name for name, st in s["strategies"].items()
            if (st["activation_bytes"], st["recompute_flops"]) == (point["activation_bytes"], point["recompute_flops"])]


def format_pareto(s: dict) -> str:
    """Text table of the whole model's saved bytes against recompute FLOPs, ascending in recompute."""
    out = [f"saved bytes against recompute FLOPs of {s['model']} for one {s['seq_len']}-token finetuning sequence",
           "(each row: every region's min cut at one bytes-per-FLOP price; more recompute never keeps more bytes)",
           "", f"{'price B/FLOP':>21} {'activations':>12} {'bytes/token':>12} {'recompute':>14} {'of training':>12}"]
    marked = set()
    for p in reversed(s["pareto"]):
        names = _on_curve(s, p)
        marked.update(names)
        price = f"{p['price_low']:.4g}-{p['price_high']:.4g}"
        out.append(f"{price:>21} {_size(p['activation_bytes']):>12} {p['activation_bytes'] / s['seq_len']:>12.0f} "
                   f"{_flops(p['recompute_flops']):>14} {100 * p['recompute_fraction']:>11.2f}%"
                   + (f"  <- {', '.join(names)}" if names else ""))
    for name, st in s["strategies"].items():
        if name not in marked:
            out.append(f"off the curve: {name} {_size(st['activation_bytes'])} for "
                       f"{100 * (st['recompute_fraction'] or 0):.2f}% recompute")
    out.append(f"installed: {s['installed']}")
    return "\n".join(out)


def write_pareto_png(s: dict, path: str) -> None:
    """The curve (GiB kept against recompute as % of training FLOPs) with the strategies marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs = [100 * p["recompute_fraction"] for p in s["pareto"]]
    ys = [p["activation_bytes"] / _GIB for p in s["pareto"]]
    ax.plot(xs, ys, marker="o", markersize=3, color="#3182bd", label="min cut at one price (sweep)")
    for name, st in s["strategies"].items():
        x, y = 100 * (st["recompute_fraction"] or 0), st["activation_bytes"] / _GIB
        ax.scatter([x], [y], s=40, zorder=3, label=f"{name} ({_size(st['activation_bytes'])})")
    ax.set_xlabel("recompute, % of training FLOPs")
    ax.set_ylabel("GiB kept for the backward")
    ax.set_title(f"{os.path.basename(str(s['model']))}: one {s['seq_len']}-token sequence "
                 f"(installed: {s['installed']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_out(path: str, flag: str) -> None:
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise ValueError(f"{flag}: cannot write {path}: directory {out_dir} does not exist")


def main(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    s = summarize(plan)
    pareto = getattr(args, "pareto", None)
    if pareto is not None and not s["pareto"]:
        raise ValueError(f"{args.plan}: plan has no recompute sweep (memory.pareto); write it again with "
                         "'flexc compile' (with LoRA)")
    for path, flag in ((args.png, "--png"), (pareto, "--pareto")):
        if path:
            _check_out(path, flag)
    if args.png:
        write_png(s, args.png)
    if pareto:
        write_pareto_png(s, pareto)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(format_pareto(s) if pareto is not None else format_tables(s))
        for path in (args.png, pareto):
            if path:
                print(f"wrote {path}")
    return 0
