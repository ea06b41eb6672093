"""The main job on a busy machine, then on a quiet one: does it finish, and does it say what happened?

    python benchmarks/busy_run.py                           # two full `flexc run`s: about 10-15 minutes
    python benchmarks/busy_run.py --busy 1 --run-args "--duration 10" --out /tmp/busy_smoke.json   # smoke

First ``--busy`` CPU busy loops start (``python -c 'while True: pass'``, one
process each); ``flexc run --strict`` (the main job, default arguments plus
``--run-args``) runs beside them; the loops are killed (also when anything
fails) and the same command runs again on the quiet machine right after. Both
runs share one ``--out-dir`` as two ``make run``s in one checkout do: the
latency profile the busy run fits and saves is what the quiet run finds there.
Per run: exit status (1: the job's verdict was not ok), wall time, the 1-minute
load average before and after, the tail of its output (the summary and the
verdict) and its ``summary.json`` (requests, finetuning, verdict). Nothing is
asserted; both summaries are printed and written to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from results_json import write_result

TAIL_LINES = 16


def busy_loops(n: int) -> list[subprocess.Popen]:
    """``n`` processes that each keep one core busy until killed."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def run_main_job(run_args: list[str], out_dir: str, timeout: float) -> dict:
    """One ``flexc run --strict`` as a subprocess: its exit status, wall time, load averages, output tail and
    summary.json."""
    cmd = [sys.executable, "-m", "flexc.cli", "run", "--strict", "--out-dir", out_dir, *run_args]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    summary_path = os.path.join(out_dir, "summary.json")
    summary = None
    if r.returncode in (0, 1) and os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        os.remove(summary_path)                 # NOTE: the next run must not be credited with this one's file
    return {"command": " ".join(shlex.quote(c) for c in cmd[1:]), "exit_status": r.returncode,
            "wall_s": round(wall, 1), "load_before": load_before, "load_after": os.getloadavg()[0],
            "stdout_tail": r.stdout.splitlines()[-TAIL_LINES:], "stderr_tail": r.stderr.splitlines()[-4:],
            "summary": _brief(summary)}


def _brief(summary: dict | None) -> dict | None:
    """What the comparison needs from a run's summary.json (the engine's per-iteration numbers left out)."""
    if summary is None:
        return None
    return {k: summary.get(k) for k in ("requests", "finetune", "loss_first_last", "verdict", "machine")} | \
        {"eval": {k: summary["eval"][k] for k in ("before", "after")}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", type=int, default=2, help="CPU busy-loop processes during the first run (default 2)")
    p.add_argument("--run-args", default="", help="extra arguments to flexc run, e.g. '--duration 30'")
    p.add_argument("--out-dir", default=None,
                   help="the runs' shared --out-dir (default: a fresh temporary directory, no saved profile)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per run (default 1800)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "busy_run.json"))
    args = p.parse_args()
    if args.busy < 0:
        p.error(f"--busy must be >= 0, got {args.busy}")
    run_args = shlex.split(args.run_args)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="flexc-busy-run-")
    loops = busy_loops(args.busy)
    try:
        time.sleep(1.0)                             # the loops are running before the job starts
        busy = run_main_job(run_args, out_dir, args.timeout)
    finally:
        stop(loops)
    quiet = run_main_job(run_args, out_dir, args.timeout)
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.system()}", "busy_loops": args.busy, "run_args": run_args, "out_dir": out_dir,
        "busy": busy, "quiet": quiet,
    }
    write_result(args.out, result)
    for name, r in (("busy", busy), ("quiet", quiet)):
        label = f"{args.busy} busy loops" if name == "busy" else "nothing else started"
        print(f"== {name} run ({label}): exit status {r['exit_status']}, {r['wall_s']:.0f} s, load average "
              f"{r['load_before']:.1f} before, {r['load_after']:.1f} after")
        print("\n".join(r["stdout_tail"] + r["stderr_tail"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
