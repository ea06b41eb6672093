"""``flexc run``: the main job. Co-serve inference and LoRA finetuning on the embedded model.

On SmolLM2-135M-Instruct (CPU by default) one engine serves a synthetic
inference load (Poisson arrivals at ``--rate`` requests/s, chat prompts from a
small built-in list, 16-64 output tokens) while a finetuning job teaches a new
adapter ``skill`` sixteen facts about Veltrax, a fictional planet the base
model cannot know (``flexc/data/veltrax.jsonl``). For ``--duration`` seconds
every iteration carries both kinds of tokens; a one-line progress display on
stderr shows req/s, TPOT p50, SLO attainment, finetuning tokens/s, step and
loss. Then: a summary, the adapter saved in PEFT format, a before/after check
(greedy answers to ``flexc/data/veltrax_eval.jsonl`` with the base model and
with the saved adapter, scored by whether they contain the expected keyword)
and a PNG of inference and finetuning throughput over time.

    flexc run                                  # what `make run` runs
    flexc run --rate 1 --duration 60 --out-dir /tmp/run
    flexc run --tp 3 --duration 60             # three ranks on this machine (runtime.tp_engine.run_tp)
    flexc run --backend inductor               # serving graphs through torch.compile, compiled at start-up
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Optional, Sequence, TextIO

from flexc.progress import Progress
from flexc.runtime.metrics import percentile
from flexc.verdict import (MachineLoad, RunFacts, busy_cores, decodes_in_flight, exit_status, judge, read_load,
                           threads_for, tpot_out_of_reach)

if TYPE_CHECKING:
    from flexc.runtime.engine import Engine

logger = logging.getLogger(__name__)

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TRAIN_FILE = os.path.join(DATA_DIR, "veltrax.jsonl")
EVAL_FILE = os.path.join(DATA_DIR, "veltrax_eval.jsonl")
ADAPTER = "skill"

PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain photosynthesis in simple terms.",
    "Write a haiku about autumn leaves.",
    "How do I boil an egg so the yolk stays soft?",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
    "Suggest a name for a small coffee shop near the sea.",
    "I have a job interview tomorrow for a junior data analyst position at a logistics company. "
    "What questions should I expect, and how should I prepare tonight?",
    "Translate 'good morning, how are you?' into Spanish.",
    "What are the health benefits of regular walking?",
    "My tomato plants have yellow leaves at the bottom and some brown spots. The weather has been "
    "rainy for two weeks. What could be wrong and what should I do?",
    "Write a short thank-you note to a colleague who helped me move.",
    "How does a refrigerator keep food cold?",
    "List five fruits that are rich in vitamin C.",
    "Can you explain what a neural network is to a ten-year-old?",
    "I want to start running but I get tired after two minutes. Could you make me a gentle four-week "
    "plan that builds up to running twenty minutes without stopping?",
    "What should I pack for a weekend camping trip?",
    "Describe the water cycle.",
)
"""User prompts of realistic, mixed lengths (sent through the chat template)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadRequest:
    """One synthetic inference request of the load."""

    arrival: float
    """Seconds after the start of co-serving at which the request arrives."""
    prompt: str
    max_new_tokens: int
    adapter: Optional[str] = None


def make_arrivals(rate: float, duration: float, seed: int) -> list[float]:
    """Poisson arrival times (seconds, increasing) in ``[0, duration)`` at ``rate`` requests/s; seeded."""
    if not (rate >= 0 and math.isfinite(rate)):
        raise ValueError(f"--rate must be a non-negative number of requests per second, got {rate!r}")
    if not (duration > 0 and math.isfinite(duration)):
        raise ValueError(f"--duration must be a positive number of seconds, got {duration!r}")
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    while rate > 0:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        out.append(t)
    return out


