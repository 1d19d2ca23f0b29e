"""The one TOML writer of the tests and the benchmark (no dependencies: bench/ imports it too).

Only what vsup's configs use: booleans, numbers, strings, lists and inline tables of those.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """`sections` as TOML tables (a dotted name such as "models.b" is a sub-table)."""
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path
