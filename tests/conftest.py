"""Test-wide settings: quiet library warnings, make `tests.utils` importable, without a GPU run Triton kernels
in its CPU interpreter (set before anything imports triton: triton reads it when it builds its own helpers);
the shared tiny compiled Llama."""
import os
import sys
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """tests.utils.TinyLlama, compiled once per session (read-only for the tests that use it)."""
    from tests.utils import build_tiny_llama
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_lora():
    """The embedded SmolLM2-135M compiled once per session with LoRA r=16 alpha 32 on all seven projections (the
    spec of the README and the main job), its fp32 weights with PEFT's adapter, and its tokenizer. Tests that
    change weights take ``copy.deepcopy(smollm2_lora.model)``; the xdist group keeps them on one worker."""
    import types

    import flexc
    from flexc.models import load_model, load_tokenizer
    compiled = flexc.compile("smollm2-135m", lora=flexc.LoraSpec(r=16, alpha=32), seq_len=64)
    return types.SimpleNamespace(compiled=compiled, model=load_model(compiled.source, compiled.lora, "fp32"),
                                 tokenizer=load_tokenizer(compiled.source))


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs two workers on two cores) each worker keeps to one torch thread and
    one Inductor compile thread, and so do the processes tests start: two workers with two OpenMP threads each
    would spin against each other."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        # Inductor compiles a worker's kernels one after another, in the worker (its default is a pool of a
        # compiler per core for each process: two workers and the ranks they start oversubscribed both cores)
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
        torch.set_num_threads(1)


_FIRST = ("tests/runtime/test_tp_engine.py", "tests/runtime/test_distributed.py", "tests/test_readme.py",
          "tests/runtime/server/test_app.py")
"""Files whose tests take the longest: started first, in this order, so the two workers end together. The two
on tiny models come first: meanwhile the other worker converts the embedded model (40 s), which the README's
blocks and the server wait for."""


@pytest.hookimpl(tryfirst=True)       # NOTE: before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Tests on the shared embedded model run on one xdist worker, so it is loaded and compiled once; they and the
    longest files go first (a stable sort: the order within each part is kept)."""
    def rank(item) -> tuple[int, int]:
        if "smollm2_lora" in getattr(item, "fixturenames", ()):
            return 0, 0
        first = [i for i, f in enumerate(_FIRST) if item.nodeid.startswith(f)]
        return (1, first[0]) if first else (2, 0)
    for item in items:
        if rank(item)[0] == 0:
            item.add_marker(pytest.mark.xdist_group("smollm2"))
            item.add_marker(pytest.mark.slow_model)
    items.sort(key=rank)


def pytest_collection_finish(session):
    """Under ``--dist loadgroup`` every grouped test must carry its group in its node id (how pytest-xdist routes it
    to one worker); a pytest/xdist pair that drops it would build the shared model once per worker, silently."""
    if not session.config.getoption("loadgroup", default=False):
        return
    lost = [i.nodeid for i in session.items if any(True for _ in i.iter_markers("xdist_group")) and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(f"pytest-xdist did not apply the xdist_group marks (e.g. {lost[0]}); "
                                "install the pytest version pyproject.toml pins")
