"""Adapter paths: only inside the directories the operator allowed, after following symlinks."""
import os

import pytest

from flexc.runtime.server.errors import APIError
from flexc.runtime.server.security import resolve_lora_path


def test_paths_inside_allowed_dirs_only(tmp_path):
    """A directory inside an allowed one resolves; '..', a symlink out of it, the allowed directory itself, or
    any path when nothing is allowed, is a 403."""
    allowed = tmp_path / "allowed"
    (allowed / "ok").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", allowed / "link")
    dirs = (os.path.realpath(allowed),)
    assert resolve_lora_path(str(allowed / "ok"), dirs) == os.path.realpath(allowed / "ok")
    for bad in (str(allowed / ".." / "secret"), str(allowed / "link"), str(allowed), "/etc"):
        with pytest.raises(APIError) as e:
            resolve_lora_path(bad, dirs)
        assert e.value.status == 403, bad
    with pytest.raises(APIError, match="disabled") as e:
        resolve_lora_path(str(allowed / "ok"), ())
    assert e.value.status == 403
