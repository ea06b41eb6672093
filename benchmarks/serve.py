"""flexc serve under load: 100 concurrent streaming chats while a fine-tuning job runs, over loopback HTTP.

    python benchmarks/serve.py --out benchmarks/results/serve.json

Starts ``flexc serve smollm2-135m`` on 127.0.0.1 (a free port, a temporary
data directory), uploads the shipped Veltrax training file and starts a
fine-tuning job on it, waits until the job runs, then opens ``--requests``
streaming chat completions at once (built-in prompts, ``--max-tokens`` output
tokens each with ``ignore_eos``, usage included) and reads them to the end.
Bounded: every request has a deadline and the run stops after ``--timeout``
seconds.

Checked per run (reported, nothing asserted): every request answered 200, its
chunks share one id, its stream ends with ``data: [DONE]``, the ids of all
requests are distinct, the server counted exactly as many finished requests
and generated tokens as the clients received (``/metrics`` before and after:
no request lost or duplicated). Reported: TTFT (request sent -> first content
chunk) and TPOT ((last - first chunk) / (tokens - 1)) percentiles, output
tokens/s over the burst, and the job's steps, loss and status during it.
Writes a JSON beside the printed summary.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from flexc import main_job  # noqa: E402
from flexc.runtime.metrics import percentile  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    return percentile(xs, q)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_sum(text: str, name: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name))


async def one_chat(client: httpx.AsyncClient, i: int, args: argparse.Namespace) -> dict:
    """One streaming chat; what the client saw."""
    body = {"model": "smollm2-135m", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": main_job.PROMPTS[i % len(main_job.PROMPTS)]}],
            "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    out = {"i": i, "status": None, "ids": set(), "done": False, "chunks": 0, "usage": None, "error": None}
    t0 = time.perf_counter()
    times = []
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, timeout=args.timeout) as r:
            out["status"] = r.status_code
            async for line in r.aiter_lines():
                if not line:
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    continue
                obj = json.loads(line[len("data: "):])
                if "error" in obj:
                    out["error"] = obj["error"]["message"]
                    continue
                out["ids"].add(obj["id"])
                out["chunks"] += 1
                if obj.get("usage"):
                    out["usage"] = obj["usage"]
                if obj["choices"] and obj["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    n = out["usage"]["completion_tokens"] if out["usage"] else 0
    out["ttft"] = times[0] - t0 if times else None
    out["tpot"] = (times[-1] - times[0]) / (n - 1) if len(times) > 1 and n > 1 else None
    out["end"] = time.perf_counter()
    out["ids"] = sorted(out["ids"])
    return out


async def burst(url: str, headers: dict, args: argparse.Namespace) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=args.requests + 10, max_keepalive_connections=args.requests + 10)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=args.timeout) as client:
        t0 = time.perf_counter()
        res = await asyncio.wait_for(asyncio.gather(*(one_chat(client, i, args) for i in range(args.requests))),
                                     args.timeout)
    return res, t0


def job_state(http: httpx.Client, job_id: str) -> dict:
    job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    events = http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    steps = [e["data"] for e in events if e.get("type") == "metrics"]
    last = max(steps, key=lambda s: s["step"]) if steps else None
    return {"status": job["status"], "step": last["step"] if last else 0,
            "total_steps": last["total_steps"] if last else None, "loss": last["train_loss"] if last else None,
            "trained_tokens": job.get("trained_tokens") or 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=1800.0, help="bound of the whole burst, seconds")
    ap.add_argument("--tpot-slo-ms", type=float, default=1000.0)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (1: no OpenMP spinning on a shared machine)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "serve.json"))
    args = ap.parse_args()

    load_start = round(os.getloadavg()[0], 2)          # the machine may be shared: say how busy it was
    data_dir = tempfile.mkdtemp(prefix="flexc-serve-bench-")
    port = free_port()
    key = "bench-key"
    cmd = [sys.executable, "-m", "flexc.cli", "serve", "--port", str(port), "--data-dir", data_dir,
           "--api-key", key, "--tpot-slo-ms", str(args.tpot_slo_ms), "--checkpoint-every", "1000"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log_path = os.path.join(data_dir, "server.log")
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    try:
        http = httpx.Client(base_url=url, headers=headers, timeout=60)
        while True:
            if proc.poll() is not None:
                sys.exit(f"server exited ({proc.returncode}); see {log_path}")
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        startup = time.perf_counter() - t_start
        print(f"server up in {startup:.0f} s (pid {proc.pid}, {url})", flush=True)
        with open(main_job.TRAIN_FILE, "rb") as f:
            fid = http.post("/v1/files", files={"file": ("veltrax.jsonl", f)},
                            data={"purpose": "fine-tune"}).json()["id"]
        job = http.post("/v1/fine_tuning/jobs", json={"model": "smollm2-135m", "training_file": fid, "seed": 0,
                                                      "hyperparameters": {"n_epochs": 50}}).json()
        while job_state(http, job["id"])["status"] != "running":
            time.sleep(0.2)
        before = job_state(http, job["id"])
        m0 = http.get("/metrics").text
        res, t0 = asyncio.run(burst(url, headers, args))
        wall = max(r["end"] for r in res) - t0
        after = job_state(http, job["id"])
        m1 = http.get("/metrics").text
        http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    ok = [r for r in res if r["status"] == 200 and r["done"] and r["error"] is None and len(r["ids"]) == 1]
    ids = [r["ids"][0] for r in ok]
    tokens = sum(r["usage"]["completion_tokens"] for r in ok if r["usage"])
    finished = metric_sum(m1, "flexc:e2e_request_latency_seconds_count") - metric_sum(
        m0, "flexc:e2e_request_latency_seconds_count")
    generated = metric_sum(m1, "flexc:generation_tokens_total") - metric_sum(m0, "flexc:generation_tokens_total")
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    summary = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(), "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]),
        "requests": args.requests, "max_tokens": args.max_tokens, "tpot_slo_ms": args.tpot_slo_ms,
        "load_average_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
        "load_average_1m_at_start": load_start,
        "server_startup_s": round(startup, 1), "ok": len(ok), "errors": [r["error"] for r in res if r not in ok],
        "distinct_ids": len(set(ids)), "all_done": all(r["done"] for r in res),
        "server_finished_requests": finished, "client_tokens": tokens, "server_generated_tokens": generated,
        "burst_wall_s": round(wall, 2), "output_tokens_per_s": round(tokens / wall, 1) if wall else None,
        "ttft_s": {q: round(pct(ttft, q), 3) for q in (50, 90, 99)},
        "tpot_ms": {q: round(1000 * pct(tpot, q), 1) for q in (50, 90, 99)},
        "job_before": before, "job_after": after,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    print(f"requests    {len(ok)}/{args.requests} ok, {len(set(ids))} distinct ids, every stream ended with [DONE]: "
          f"{summary['all_done']}; server counted {finished:.0f} finished, {generated:.0f} tokens "
          f"(clients got {tokens})")
    print(f"latency     TTFT p50/p90/p99 {pct(ttft, 50):.2f}/{pct(ttft, 90):.2f}/{pct(ttft, 99):.2f} s, "
          f"TPOT p50/p90/p99 {1000 * pct(tpot, 50):.0f}/{1000 * pct(tpot, 90):.0f}/{1000 * pct(tpot, 99):.0f} ms")
    print(f"throughput  {summary['output_tokens_per_s']} output tokens/s over {wall:.1f} s")
    print(f"finetuning  job {after['status']}: step {before['step']} -> {after['step']} of {after['total_steps']}, "
          f"loss {before['loss']} -> {after['loss']}, trained tokens {before['trained_tokens']} -> "
          f"{after['trained_tokens']}")
    print(f"machine     {summary['machine']}, load average {load_start} at the start, "
          f"{summary['load_average_1_5_15_at_end']} (1/5/15 min) at the end; server up in {startup:.0f} s")
    print(f"wrote       {args.out}")


if __name__ == "__main__":
    main()
