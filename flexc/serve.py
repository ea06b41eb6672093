"""``flexc serve``: an OpenAI-compatible HTTP server that co-serves inference and runs fine-tuning jobs.

    flexc serve                                   # the embedded SmolLM2-135M on http://127.0.0.1:8000
    flexc serve path/to/hf_model --port 9000 --api-key "$KEY" --data-dir /var/lib/flexc \\
        --max-lora-rank 16 --lora-modules math=/adapters/math --allowed-lora-dir /adapters

This module is the front door: it turns flags into :class:`ServerSettings` and a
function that builds the engine (compile + load weights with
``Engine.from_pretrained``; at ``--tp N`` a tensor-parallel group through
``run_tp``); ``flexc.runtime.server.app.serve`` builds it in the engine's own
thread and serves until SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from flexc.runtime.engine import Engine

_KEY_ENV = "FLEXC_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from flexc.ir.spec import LORA_TARGETS
    from flexc.models import DEFAULT_MODEL
    from flexc.runtime.policies import POLICIES
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"HF model directory, config.json, or {DEFAULT_MODEL} (default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (or set {_KEY_ENV})")
    p.add_argument("--served-model-name", default=None,
                   help="the id clients send as 'model' for the base model (default: the model's name)")
    p.add_argument("--data-dir", default="flexc-data", help="uploaded files, jobs, checkpoints (default ./flexc-data)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (ranks on this machine; default 1)")
    p.add_argument("--tpot-slo-ms", type=float, default=200.0, help="time-per-output-token target (default 200)")
    p.add_argument("--ttft-slo-ms", type=float, default=5000.0, help="time-to-first-token target (default 5000)")
    p.add_argument("--policy", choices=POLICIES, default="coserve",
                   help="where finetuning tokens go (default coserve: beside inference, within the TPOT target)")
    p.add_argument("--max-lora-rank", type=int, default=16,
                   help="largest adapter rank served and trained (default 16; 0: no LoRA, no fine-tuning)")
    p.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                   help="projections adapters may adapt (default: all seven)")
    p.add_argument("--max-adapters", type=int, default=8, help="adapters resident at once (default 8)")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="PEFT adapter directories served from the start")
    p.add_argument("--allowed-lora-dir", action="append", default=[], metavar="DIR",
                   help="POST /v1/load_lora_adapter may read adapters under DIR (repeatable; default: none)")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV-cache size in tokens (default 16384)")
    p.add_argument("--token-budget", type=int, default=512, help="tokens per iteration (default 512)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weight dtype (default fp32)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest JSON body (default 1 MiB)")
    p.add_argument("--max-upload-bytes", type=int, default=64 << 20, help="largest file upload (default 64 MiB)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: context - 1)")
    p.add_argument("--max-pending-requests", type=int, default=1024,
                   help="unfinished requests at once before 429 (default 1024)")
    p.add_argument("--finetune-lr", type=float, default=1e-4,
                   help="AdamW learning rate at learning_rate_multiplier 1 (default 1e-4)")
    p.add_argument("--checkpoint-every", type=int, default=10,
                   help="steps between a job's checkpoints, what a restart resumes from (default 10)")


def _served_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    name = os.path.basename(os.path.normpath(str(args.model)))
    return re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("-._") or "model"


def _lora_modules(items: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules {item!r}: expected NAME=PATH")
        out.append((name, os.path.abspath(path)))
    return tuple(out)


def _check_adapter_dirs(lora_modules: tuple[tuple[str, str], ...]) -> None:
    """Each ``--lora-modules`` directory holds a PEFT adapter's two files (their contents are read when the
    engine loads it); ValueError naming the option and the path. Names and directories are checked by
    :class:`ServerSettings`."""
    for name, path in lora_modules:
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            if not os.path.isfile(os.path.join(path, file)):
                raise ValueError(f"--lora-modules {name}={path}: not a PEFT adapter directory (no {file})")


def _check_data_dir(path: str) -> None:
    """Create ``--data-dir`` if needed; ValueError if it is a file or cannot be created or written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--data-dir: {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--data-dir: cannot create {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--data-dir: {path} is not writable")


def _launcher(args: argparse.Namespace) -> Callable[[Callable[["Engine"], None]], Any]:
    """``launch(drive)``: build the engine in the calling thread and run ``drive(engine)`` on it."""
    from flexc.engine import Engine
    from flexc.ir.spec import LoraSpec
    from flexc.runtime.tp_engine import run_tp
    if args.max_lora_rank < 0:
        raise ValueError(f"--max-lora-rank must be >= 0, got {args.max_lora_rank}")
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    r = args.max_lora_rank
    lora = LoraSpec(r=r, alpha=r, targets=targets) if r else None
    profile = os.path.join(args.data_dir, "latency.json" if args.tp == 1 else f"latency-tp{args.tp}.json")
    build = functools.partial(Engine.from_pretrained, args.model, lora=lora, max_adapters=args.max_adapters,
                              kv_cache_tokens=args.kv_cache_tokens, dtype=args.dtype, token_budget=args.token_budget,
                              policy=args.policy, tpot_slo=args.tpot_slo_ms / 1000, ttft_slo=args.ttft_slo_ms / 1000,
                              latency_profile=profile if lora is not None else None, device=args.device)
    if args.tp == 1:
        return lambda drive: drive(build())
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.tp)
    return lambda drive: run_tp(drive, build, args.tp, threads=threads)


def main(args: argparse.Namespace) -> int:
    from flexc.models import DEFAULT_MODEL, resolve_model
    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    for flag in ("tpot_slo_ms", "ttft_slo_ms"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    _check_data_dir(args.data_dir)        # NOTE: every input is checked before the engine is built
    if args.model != DEFAULT_MODEL:           # NOTE: reading the embedded GGUF's config takes seconds; it ships
        resolve_model(args.model)

    import torch

    from flexc.runtime.server.app import serve
    from flexc.runtime.server.settings import ServerSettings
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ServerSettings(
        model_name=_served_name(args), data_dir=args.data_dir, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get(_KEY_ENV) or None, lora_modules=_lora_modules(args.lora_modules),
        allowed_lora_dirs=tuple(args.allowed_lora_dir), max_body_bytes=args.max_body_bytes,
        max_upload_bytes=args.max_upload_bytes, max_prompt_tokens=args.max_prompt_tokens,
        max_pending_requests=args.max_pending_requests, finetune_lr=args.finetune_lr,
        finetune_checkpoint_every=args.checkpoint_every, tp=args.tp)
    _check_adapter_dirs(settings.lora_modules)
    launch = _launcher(args)
    print(f"flexc serve: building the engine for {args.model} ...", flush=True)
    url = f"http://{settings.host}:{settings.port}"
    serve(settings, launch, tpot_slo=args.tpot_slo_ms / 1000, ttft_slo=args.ttft_slo_ms / 1000,
          log_level="info" if args.verbose else "warning",
          on_ready=lambda: print(f"flexc serve: {settings.model_name} on {url}/v1 (data in {settings.data_dir})",
                                 flush=True))
    return 0


if __name__ == "__main__":
    from flexc.cli import main as cli_main
    sys.exit(cli_main(["serve", *sys.argv[1:]]))
