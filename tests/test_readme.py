"""Every code block of the README runs as written (or in the reduced form the README states next to it).

A block is a fenced ``python`` or ``sh`` block. The line right above its fence may tag it with an HTML
comment the renderer hides::

    <!-- readme-test: skip (why) -->                   not run; the reason is required
    <!-- readme-test: slow -->                         run, marked slow_model (loads the embedded model)
    <!-- readme-test: with "A" -> "B" -->              run with text A replaced by B (the README says so)

``python`` blocks run in a fresh interpreter, ``sh`` blocks line by line through the shell (``#`` comments
allowed), both in a temporary directory that has the repository's ``examples/`` folder, with the venv's
``flexc`` on PATH. A block fails the test if it exits non-zero.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
_FENCE = re.compile(r"(?:<!--\s*readme-test:\s*(?P<tag>.*?)\s*-->[ \t]*\n)?^```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^```",
                    re.S | re.M)
_WITH = re.compile(r'with\s+"(?P<a>(?:[^"\\]|\\.)*)"\s*->\s*"(?P<b>(?:[^"\\]|\\.)*)"')


@dataclasses.dataclass
class Block:
    line: int
    lang: str
    body: str
    tag: str

    @property
    def id(self) -> str:
        return f"README.md:{self.line}:{self.lang}"


def readme_blocks(text: str) -> list[Block]:
    """The python and sh blocks of a README text, with their tags and line numbers."""
    out = []
    for m in _FENCE.finditer(text):
        lang = m.group("lang")
        if lang not in ("python", "sh"):
            continue
        out.append(Block(line=text.count("\n", 0, m.start("body")), lang=lang, body=m.group("body"),
                         tag=(m.group("tag") or "").strip()))
    return out


def prepared(block: Block) -> str:
    """The block's code with the tag's substitutions applied (each must match)."""
    code = block.body
    for m in _WITH.finditer(block.tag):
        a, b = m.group("a").replace('\\"', '"'), m.group("b").replace('\\"', '"')
        assert a in code, f"{block.id}: the tag replaces {a!r}, which the block does not contain"
        code = code.replace(a, b)
    return code


def _params() -> list:
    with open(README, encoding="utf-8") as f:
        blocks = readme_blocks(f.read())
    params = []
    for b in blocks:
        if b.tag.startswith("skip"):
            assert re.match(r"skip\s*\(.+\)", b.tag), f"{b.id}: a skipped block needs a reason: skip (why)"
            continue
        marks = [pytest.mark.slow_model] if re.search(r"\bslow\b", b.tag) else []
        params.append(pytest.param(b, id=b.id, marks=marks))
    return params


def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = ""          # NOTE: only the installed flexc, as a user has it
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


@pytest.mark.parametrize("block", _params())
def test_readme_block_runs(block: Block, tmp_path):
    """The block runs to the end (exit status 0) from a fresh directory that has the repository's examples/,
    and git ignores every file it writes there (run from a clone's root, it leaves ``git status`` clean)."""
    os.symlink(os.path.join(ROOT, "examples"), tmp_path / "examples")
    code = prepared(block)
    if block.lang == "python":
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"{block.id} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    else:
        for line in code.splitlines():
            cmd = line.split(" #")[0].strip()
            if not cmd or cmd.startswith("#"):
                continue
            done = subprocess.run(cmd, shell=True, cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, (f"{block.id}: {cmd!r} failed:\n{done.stdout[-3000:]}\n"
                                          f"{done.stderr[-5000:]}")
    # NOTE: run from a clone's root, the examples leave nothing for `git status` to show
    written = sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(tmp_path) if e.name != "examples")
    kept = [w for w in written if subprocess.run(["git", "-C", ROOT, "check-ignore", "-q", "--no-index", w]
                                                 ).returncode != 0]
    assert not kept, f"{block.id} writes {kept}, which .gitignore does not ignore"


def test_collector_reads_tags_and_substitutions():
    """The collector finds python and sh blocks with their tags, applies substitutions, and refuses one that
    does not match (a README edit cannot silently make a reduced test vacuous)."""
    text = ('intro\n<!-- readme-test: with "epochs=4" -> "epochs=1" -->\n```python\nrun(epochs=4)\n```\n'
            '```sh\nflexc --version\n```\n```text\nnot code\n```\n<!-- readme-test: skip (needs a GPU) -->\n'
            '```sh\nnvidia-smi\n```\n')
    blocks = readme_blocks(text)
    assert [(b.lang, b.tag) for b in blocks] == [("python", 'with "epochs=4" -> "epochs=1"'), ("sh", ""),
                                                 ("sh", "skip (needs a GPU)")]
    assert prepared(blocks[0]) == "run(epochs=1)\n" and blocks[0].line == 3
    with pytest.raises(AssertionError, match="does not contain"):
        prepared(Block(line=1, lang="python", body="x = 1\n", tag='with "y" -> "z"'))
