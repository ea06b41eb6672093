"""flexc compile: plan.json contents, summary, and one-line exit-2 errors for bad input."""
import json
import subprocess
import sys

import pytest

from flexc.cli import main
from tests.utils import write_config


def test_compile_writes_plan(tmp_path, capsys):
    """plan.json has the schema keys; a line per region tells the progress of the capture; the summary names
    regions, parameters and pass times."""
    cfg = write_config(tmp_path, "qwen2")
    out = tmp_path / "plan.json"
    assert main(["compile", cfg, "--lora-r", "8", "--lora-alpha", "16", "--lora-targets", "q_proj,down_proj",
                 "--seq-len", "32", "-o", str(out)]) == 0
    plan = json.loads(out.read_text())
    for key in ("schema_version", "model", "peft", "regions", "passes", "compile_seconds"):
        assert key in plan
    assert plan["peft"] == {"type": "LORA", "r": 8, "alpha": 16.0, "scaling": 2.0, "targets": ["q_proj", "down_proj"]}
    assert plan["model"]["architecture"] == "Qwen2ForCausalLM"
    # trainable = 3 layers x (q: 8*(64+64) + down: 8*(128+64))
    assert plan["model"]["trainable_parameters"] == 3 * (8 * 128 + 8 * 192)
    assert plan["layer_regions"] == ["layer.0"] * 3
    text = capsys.readouterr().out
    assert "regions" in text and "layer.0" in text and "trainable" in text
    progress = [line.split() for line in text.splitlines()[1:5]]
    assert [p[0] for p in progress] == ["embed", "layer.0", "head", "logits"]
    assert all(p[1] in ("captured", "loaded") and p[-1] == "s" for p in progress)


def _main(args) -> int:
    try:
        return main(args)
    except SystemExit as e:          # argparse's own errors
        return e.code


