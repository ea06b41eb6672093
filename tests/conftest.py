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
