"""``flexc simulate``: the real scheduler and policies at paper scale, on simulated GPUs.

Compiles the model (shape-only presets need no weights), prices its iterations
with the roofline cost model on the chosen GPU (or replays a measured latency
profile), and runs the engine's own scheduler, co-serving policies, KV cache
manager and finetuning jobs over a simulated executor and clock
(:mod:`flexc.runtime.simulator`), per arrival rate and policy::

    flexc simulate --model llama-3.1-8b --gpu a100-80gb --tp 1 --rates 1,2,3,4,5 \\
        --policies coserve,temporal,separate --duration 600 --png sim.png

prints a table (SLO attainment, TTFT/TPOT mean and p99, inference and
finetuning tokens/s), shows progress on stderr, writes JSON and, with ``--png``,
the figure in the shape of the FlexLLM paper's end-to-end plot. From Python::

    from flexc.simulate import simulate
    report = simulate("llama-3.1-8b", gpu="a100-80gb", rates=(1, 3, 5), policies=("coserve", "separate"))
    report.results[0].slo_attainment
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import sys
import time
from typing import Any, Optional

logger = logging.getLogger(__name__)

__all__ = ["simulate", "SimulationReport", "default_tpot_slo", "build_instance"]

PAPER_LORA = {"r": 16, "alpha": 16, "targets": ("down_proj",)}
"""The paper's adapter: LoRA r=16, alpha 16 on down_proj."""


@dataclasses.dataclass(kw_only=True)
class SimulationReport:
    """One model's simulated grid and how it was made."""

    model: str
    gpu: str
    tp: int
    cost: str
    """``roofline`` or ``measured``."""
    config: dict
    """The SimulationConfig (minus large fields) as JSON-ready values."""
    instance: dict
    """KV-cache tokens, layers, the policy's start-up latency model."""
    results: list
    """RunResult per (rate, policy)."""
    seconds: float
    """Wall seconds of compile + simulation."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["results"] = [r.to_dict() for r in self.results]
        return d


def default_tpot_slo(parameters: int) -> float:
    """The paper's TPOT SLO: 45 ms for the 8B model, 75 ms for the 14B and 32B ones."""
    return 0.045 if parameters < 10e9 else 0.075


def build_instance(model: str, *, gpu: Any = "a100-80gb", tp: int = 1, gpu_file: Optional[str] = None,
                   lora: Any = None, seq_len: int = 8192, token_budget: int = 256,
                   latency_profile: Optional[str] = None, kv_tokens: Optional[int] = None) -> tuple[Any, Any]:
    """(InstanceSpec, compiled model): compile ``model`` at ``tp`` (LoRA default: the paper's) and build its
    roofline instance on ``gpu`` (a name or a GPU), or, with ``latency_profile``, a measured one."""
    import flexc
    from flexc.ir.spec import LoraSpec
    from flexc.runtime.latency import LatencyModel
    from flexc.runtime.simulator.hardware import GPU, resolve_gpu
    from flexc.runtime.simulator.run import measured_instance, roofline_instance
    spec = LoraSpec.coerce(lora if lora is not None else dict(PAPER_LORA))
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"--tp must be a positive integer, got {tp!r}")
    options = {"tp": tp} if tp > 1 else {}
    compiled = flexc.compile(model, lora=spec, seq_len=seq_len, **options)
    if latency_profile is not None:
        latency = LatencyModel.load(latency_profile)
        if latency.num_layers != int(compiled.graph.model["num_layers"]):
            raise ValueError(f"{latency_profile} was profiled on a model with {latency.num_layers} layers, "
                             f"{model} has {compiled.graph.model['num_layers']}")
        return measured_instance(latency, kv_tokens=kv_tokens or 16384, max_model_len=seq_len + 1), compiled
    hw = gpu if isinstance(gpu, GPU) else resolve_gpu(gpu, gpu_file)
    inst = roofline_instance(compiled, hw, tp, token_budget=token_budget)
    if kv_tokens is not None:
        inst = dataclasses.replace(inst, kv_tokens=kv_tokens)
    return inst, compiled