@pytest.mark.parametrize("args,needle", [
    (["compile", "llama-9b"], "unknown model 'llama-9b'"),
    (["compile", "{cfg_gpt2}"], "unsupported architecture GPT2LMHeadModel; supported: LlamaForCausalLM"),
    (["compile", "{cfg}", "--lora-targets", "q_proj,wq"], "LoRA target 'wq' matches no module; allowed: q_proj"),
    (["compile", "{cfg}", "--lora-r", "0"], "LoRA rank r must be a positive integer, got 0"),
    (["compile", "/nonexistent/dir/config.json"], "unknown model '/nonexistent/dir/config.json'"),
    (["compile", "{bad_json}"], "cannot read config"),
    (["compile", "{cfg}", "--dtype", "int8"], "invalid choice: 'int8'"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, needle):
    """Bad input exits with status 2 and a single line saying what was wrong and what is allowed."""
    cfg = write_config(tmp_path, "llama")
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    args = [a.format(cfg=cfg, cfg_gpt2=gpt2, bad_json=bad) for a in args]
    assert _main(args + ["-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert needle in lines[-1]
    assert "Traceback" not in err
    if "invalid choice" not in needle:
        assert len(lines) == 1, err
    assert not (tmp_path / "p.json").exists()


def test_bad_input_in_a_real_process(tmp_path):
    """The same, as a user sees it: the ``flexc`` process exits with status 2 and prints one line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "flexc.cli", "compile", "llama-9b", "-o", str(tmp_path / "p.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [
        "flexc compile: error: unknown model 'llama-9b': not a preset (smollm2-135m, llama-3.1-8b, qwen2.5-14b, "
        "qwen2.5-32b), a Hugging Face model directory or a config.json file"], r.stderr


def test_recompute_budget_flag(tmp_path, capsys):
    """--recompute-budget 35% reaches the prune pass: each region's installed plan is the fewest saved bytes whose
    recompute stays within 35% of its training FLOPs (the sweep in plan.json; on top of the LoRA branch recompute
    every point has), keeping less than the default 20%."""
    cfg = write_config(tmp_path, "llama")
    out = tmp_path / "plan.json"
    assert main(["compile", cfg, "--lora-r", "4", "--lora-targets", "down_proj", "--seq-len", "16",
                 "--recompute-budget", "35%", "-o", str(out)]) == 0
    plan = json.loads(out.read_text())
    prune = next(p["report"] for p in plan["passes"] if p["name"] == "prune")
    assert prune["recompute_budget"] == pytest.approx(0.35) and plan["options"]["recompute_budget"] == 0.35
    for name, plans in prune["regions"].items():
        chosen, sweep = plans["pruned_remat"], prune["sweeps"][name]
        train, forced = chosen["train_flops_at_seq_len"], sweep[-1]["recompute_flops"]
        within = [p for p in sweep if p["recompute_flops"] <= 0.35 * train + forced]
        assert chosen["saved_bytes_per_token"] * 16 == min(p["saved_bytes"] for p in within)
        default = [p for p in sweep if p["recompute_flops"] <= 0.2 * train + forced]
        assert chosen["saved_bytes_per_token"] * 16 <= min(p["saved_bytes"] for p in default)
    assert plan["memory"]["strategies"]["pruned_remat"]["recompute_fraction"] > 0.2


@pytest.mark.parametrize("args,needle", [
    (["--recompute-budget", "1.5"], "recompute_budget '1.5': expected a fraction of training FLOPs in [0, 1]"),
    (["--recompute-budget", "lots"], "recompute_budget 'lots'"),
    (["--activation-budget", "max", "--recompute-budget", "0.3"],
     "--recompute-budget applies to the default activation budget ('auto'), not --activation-budget max"),
])
def test_bad_recompute_budget_is_one_line(tmp_path, capsys, args, needle):
    """A recompute budget outside [0, 1], not a number, or given with a non-default activation budget ends with
    exit status 2 and one line, before anything is compiled."""
    assert main(["compile", write_config(tmp_path, "llama"), *args, "-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "p.json").exists()


@pytest.fixture
def no_model(monkeypatch):
    """Every way the commands build or load a model raises: a test using this proves its error came first."""
    import flexc.engine
    import flexc.main_job
    import flexc.models
    import flexc.runtime.server.app

    def boom(*a, **k):
        raise AssertionError("a model was built or resolved before the inputs were checked")
    for target, name in ((flexc.models, "resolve_model"), (flexc.main_job, "_build_engine"),
                         (flexc.engine.Engine, "from_pretrained"), (flexc.runtime.server.app, "serve")):
        monkeypatch.setattr(target, name, boom)


@pytest.mark.parametrize("args,needle", [
    (["run", "--data", "{tmp}/nope.jsonl"], "--data: no such file: {tmp}/nope.jsonl"),
    (["run", "--data", "{tmp}"], "--data: {tmp} is a directory, not a file"),
    (["run", "--data", "{empty}"], "--data: {empty} has no examples (the file is empty); expected one JSON object"),
    (["run", "--data", "{broken}"], "--data: {broken}:2: not valid JSON at character 9, '\"oops\"}}': Expecting ':' "
                                    "delimiter; expected one JSON object per line: {{\"messages\""),
    (["run", "--data", "{eval}"], "--data: {eval}:1: unknown example format with keys ['keyword', 'question']; "
                                  "expected {{\"messages\""),
    (["run", "--eval", "{tmp}/nope.jsonl"], "--eval: no such file: {tmp}/nope.jsonl"),
    (["run", "--eval", "{empty}"], "--eval: {empty} has no questions (the file is empty)"),
    (["run", "--eval", "{broken}"], "--eval: {broken}:1: expected {{\"question\": str, \"keyword\": str}}, got an "
                                    "object with keys ['text']"),
    (["run", "--out-dir", "{empty}"], "--out-dir: {empty} exists and is not a directory"),
    (["run", "--slo-target", "90"], "--slo-target must be a fraction in [0, 1], got 90.0"),
    (["inspect", "{tmp}/nope.json"], "plan: no such file: {tmp}/nope.json"),
    (["inspect", "{tmp}"], "plan: {tmp} is a directory, not a file"),
    (["serve", "--lora-modules", "math={tmp}/none"], "--lora-modules math={tmp}/none: not a directory"),
    (["serve", "--lora-modules", "math={tmp}"], "--lora-modules math={tmp}: not a PEFT adapter directory "
                                                "(no adapter_config.json)"),
    (["serve", "--data-dir", "{empty}"], "--data-dir: {empty} exists and is not a directory"),
    (["compile", "--pass", "nosuch_module:fn"], "--pass 'nosuch_module:fn': cannot import module 'nosuch_module'"),
])
def test_inputs_are_checked_before_any_model(tmp_path, capsys, no_model, args, needle):
    """A missing, empty or malformed input file (or directory) of run, inspect, serve and compile ends with exit
    status 2 and one line naming the option, the path (file:line for a bad line) and what was expected, before
    any model is resolved or built (the fixture makes that raise)."""
    paths = {"tmp": str(tmp_path), "empty": str(tmp_path / "empty.jsonl"), "broken": str(tmp_path / "broken.jsonl"),
             "eval": str(tmp_path / "eval.jsonl")}
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text" "oops"}\n')
    (tmp_path / "eval.jsonl").write_text('{"question": "q?", "keyword": "k"}\n')
    args = [a.format(**paths) for a in args]
    assert main([*args, *(["--data-dir", str(tmp_path / "d")] if args[0] == "serve" and "--data-dir" not in args
                          else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"flexc {args[0]}: error: " + needle.format(**paths)), err


def test_help_names_every_default():
    """Every option of every command whose default is a value (not off, none or empty) says it in its help."""
    import argparse

    from flexc.cli import _COMMANDS, _build_parser
    silent = []
    for command in _COMMANDS:
        parser = _build_parser([command])
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        for action in sub._actions:
            if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
                continue
            if "default" not in (action.help or ""):
                silent.append(f"{command} {action.option_strings[-1]} (default {action.default!r})")
    assert not silent, silent
