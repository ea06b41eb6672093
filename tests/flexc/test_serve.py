"""flexc serve: operator mistakes end with exit status 2 and one line, before anything is served."""
import pytest

from flexc.cli import main
from tests.utils import write_config


@pytest.mark.parametrize("args,needle", [
    (["--lora-modules", "nodir"], "--lora-modules 'nodir': expected NAME=PATH"),
    (["--lora-modules", "a=/nonexistent/adapter"], "--lora-modules a=/nonexistent/adapter: not a directory"),
    (["--lora-modules", "a b=/tmp"], "--lora-modules name 'a b' is not allowed"),
    (["--allowed-lora-dir", "/nonexistent/dir"], "--allowed-lora-dir /nonexistent/dir: not a directory"),
    (["--tp", "0"], "--tp must be >= 1, got 0"),
    (["--max-lora-rank", "-1"], "--max-lora-rank must be >= 0, got -1"),
    (["--served-model-name", "bad name!"], "served model name 'bad name!' is not allowed"),
    (["--max-body-bytes", "0"], "max_body_bytes must be a positive integer, got 0"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, args, needle):
    """Each bad flag is refused with exit status 2 and one line naming it (no traceback, no server)."""
    cfg = write_config(tmp_path, "llama")
    assert main(["serve", cfg, "--data-dir", str(tmp_path / "data"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flexc serve: error: ") and needle in err[0], err


def test_unknown_model_fails_the_build_with_one_line(tmp_path, capsys):
    """A model that cannot be resolved is refused with one line, exit status 2, before the server starts."""
    assert main(["serve", "llama-9b", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'llama-9b'" in err[0]
