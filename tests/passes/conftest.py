"""Session fixtures of the prune and memory tests: tiny models are compiled once."""
import pytest

from tests.passes.utils import build_tiny


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """arch -> Tiny (fp32 llama and qwen2), built on first use."""
    cache = {}

    def get(arch: str, dtype: str = "fp32"):
        if (arch, dtype) not in cache:
            cache[arch, dtype] = build_tiny(tmp_path_factory.mktemp(f"{arch}-{dtype}"), arch, dtype)
        return cache[arch, dtype]
    return get
