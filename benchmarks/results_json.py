"""Where every benchmark's result goes: one JSON file, indented, ending in a newline, its folder created."""
from __future__ import annotations

import json
import os


def write_result(path: str, result: dict) -> None:
    """Write ``result`` to ``path`` as indented JSON (the folder is created if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
