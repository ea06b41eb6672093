"""What a simulated run measured, as a table, JSON and the paper-shaped figure.

One :class:`RunResult` per (policy, arrival rate): SLO attainment (a request
meets its SLO when its TPOT and its queueing + TTFT are both within target; a
request that arrived in the measured window and did not finish counts as a
miss), TTFT and TPOT mean and p99, generated tokens/s and finetuning tokens/s
(tokens of finetuning sequences whose backward completed) over the window.

The figure has the shape of the FlexLLM paper's end-to-end plot: one column
per model, rows SLO attainment, finetuning tokens/s and inference tokens/s, the
arrival rate on the x axis, one line per policy.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

import numpy as np

__all__ = ["RunResult", "summarize_requests", "format_table", "write_json", "plot_results"]


@dataclasses.dataclass(kw_only=True)
class RunResult:
    """One simulated (policy, rate) run of one instance (``separate``: per instance of the split cluster)."""

    policy: str
    rate: float
    """Arrival rate per instance, requests/s."""
    duration: float
    """Seconds of the measured window."""
    requests: int
    """Requests that arrived in the window."""
    finished: int
    """Of those, the ones that finished (in the window or the drain after it)."""
    slo_attainment: float
    ttft_mean: float
    ttft_p50: float
    ttft_p99: float
    tpot_mean: float
    tpot_p50: float
    tpot_p99: float
    inference_tokens_per_s: float
    finetune_tokens_per_s: float
    iterations: int
    sim_seconds: float
    """Wall seconds the simulation itself took."""
    notes: dict = dataclasses.field(default_factory=dict)
    """Extra facts (the split of ``separate``, optimizer steps, preemptions, ...)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(xs, q)) if len(xs) else 0.0


def summarize_requests(ttfts: Sequence[float], tpots: Sequence[float], arrived: int, tpot_slo: float,
                       ttft_slo: float) -> dict:
    """SLO attainment over ``arrived`` requests (the unfinished ones miss) and TTFT/TPOT statistics of the
    finished ones."""
    ok = sum(1 for a, b in zip(ttfts, tpots) if a <= ttft_slo and b <= tpot_slo)
    return {"slo_attainment": ok / arrived if arrived else 1.0,
            "ttft_mean": float(np.mean(ttfts)) if len(ttfts) else 0.0, "ttft_p50": _pct(ttfts, 50),
            "ttft_p99": _pct(ttfts, 99),
            "tpot_mean": float(np.mean(tpots)) if len(tpots) else 0.0, "tpot_p50": _pct(tpots, 50),
            "tpot_p99": _pct(tpots, 99)}


def format_table(results: Sequence[RunResult], title: str = "") -> str:
    """The one-screen table: a row per (rate, policy)."""
    head = (f"{'rate':>5} {'policy':<15} {'SLO':>6} {'TTFT mean/p99 s':>16} {'TPOT mean/p99 ms':>17} "
            f"{'infer tok/s':>11} {'ft tok/s':>9} {'sim s':>6}")
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for r in sorted(results, key=lambda r: (r.rate, r.policy)):
        slo = f"{100 * r.slo_attainment:5.1f}%" if r.requests else "    - "
        lines.append(f"{r.rate:5g} {r.policy:<15} {slo:>6} {r.ttft_mean:7.2f}/{r.ttft_p99:<8.2f} "
                     f"{1000 * r.tpot_mean:7.1f}/{1000 * r.tpot_p99:<9.1f} {r.inference_tokens_per_s:11.1f} "
                     f"{r.finetune_tokens_per_s:9.1f} {r.sim_seconds:6.1f}")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


_STYLE = {"coserve": ("tab:red", "o"), "temporal": ("tab:blue", "s"), "separate": ("tab:green", "^"),
          "inference_only": ("tab:gray", "x"), "finetune_only": ("tab:purple", "d")}


def plot_results(panels: Sequence[tuple[str, Sequence[RunResult]]], path: str,
                 slo_note: Optional[Sequence[str]] = None) -> None:
    """PNG: one column per (title, results), rows SLO attainment / finetuning tokens/s / inference tokens/s
    against the arrival rate, one line per policy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not panels:
        raise ValueError("nothing to plot")
    cols = len(panels)
    fig, axes = plt.subplots(3, cols, figsize=(4.2 * cols, 8.4), squeeze=False, sharex="col")
    rows = (("slo_attainment", "SLO attainment (%)", 100.0), ("finetune_tokens_per_s", "finetuning tokens/s", 1.0),
            ("inference_tokens_per_s", "inference tokens/s", 1.0))
    for c, (title, results) in enumerate(panels):
        policies = sorted({r.policy for r in results}, key=lambda p: list(_STYLE).index(p) if p in _STYLE else 99)
        for r_i, (field, label, scale) in enumerate(rows):
            ax = axes[r_i][c]
            for p in policies:
                pts = sorted((r.rate, getattr(r, field) * scale) for r in results if r.policy == p)
                color, marker = _STYLE.get(p, ("black", "."))
                if p == "finetune_only":        # serves nothing: its finetuning throughput is the peak to compare
                    if field == "finetune_tokens_per_s" and pts:
                        ax.axhline(pts[0][1], color=color, linestyle="--", label="finetune_only (peak)")
                    continue
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker=marker, color=color, label=p)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel(label)
            if field == "slo_attainment":
                ax.set_ylim(-2, 102)
            else:
                ax.set_ylim(bottom=0)
            if r_i == 0:
                ax.set_title(title + (f"\n{slo_note[c]}" if slo_note else ""), fontsize=9)
            if r_i == 2:
                ax.set_xlabel("arrival rate per instance (req/s)")
        axes[1][c].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
