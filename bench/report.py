"""Writing a benchmark's results: ``bench/results/<stem>.json`` (every figure) and ``.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_report(stem: str, result: dict[str, Any], md: str) -> None:
    """Write ``result`` and its summary ``md`` under ``stem``, print the summary and the paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(md)
    print()
    print(md)
    print(f"wrote {RESULTS / stem}.json and {stem}.md")