def make_load(rate: float, duration: float, seed: int, *, min_new_tokens: int = 16, max_new_tokens: int = 64,
              adapter_share: float = 0.0, adapter: Optional[str] = None) -> list[LoadRequest]:
    """The seeded request stream: Poisson arrivals, built-in prompts, outputs of 16-64 tokens; a share of the
    requests (``adapter_share``) asks for ``adapter``."""
    rng = random.Random(seed + 1)
    return [LoadRequest(arrival=t, prompt=rng.choice(PROMPTS),
                        max_new_tokens=rng.randint(min_new_tokens, max_new_tokens),
                        adapter=adapter if adapter is not None and rng.random() < adapter_share else None)
            for t in make_arrivals(rate, duration, seed)]


EVAL_FORMAT = '{"question": str, "keyword": str}'


def load_eval(path: str = EVAL_FILE, what: str = "--eval") -> list[dict]:
    """The evaluation questions: JSONL of ``{"question", "keyword"}``; a missing, malformed or empty file is a
    ValueError naming ``what`` and the path (or ``file:line``)."""
    from flexc.runtime.dataset import parse_jsonl_line, read_text
    items = []
    for lineno, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{what}: {path}:{lineno}"
        item = parse_jsonl_line(line, where, EVAL_FORMAT)
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) \
                or not isinstance(item.get("keyword"), str):
            keys = f"an object with keys {sorted(item)}" if isinstance(item, dict) else f"{type(item).__name__}"
            raise ValueError(f"{where}: expected {EVAL_FORMAT}, got {keys}")
        items.append(item)
    if not items:
        raise ValueError(f"{what}: {path} has no questions (the file is empty); expected one {EVAL_FORMAT} per line")
    return items


def score_answers(answers: Sequence[str], keywords: Sequence[str]) -> float:
    """Fraction of answers that contain their keyword (case-insensitive)."""
    if len(answers) != len(keywords):
        raise ValueError(f"{len(answers)} answers for {len(keywords)} keywords")
    if not answers:
        return 0.0
    return sum(k.lower() in a.lower() for a, k in zip(answers, keywords)) / len(answers)


def evaluate(engine: "Engine", items: Sequence[dict], adapter: Optional[str], max_new_tokens: int = 24
             ) -> tuple[float, list[str]]:
    """Greedy answers to the eval questions (with ``adapter``, or the base model); (accuracy, answers)."""
    res = engine.generate([it["question"] for it in items], max_new_tokens=max_new_tokens, adapter=adapter, chat=True)
    answers = [r.text.strip() for r in res]
    return score_answers(answers, [it["keyword"] for it in items]), answers


@dataclasses.dataclass(kw_only=True)
class ServeStats:
    """What one co-serving run produced (times in seconds)."""

    wall: float
    submitted: int
    results: list = dataclasses.field(default_factory=list)
    """GenerationResults of the requests that finished inside the run."""
    aborted: int = 0


def serve(engine: "Engine", load: Sequence[LoadRequest], duration: float, *, job=None,
          progress: Optional[Progress] = None, tpot_slo: float = math.inf, ttft_slo: float = math.inf,
          drain: bool = False) -> ServeStats:
    """Submit each request once its arrival time has passed and step the engine until ``duration`` seconds
    (finetuning iterations fill the time no request needs). With ``drain``, requests still running at the end
    are finished (no new arrivals); otherwise they are aborted."""
    t0 = time.perf_counter()
    pending = list(load)
    i = 0
    live: set[str] = set()
    stats = ServeStats(wall=0.0, submitted=0)

    def collect(events) -> None:
        for ev in events:
            if ev.finished and ev.request_id in live:
                live.discard(ev.request_id)
                stats.results.append(engine.result(ev.request_id, release=True))

    while True:
        now = time.perf_counter() - t0
        if now >= duration and not (drain and live):
            break
        while i < len(pending) and pending[i].arrival <= now and now < duration:
            r = pending[i]
            live.add(engine.submit(r.prompt, max_new_tokens=r.max_new_tokens, adapter=r.adapter, chat=True))
            stats.submitted += 1
            i += 1
        if engine.has_work():
            collect(engine.step())
        else:                                   # idle: nothing to run until the next arrival
            nxt = pending[i].arrival if i < len(pending) else duration
            time.sleep(min(max(min(nxt, duration) - now, 0.001), 0.5))
        if progress is not None:
            progress.update(_progress_line(now, stats, job, tpot_slo, ttft_slo, engine.latency.drift),
                            time.perf_counter())
    for rid in live:
        engine.abort(rid)
        stats.aborted += 1
    stats.wall = time.perf_counter() - t0
    if progress is not None:
        progress.update(_progress_line(stats.wall, stats, job, tpot_slo, ttft_slo, engine.latency.drift),
                        time.perf_counter(), force=True)
        progress.close()
    return stats


