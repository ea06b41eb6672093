"""Compile time and peak memory of `flexc compile` on the shape-only presets.

Each preset is compiled in a fresh process (`flexc compile PRESET`), as a user
would run it, twice: first with an empty capture cache (the regions are captured
and kept), then again (the regions are loaded from it). Wall time and the child's
peak RSS (ru_maxrss) are measured. Prints a table and writes JSON (--out).
Nothing is asserted.

    python benchmarks/compile.py [--presets llama-3.1-8b,qwen2.5-14b,qwen2.5-32b] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

PRESETS = ("llama-3.1-8b", "qwen2.5-14b", "qwen2.5-32b")


def _machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}"


def measure(preset: str, extra: list[str], cache_dir: str) -> dict:
    """Run `flexc compile PRESET` in a child process with the capture cache in ``cache_dir``; wall seconds and
    peak RSS."""
    with tempfile.TemporaryDirectory() as d:
        plan_path = os.path.join(d, "plan.json")
        cmd = [sys.executable, "-m", "flexc.cli", "compile", preset, "-o", plan_path, *extra]
        env = {**os.environ, "FLEXC_CACHE_DIR": cache_dir}
        env.pop("FLEXC_CAPTURE_CACHE", None)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read()
        proc.stdout.close(), proc.stderr.close()
        if proc.returncode != 0:
            raise RuntimeError(f"{preset}: flexc compile failed: {err.strip().splitlines()[-1:]}")
        with open(plan_path) as f:
            plan = json.load(f)
    return {"preset": preset, "wall_s": round(wall, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
            "compile_seconds": plan["compile_seconds"], "layers": plan["model"]["num_layers"],
            "parameters": plan["model"]["parameters"], "trainable": plan["model"]["trainable_parameters"],
            "templates": len(set(plan["layer_regions"])), "passes": [p["name"] for p in plan["passes"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "compile.json"))
    ap.add_argument("extra", nargs="*", help="extra flexc compile arguments (after --)")
    args = ap.parse_args()
    rows = []
    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory() as cache_dir:
            for cache in ("empty", "warm"):
                rows.append({**measure(preset, args.extra, cache_dir), "capture_cache": cache})
    date = datetime.date.today().isoformat()
    print(f"flexc compile, {_machine()}, {date}")
    print(f"{'preset':<14} {'layers':>6} {'params':>8} {'templates':>9} {'capture cache':>13} {'wall s':>7} "
          f"{'in-process s':>12} {'peak RSS GiB':>12}")
    for r in rows:
        print(f"{r['preset']:<14} {r['layers']:>6} {r['parameters'] / 1e9:7.2f}B {r['templates']:>9} "
              f"{r['capture_cache']:>13} {r['wall_s']:>7.2f} {r['compile_seconds']:>12.2f} {r['peak_rss_gib']:>12.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": _machine(), "date": date, "command": "python benchmarks/compile.py", "rows": rows}, f,
                  indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
