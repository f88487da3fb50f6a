"""Benchmarks: each prints its figures and saves them (JSON, and a plot where useful)."""

import json
from pathlib import Path


def earlier_results(path: Path) -> dict:
    """The results a benchmark saved at `path` before, which its new rows join; {} when there
    are none yet or the file is not a JSON object (it is then written afresh)."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}