def _progress_line(now: float, stats: ServeStats, job, tpot_slo: float, ttft_slo: float, drift=None) -> str:
    res = stats.results
    tpots = [r.tpot for r in res]
    ok = sum(r.tpot <= tpot_slo and r.ttft <= ttft_slo for r in res)
    line = (f"[{now:6.1f}s] {len(res) / max(now, 1e-9):4.2f} req/s  TPOT p50 {1000 * percentile(tpots, 50):5.0f} ms  "
            f"SLO {100 * ok / len(res) if res else 100:5.1f}%")
    if job is not None:
        loss = f"{job.loss_history[-1]:.3f}" if job.loss_history else "  -  "
        line += f"  | finetune {job.tokens_per_second:5.1f} tok/s  step {job.step}/{job.total_steps}  loss {loss}"
    if drift is not None:               # the latency model saw iterations off its start-up profile and adapted
        line += f"  | iterations {drift.ratio:.2f}x the profiled time"
    return line


def plot_throughput(history: Sequence[dict], path: str, *, bucket: float = 5.0, title: str = "") -> None:
    """PNG of generated inference tokens/s and finetuning tokens/s (forward tokens) over time, in buckets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not history:
        raise ValueError("no iterations were recorded: nothing to plot")
    end = max(h["t"] + h["seconds"] for h in history)
    n = max(int(math.ceil(end / bucket)), 1)
    inf = [0.0] * n
    ft = [0.0] * n
    width = [bucket] * (n - 1) + [max(end - (n - 1) * bucket, 1e-3)]      # the last bucket is partial
    for h in history:
        b = min(int(h["t"] // bucket), n - 1)
        inf[b] += h.get("generated_tokens", h.get("decode_tokens", 0)) / width[b]
        ft[b] += h["ft_forward_tokens"] / width[b]
    xs = [k * bucket + width[k] / 2 for k in range(n)]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(xs, inf, label="inference (generated tokens/s)", color="tab:blue")
    ax.plot(xs, ft, label="finetuning (forward tokens/s)", color="tab:orange")
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens/s")
    ax.set_title(title or "co-serving throughput")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@contextlib.contextmanager
def quiet_stderr():
    """Hide what libraries write to stderr (GGUF conversion progress bars) unless the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=150.0, help="seconds of co-serving (default 150)")
    p.add_argument("--rate", type=float, default=0.5, help="inference requests per second, Poisson (default 0.5)")
    p.add_argument("--policy", default="coserve", choices=("coserve", "temporal"),
                   help="how finetuning shares the iterations: coserve (default) or temporal (the job always "
                        "finetunes; benchmarks/coserve.py compares inference_only)")
    p.add_argument("--tpot-slo", type=float, default=0.25, help="TPOT target in seconds (default 0.25)")
    p.add_argument("--ttft-slo", type=float, default=5.0, help="TTFT target in seconds, queueing included (default 5)")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="AdamW peak learning rate, decayed linearly to 0 over the job (default 2e-3)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the dataset (default 3)")
    p.add_argument("--data", default=TRAIN_FILE, help="finetuning JSONL (default: the shipped Veltrax facts)")
    p.add_argument("--eval", dest="eval_file", default=EVAL_FILE,
                   help="JSONL of {question, keyword} (default: the 16 Veltrax questions shipped with flexc)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrivals and the adapter init (default 0)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per rank (default 0: torch's choice on a quiet machine, the cores other "
                        "processes leave free on a busy one, the cores split over the ranks at --tp > 1)")
    p.add_argument("--backend", default="eager", choices=("eager", "inductor"),
                   help="how the serving graphs run: eager (default: starts at once) or inductor (torch.compile, C++ "
                        "on a CPU: faster iterations after a compile at start-up, reported)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel degree: ranks started on this machine (gloo on CPU; default 1); must "
                        "divide the model's heads (SmolLM2-135M: 1 or 3)")
    p.add_argument("--out-dir", default=os.path.join("flexc-run", "adapter"),
                   help="where the adapter, summary.json and throughput.png go (default ./flexc-run/adapter)")
    p.add_argument("--slo-target", type=float, default=0.9,
                   help="share of submitted requests that should meet both SLOs; below it (or with finetuning "
                        "stalled) the summary says so and why (default 0.9)")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when the run fell short (SLO attainment below --slo-target, or "
                        "finetuning made no progress); default: report it and exit 0")


