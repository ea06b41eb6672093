"""plan.json is written whole or not at all."""
import json
import os

import pytest


def test_interrupted_save_leaves_the_old_plan(tiny_llama, tmp_path, monkeypatch):
    """A save that fails while building the plan (as a killed compile would) leaves the previous plan.json as it
    was and no temporary file; a save that completes writes the whole plan."""
    cm = tiny_llama.cm
    path = tmp_path / "plan.json"
    path.write_text('{"old": true}\n')

    def broken():
        raise KeyboardInterrupt
    monkeypatch.setattr(cm, "plan", broken)
    with pytest.raises(KeyboardInterrupt):
        cm.save_plan(str(path))
    assert json.loads(path.read_text()) == {"old": True} and os.listdir(tmp_path) == ["plan.json"]
    monkeypatch.undo()
    cm.save_plan(str(path))
    assert json.loads(path.read_text())["schema_version"] and os.listdir(tmp_path) == ["plan.json"]