def simulate(model: str = "llama-3.1-8b", *, gpu: Any = "a100-80gb", tp: int = 1, gpu_file: Optional[str] = None,
             lora: Any = None, seq_len: int = 8192, latency_profile: Optional[str] = None,
             kv_tokens: Optional[int] = None, tpot_slo: Optional[float] = None, progress: Any = None,
             **config: Any) -> SimulationReport:
    """Simulate ``model`` on ``tp`` GPUs for every rate and policy; ``config`` goes to ``SimulationConfig``
    (rates, policies, duration, arrivals, cv, lengths, ttft_slo, token_budget, grad_accum, ...). The TPOT SLO
    defaults to the paper's for the model's size."""
    from flexc.runtime.simulator.run import SimulationConfig
    from flexc.runtime.simulator.run import simulate as run_grid
    t0 = time.perf_counter()
    budget = int(config.get("token_budget", 256))
    inst, compiled = build_instance(model, gpu=gpu, tp=tp, gpu_file=gpu_file, lora=lora, seq_len=seq_len,
                                    token_budget=budget, latency_profile=latency_profile, kv_tokens=kv_tokens)
    slo = tpot_slo if tpot_slo is not None else default_tpot_slo(int(compiled.graph.model["parameters"]))
    cfg = SimulationConfig(tpot_slo=slo, **config)
    results = run_grid(inst, cfg, progress)
    gpu_name = "measured" if latency_profile else (gpu if isinstance(gpu, str) else gpu.name)
    shown = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("trace", "requests", "finetune", "lengths")}
    shown["lengths"] = repr(cfg.lengths) if cfg.trace is None else "trace"
    data = cfg.finetune_data()
    shown["finetune_sequences"] = {"count": len(data), "median_tokens": sorted(s.length for s in data)[len(data) // 2],
                                   "max_tokens": max(s.length for s in data)}
    instance = {"kv_tokens": inst.kv_tokens, "num_layers": inst.num_layers, "max_model_len": inst.max_model_len,
                "policy_latency_model": inst.latency.to_dict()}
    return SimulationReport(model=model, gpu=gpu_name, tp=tp, cost=inst.cost.name, config=shown, instance=instance,
                            results=results, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------- CLI
def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    from flexc.runtime.simulator.run import SIM_POLICIES
    p.add_argument("--model", default="llama-3.1-8b", help="preset or HF model directory (default llama-3.1-8b)")
    p.add_argument("--gpu", default="a100-80gb", help="a100-80gb (default), h100, h200, or one from --gpu-file")
    p.add_argument("--gpu-file", default=None, help="JSON file of more GPUs (fields of flexc.runtime.simulator.GPU)")
    p.add_argument("--tp", type=int, default=1, help="GPUs per instance, tensor parallel (default 1)")
    p.add_argument("--rates", type=_floats, default=(1.0, 2.0, 3.0, 4.0, 5.0),
                   help="arrival rates per instance, req/s, comma-separated (default 1,2,3,4,5)")
    p.add_argument("--policies", default="coserve,temporal,separate",
                   help=f"comma-separated, of {', '.join(SIM_POLICIES)} (default coserve,temporal,separate)")
    p.add_argument("--duration", type=float, default=600.0, help="simulated seconds per run (default 600)")
    p.add_argument("--arrivals", choices=("gamma", "poisson", "trace"), default="gamma",
                   help="gamma (bursty, --cv; default), poisson, or trace (--trace)")
    p.add_argument("--cv", type=float, default=2.0, help="coefficient of variation of gamma gaps (default 2)")
    p.add_argument("--trace", default=None, help="CSV TIMESTAMP,ContextTokens,GeneratedTokens (arrivals rescaled "
                   "to each rate; lengths from the trace)")
    p.add_argument("--lengths", choices=("sharegpt", "conversation"), default="sharegpt",
                   help="request lengths without a trace (default sharegpt)")
    p.add_argument("--tpot-slo", type=float, default=None,
                   help="seconds; default the paper's: 0.045 below 10B parameters, else 0.075")
    p.add_argument("--ttft-slo", type=float, default=5.0, help="queueing + TTFT seconds (default 5)")
    p.add_argument("--token-budget", type=int, default=256, help="tokens per iteration (default 256)")
    p.add_argument("--grad-accum", type=int, default=8, help="sequences per optimizer step (default 8)")
    p.add_argument("--min-finetune-share", type=float, default=0.05,
                   help="coserve's floor: share of the token budget (at least one backward layer) finetuning gets "
                   "every iteration, SLO or not (default 0.05; 0 puts the SLO first)")
    p.add_argument("--seq-len", type=int, default=8192,
                   help="longest finetuning sequence and context the model is compiled for (default 8192)")
    p.add_argument("--finetune-median", type=int, default=3000,
                   help="median finetuning sequence length in tokens (log-normal, sigma 0.6; default 3000)")
    p.add_argument("--latency-profile", default=None,
                   help="replay a measured latency profile (JSON of LatencyModel.save) instead of the roofline")
    p.add_argument("--kv-tokens", type=int, default=None, help="KV-cache tokens (default: what the memory plan "
                   "leaves on the GPUs; 16384 with --latency-profile)")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals, lengths and the finetuning data (default 0)")
    p.add_argument("--json", dest="json_out", default="simulate.json",
                   help="where to write the results JSON (default ./simulate.json)")
    p.add_argument("--png", default=None, help="write the figure (rows: SLO, finetuning and inference tokens/s)")


def _config(args: argparse.Namespace) -> dict:
    """SimulationConfig fields from the arguments, checked before anything is compiled."""
    from flexc.runtime.simulator.hardware import resolve_gpu
    from flexc.runtime.simulator.run import SIM_POLICIES
    from flexc.runtime.simulator.workload import (LENGTH_PRESETS, REASONING, LogNormal, TraceLengths,
                                                  finetune_sequences, read_trace)
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    bad = [p for p in policies if p not in SIM_POLICIES]
    if bad or not policies:
        raise ValueError(f"unknown policy {bad[0] if bad else '(none)'!r}; allowed: {', '.join(SIM_POLICIES)}")
    if any(r <= 0 for r in args.rates):
        raise ValueError(f"--rates must be positive requests/s, got {','.join(f'{r:g}' for r in args.rates)}")
    if args.latency_profile is None:
        resolve_gpu(args.gpu, args.gpu_file)
    if not 1 <= args.finetune_median <= args.seq_len:
        raise ValueError(f"--finetune-median must be between 1 and --seq-len ({args.seq_len}), "
                         f"got {args.finetune_median}")
    if not 0 <= args.min_finetune_share <= 1:
        raise ValueError(f"--min-finetune-share must be a fraction in [0, 1], got {args.min_finetune_share:g}")
    lengths = LENGTH_PRESETS[args.lengths]
    if lengths.max_total > args.seq_len:
        lengths = dataclasses.replace(lengths, max_total=args.seq_len)
    finetune = finetune_sequences(256, args.seed, LogNormal(args.finetune_median, REASONING.sigma),
                                  min_length=min(64, args.seq_len), max_length=args.seq_len)
    cfg: dict = {"rates": args.rates, "policies": policies, "duration": args.duration, "arrivals": args.arrivals,
                 "cv": args.cv, "ttft_slo": args.ttft_slo, "token_budget": args.token_budget,
                 "grad_accum": args.grad_accum, "min_finetune_share": args.min_finetune_share, "seed": args.seed,
                 "lengths": lengths, "finetune": finetune}
    if args.trace is not None:
        rows = tuple(read_trace(args.trace))
        cfg.update(trace=rows, lengths=TraceLengths(rows, max_total=args.seq_len))
    elif args.arrivals == "trace":
        raise ValueError("--arrivals trace needs --trace FILE")
    return cfg


def main(args: argparse.Namespace) -> int:
    from flexc.progress import Progress
    from flexc.runtime.simulator.report import format_table, plot_results, write_json
    if args.png is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.png))):
        raise ValueError(f"cannot write {args.png}: its directory does not exist")
    cfg = _config(args)
    bar = Progress()
    print(f"flexc simulate: compiling {args.model} (tp={args.tp}) ...", flush=True)

    def progress(policy: str, rate: float, now: float) -> None:
        bar.update(f"[{policy} at {rate:g} req/s] simulated {min(now, args.duration):.0f}/{args.duration:.0f} s",
                   time.perf_counter())

    report = simulate(args.model, gpu=args.gpu, tp=args.tp, gpu_file=args.gpu_file, tpot_slo=args.tpot_slo,
                      seq_len=args.seq_len,
                      latency_profile=args.latency_profile, kv_tokens=args.kv_tokens, progress=progress, **cfg)
    bar.close()
    slo = report.config["tpot_slo"]
    title = (f"{args.model} tp={args.tp} on {report.gpu} ({report.cost}), {args.arrivals} arrivals, "
             f"SLO: TPOT < {1000 * slo:.0f} ms and queueing+TTFT < {args.ttft_slo:g} s; "
             f"KV cache {report.instance['kv_tokens']:,} tokens")
    print(format_table(report.results, title))
    payload = report.to_dict()
    payload["command"] = "flexc simulate " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "flexc simulate"
    payload["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    write_json(args.json_out, payload)
    written = [args.json_out]
    if args.png:
        plot_results([(f"{args.model} (tp={args.tp}, {report.gpu})", report.results)], args.png)
        written.append(args.png)
    print(f"wrote {', '.join(written)} ({report.seconds:.0f} s)")
    return 0