def _build_engine(*, dims=None, policy: str, tpot_slo: float, ttft_slo: float, latency_profile: str,
                  backend: str) -> "Engine":
    """One rank's engine (``dims`` None: the single-process engine); quiet unless it fails."""
    import flexc
    with quiet_stderr():
        return flexc.Engine.from_pretrained("smollm2-135m", lora=flexc.LoraSpec(r=16, alpha=32), policy=policy,
                                            tpot_slo=tpot_slo, ttft_slo=ttft_slo, token_budget=256, backend=backend,
                                            kv_cache_tokens=16384, latency_profile=latency_profile, dims=dims)


def check_inputs(args: argparse.Namespace) -> tuple[list[LoadRequest], list[dict]]:
    """Every flag and input file checked before any model is built (seconds, not the engine's minute):
    (the request load, the eval questions); ValueError naming the flag and what is wrong."""
    from flexc.runtime.dataset import check_jsonl
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    for name in ("tpot_slo", "ttft_slo"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive seconds, got {getattr(args, name)}")
    if not 0 <= args.slo_target <= 1:
        raise ValueError(f"--slo-target must be a fraction in [0, 1], got {args.slo_target}")
    load = make_load(args.rate, args.duration, args.seed, adapter_share=0.25, adapter=ADAPTER)
    check_jsonl(args.data, "--data")
    items = load_eval(args.eval_file, "--eval")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise ValueError(f"--out-dir: {args.out_dir} exists and is not a directory")
    return load, items


def main(args: argparse.Namespace) -> int:
    import functools

    from flexc.ir.artifact import model_shape
    from flexc.models import resolve_model
    from flexc.passes.parallelize import check_tp
    others = busy_cores()                   # NOTE: before this job runs anything: the others' load, now
    load_start = others if others is not None else read_load()
    load, items = check_inputs(args)
    try:
        check_tp(model_shape(resolve_model("smollm2-135m")), args.tp)     # before any rank starts
    except ValueError as e:
        raise ValueError(f"--{e}") from None            # "--tp=2 does not divide num_heads=9; allowed ..."
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out-dir: cannot create {args.out_dir}: {e.strerror or e}") from None

    import torch

    from flexc.runtime.tp_engine import run_tp
    # NOTE: ranks share the machine's cores; more threads than cores slows every rank down
    cores = os.cpu_count() or 1
    if args.threads or args.tp > 1:
        threads = args.threads or max(1, cores // args.tp)
    else:
        threads = threads_for(cores, others)
        if threads:
            print(f"flexc run: other processes keep {others:.1f} of {cores} cores busy: computing with "
                  f"{threads} torch thread{'s' if threads > 1 else ''} (--threads sets it)", flush=True)
    if threads:
        torch.set_num_threads(threads)

    t_setup = time.perf_counter()
    tp_note = (f", tp={args.tp}" if args.tp > 1 else "") + (f", {args.backend}" if args.backend != "eager" else "")
    print(f"flexc run: building the engine (smollm2-135m, LoRA r=16, policy {args.policy}{tp_note}) ...",
          file=sys.stdout, flush=True)
    profile = "latency.json" if args.tp == 1 else f"latency-tp{args.tp}.json"
    build = functools.partial(_build_engine, policy=args.policy, tpot_slo=args.tpot_slo, ttft_slo=args.ttft_slo,
                              latency_profile=os.path.join(args.out_dir, profile), backend=args.backend)
    return run_tp(functools.partial(_drive, args, load, items, t_setup, load_start), build, args.tp,
                  threads=threads)


def _drive(args: argparse.Namespace, load: Sequence[LoadRequest], items: list[dict], t_setup: float,
           load_start: Optional[float], engine: "Engine") -> int:
    """The run on the built engine (rank 0's at tp > 1): finetune beside the load, save, evaluate, report."""
    out = sys.stdout
    # NOTE: linear decay to 0 over the job: the adapter settles at the end instead of oscillating between facts
    job = engine.finetune(args.data, adapter=ADAPTER, lr=args.lr, epochs=args.epochs, seed=args.seed,
                          schedule="linear")
    compiled = engine.executor.compile_seconds
    print(f"engine ready in {time.perf_counter() - t_setup:.0f} s"
          + (f" (Inductor compiled the serving graph in {compiled:.0f} s)" if compiled else "")
          + f"; co-serving {args.duration:.0f} s: "
          f"{len(load)} requests at {args.rate:g} req/s (a quarter ask for adapter '{ADAPTER}' while it trains), "
          f"finetuning '{ADAPTER}' on {os.path.basename(args.data)} ({job.total_steps} steps, lr {args.lr:g} "
          "decaying linearly)",
          file=out, flush=True)
    decode_s = _decode_only_s(engine)
    k = decodes_in_flight(decode_s, args.rate, sum(r.max_new_tokens for r in load) / len(load),
                          limit=len(load)) if load else 0          # NOTE: a short run never holds more
    reach = tpot_out_of_reach(k, decode_s(k) if k else None, args.tpot_slo)
    if reach is not None:
        print(f"flexc run: warning: {reach} (about {k} requests in flight at {args.rate:g} req/s; start-up "
              "latency profile)", file=out, flush=True)

    h0 = len(engine.metrics().history)
    stats = serve(engine, load, args.duration, job=job, progress=Progress(), tpot_slo=args.tpot_slo,
                  ttft_slo=args.ttft_slo)
    load_end = read_load()
    m = engine.metrics()                      # NOTE: snapshot before the evaluation adds its own iterations
    # each iteration's time against the start-up profile's prediction of it (the live model refits itself)
    compared = [h for h in m.history[h0:] if h.get("profiled_s")]
    decodes = sorted(h["decode_tokens"] for h in m.history[h0:] if h.get("decode_tokens"))
    typical = decodes[len(decodes) // 2] if decodes else 0
    typical_s = decode_s(typical) if typical else None
    adapter_dir = args.out_dir
    engine.save_adapter(ADAPTER, adapter_dir)

    # before/after: the base model, and the saved adapter loaded back as a frozen copy
    engine.load_adapter("skill-saved", adapter_dir)
    acc_before, ans_before = evaluate(engine, items, None)
    acc_after, ans_after = evaluate(engine, items, "skill-saved")
    png = os.path.join(args.out_dir, "throughput.png")
    plot_throughput(m.history, png, title=f"smollm2-135m co-serving, {args.rate:g} req/s, policy {args.policy}")

    res = stats.results
    ok = sum(r.tpot <= args.tpot_slo and r.ttft <= args.ttft_slo for r in res)
    import torch
    machine = MachineLoad(cores=os.cpu_count() or 1, start=load_start, end=load_end,
                          own_threads=torch.get_num_threads(), busy_fraction=m.busy_fraction)
    verdict = judge(RunFacts(submitted=stats.submitted, finished=len(res), slo_met=ok, slo_target=args.slo_target,
                             ft_status=job.status.value, ft_steps=job.step,
                             ft_total_steps=job.total_steps, losses=list(job.loss_history), ft_error=job.error,
                             load=machine, observed_s=sum(h["seconds"] for h in compared) if compared else None,
                             profiled_s=sum(h["profiled_s"] for h in compared) if compared else None,
                             iterations_compared=len(compared), tpot_slo=args.tpot_slo, decodes=typical,
                             decode_only_s=typical_s))
    summary = {
        "policy": args.policy, "tp": args.tp, "backend": args.backend,
        "compile_s": round(engine.executor.compile_seconds, 1), "rate": args.rate, "duration_s": round(stats.wall, 1),
        "requests": {"submitted": stats.submitted, "finished": len(res), "aborted_at_end": stats.aborted,
                     "slo_attainment": ok / len(res) if res else None,
                     "ttft_p50_s": percentile([r.ttft for r in res], 50), "ttft_p99_s": percentile([r.ttft for r in res], 99),
                     "tpot_p50_s": percentile([r.tpot for r in res], 50), "tpot_p99_s": percentile([r.tpot for r in res], 99)},
        "engine": m.to_dict(), "finetune": job.summary(),
        "loss_first_last": [job.loss_history[0], job.loss_history[-1]] if job.loss_history else None,
        "eval": {"before": acc_before, "after": acc_after,
                 "answers": [{"question": it["question"], "keyword": it["keyword"], "before": b, "after": a}
                             for it, b, a in zip(items, ans_before, ans_after)]},
        "verdict": verdict.to_dict(), "machine": dataclasses.asdict(machine),
    }
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    _print_summary(args, summary, m, job, items, verdict, out)
    print(f"wrote       {adapter_dir}/adapter_model.safetensors (PEFT), {png}, "
          f"{os.path.join(args.out_dir, 'summary.json')}", file=out)
    return exit_status(verdict, args.strict)


def _decode_only_s(engine: "Engine"):
    """Seconds the engine's latency model (live: refitted as the run goes) predicts for an iteration of k decodes."""
    from flexc.runtime.latency import IterationWork
    return lambda k: engine.latency.predict(IterationWork(decode_tokens=k))


def _print_summary(args: argparse.Namespace, summary: dict, m, job, items: list[dict], verdict, out: TextIO) -> None:
    rq = summary["requests"]
    print(f"\ninference   {rq['finished']}/{rq['submitted']} requests finished, SLO attainment "
          f"{100 * (rq['slo_attainment'] or 0):.1f}% "
          f"(TPOT <= {args.tpot_slo * 1000:.0f} ms, TTFT <= {args.ttft_slo:g} s)"
          f"\n            TTFT p50/p99 {rq['ttft_p50_s']:.2f}/{rq['ttft_p99_s']:.2f} s, "
          f"TPOT p50/p99 {1000 * rq['tpot_p50_s']:.0f}/{1000 * rq['tpot_p99_s']:.0f} ms, "
          f"{m.inference_tokens_per_s:.1f} tokens/s", file=out)
    loss = (f"loss {job.loss_history[0]:.3f} -> {job.loss_history[-1]:.3f}" if job.loss_history else "no step yet")
    print(f"finetuning  job {job.status}, step {job.step}/{job.total_steps}, {loss}, "
          f"{m.finetune_tokens_per_s:.1f} tokens/s (engine busy {100 * m.busy_fraction:.0f}% of the time)", file=out)
    ev = summary["eval"]
    print(f"skill       Veltrax questions answered with the keyword: before {100 * ev['before']:.0f}%, "
          f"after {100 * ev['after']:.0f}% ({len(items)} questions, greedy)", file=out)
    for a in ev["answers"][:3]:
        print(f"            Q: {a['question']}\n              before: {a['before'][:70]!r}\n"
              f"              after:  {a['after'][:70]!r}", file=out)
    for line in verdict.lines():
        print(line, file=out)
