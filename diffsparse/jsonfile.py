"""JSON files the tools write and read back (schedules, latency tables): written atomically, and
read with errors that say what is wrong with the file rather than a bare decoder traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_json(path: str | Path, data: Any) -> Path:
    """Write `data` as JSON atomically (temporary file, then rename): a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path


def load_json(path: str | Path, error: type[Exception], what: str, missing_hint: str = "") -> Any:
    """The JSON content of `path`, or `error` naming the file as `what` when it is missing
    (with `missing_hint`) or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist{missing_hint}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {path} is not valid JSON ({e}); is it truncated or corrupted?") from None
