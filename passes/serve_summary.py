"""The serving section of a summary, from the serve pass's report as ``plan.json`` holds it: no torch here, so
``flexc inspect`` prints it without loading torch."""
from __future__ import annotations

__all__ = ["serving_summary_lines"]


def serving_summary_lines(report: dict) -> list[str]:
    """The serving section of a summary, from the report as plan.json holds it (``flexc inspect`` reads that)."""
    lines = ["serving graphs (one call per layer and iteration for every token)"]
    for name, info in report.get("regions", {}).items():
        kinds = ", ".join(f"{k} {n}" for k, n in info["placeholders"].items())
        lines.append(f"  {name:<10} {info['num_nodes']:5d} nodes, {len(info['lora_linears'])} flexc::lora, "
                     f"{info['saved_outputs']} outputs for the backward "
                     f"({info['saved_bytes_per_finetuning_token']:,.0f} B per finetuning token)")
        lines.append(f"  {'':<10} placeholders: {kinds}")
    if report.get("sharded_regions"):
        lines.append(f"  sharded serving graphs (tp > 1): {', '.join(report['sharded_regions'])}")
    return lines
