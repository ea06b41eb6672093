"""The ``flexc`` command line: ``flexc compile``, ``flexc inspect``, ``flexc run``, ``flexc serve``, ``flexc simulate``.

User mistakes (unknown model, bad option values, unreadable files) end with
exit status 2 and one line on stderr, no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

logger = logging.getLogger("flexc")

_COMMANDS = {
    # name: (module, help); each module has add_arguments(parser) and main(args) -> int; None: defined here
    "compile": (None, "capture a model with LoRA, run the passes, write plan.json"),
    "inspect": ("flexc.inspect", "show a plan.json: per-region tables, memory strategies, device memory"),
    "run": ("flexc.main_job", "co-serve inference and finetuning on the embedded model (the main job)"),
    "serve": ("flexc.serve", "OpenAI-compatible HTTP server: completions, chat, adapters, fine-tuning jobs"),
    "simulate": ("flexc.simulate", "simulate the real scheduler at paper scale on simulated GPUs"),
}


def _size(text: str) -> int:
    """'80GiB', '80GB', '512MiB' or a byte count -> bytes (argparse type)."""
    from flexc.ir.spec import parse_bytes
    try:
        return int(parse_bytes(text, "size"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from flexc.ir.spec import LORA_TARGETS
    from flexc.models import DEFAULT_MODEL, PRESETS
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"preset ({', '.join(PRESETS)}), HF model directory, config.json, or {DEFAULT_MODEL} (default)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default 16)")
    p.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                   help="comma-separated projections to adapt (default: all seven)")
    p.add_argument("--no-lora", action="store_true", help="compile the base model only (inference)")
    p.add_argument("--seq-len", type=int, default=2048,
                   help="finetuning sequence length the plan is made for (default 2048)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="base weight dtype (default bf16 for presets, fp32 for models with weights)")
    p.add_argument("--activation-budget", default=None,
                   help="bytes per token (e.g. 64KiB), 'max', 'min' or 'auto' the prune pass may keep for the "
                        "backward (default auto: the fewest bytes within --recompute-budget)")
    p.add_argument("--recompute-budget", default=None, metavar="FRACTION",
                   help="default activation budget only: keep the fewest bytes whose recompute stays within this "
                        "fraction of each region's training FLOPs (0-1 or e.g. 30%%; default 0.2)")
    p.add_argument("--device-memory", type=_size, default=None,
                   help="device memory for the plan, e.g. 80GiB (default: none; the plan then gives no KV-cache size)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--tp-plan", default=None,
                   help="JSON base TP plan {module pattern: colwise|rowwise|replicate} (default: the config's, "
                        "else Megatron's)")
    p.add_argument("--pass", dest="passes", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="run a user pass after the built-ins (repeatable; also a registered name or entry point)")
    p.add_argument("-o", "--output", default="plan.json", help="where to write plan.json (default ./plan.json)")
    p.add_argument("--no-cache", action="store_true",
                   help="capture afresh: neither load regions from the capture cache nor keep them there")


def _summary(cm) -> str:
    g = cm.graph
    m = g.model
    lines = [f"model      {cm.source.name} ({m['architecture']}, {m['num_layers']} layers, hidden {m['hidden_size']}, "
             f"{cm.dtype})",
             f"parameters {m['parameters']:,} total, {m['trainable_parameters']:,} trainable"
             + (f" (LoRA r={g.lora['r']} alpha={g.lora['alpha']} on {','.join(g.lora['targets'])})" if g.lora else "")]
    templates = g.layer_templates()
    lines.append("regions")
    for name, r in g.regions.items():
        fw = len(r.fw.graph.nodes)
        bw = len(r.bw.graph.nodes) if r.bw is not None else 0
        extra = f"  runs layers {_ranges(templates[name])}" if name in templates else ""
        lines.append(f"  {name:<10} fw {fw:5d} nodes  bw {bw:5d} nodes{extra}")
    if cm.passes:
        lines.append("passes")
        for rec in cm.passes:
            lines.append(f"  {rec.name:<22} {rec.seconds:7.3f} s")
        for rec in cm.passes:   # a pass report may add its own section (parallelize: the tp plan)
            lines.extend(getattr(rec.report, "summary_lines", lambda: [])())
    loaded = sum(1 for r in g.regions.values() if "load" in r.captured.seconds)
    lines.append(f"compiled in {cm.compile_seconds:.2f} s"
                 + (f" ({loaded} of {len(g.regions)} regions loaded from the capture cache)" if loaded else ""))
    return "\n".join(lines)


def _ranges(ids: Sequence[int]) -> str:
    if len(ids) > 1 and list(ids) == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def main_compile(args: argparse.Namespace) -> int:
    import flexc
    from flexc.ir.spec import LoraSpec
    lora = None if args.no_lora else LoraSpec(r=args.lora_r, alpha=args.lora_alpha,
                                              targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    options = {"tp": args.tp}
    if args.tp_plan is not None:
        options["tp_plan"] = args.tp_plan
    if args.activation_budget is not None:
        options["activation_budget"] = args.activation_budget
    if args.recompute_budget is not None:
        from flexc.passes.prune import parse_recompute_budget
        if args.activation_budget not in (None, "auto"):
            raise ValueError(f"--recompute-budget applies to the default activation budget ('auto'), not "
                             f"--activation-budget {args.activation_budget}")
        options["recompute_budget"] = parse_recompute_budget(args.recompute_budget)
    if args.device_memory is not None:
        options["device_memory"] = args.device_memory
    if os.getcwd() not in sys.path:       # NOTE: --pass module:function resolves from here, as ``python -m`` does
        sys.path.insert(0, os.getcwd())
    from flexc.passes.manager import resolve_pass
    for spec in args.passes:              # NOTE: before the capture, which takes seconds to minutes
        try:
            resolve_pass(spec)
        except ValueError as e:
            msg = str(e)                  # "pass 'x:f': cannot import ..." -> "--pass 'x:f': cannot import ..."
            raise ValueError(f"--{msg}" if msg.startswith("pass ") else f"--pass {spec!r}: {msg}") from None
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ValueError(f"cannot write {args.output}: directory {out_dir} does not exist")
    from flexc.models import resolve_model
    source = resolve_model(args.model)    # NOTE: a bad model name fails here, before the progress line
    print(f"flexc compile: {source.name}: regions, then passes ...", flush=True)
    cm = flexc.compile(source, lora=lora, dtype=args.dtype, seq_len=args.seq_len, passes=args.passes,
                       cache=not args.no_cache, progress=lambda line: print(f"  {line}", flush=True), **options)
    cm.save_plan(args.output)
    print(_summary(cm))
    print(f"wrote {args.output}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("flexc")
    except PackageNotFoundError:        # run from a source tree that was not installed
        import flexc
        return flexc.__version__


def _build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser; only the command named in ``argv`` gets its options (and its module imported): importing all
    five pulls in torch, transformers and the server's libraries, seconds before anything runs."""
    parser = argparse.ArgumentParser(prog="flexc", description="co-serve LLM inference and LoRA finetuning")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of every phase")
    parser.add_argument("--version", action="version", version=f"flexc {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if a in _COMMANDS), None)
    for name, (mod_name, help_text) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name != chosen:
            continue
        if mod_name is None:
            add_arguments(sp)
            sp.set_defaults(func=main_compile)
            continue
        mod = importlib.import_module(mod_name)
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.main)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``flexc`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"flexc {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        # NOTE: a file error no check caught first: say what and which path, not "[Errno 2]"
        what = f"{e.strerror}: {e.filename}" if e.filename else str(e)
        print(f"flexc {args.command}: error: {what}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flexc {args.command}: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


if __name__ == "__main__":
    sys.exit(main())
