"""Run a measurement script in a fresh Python process against one source tree (``tree/src``), so
that old and new code can be timed side by side; the script prints its result as JSON on its
last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_in_tree(tree, code: str, args) -> dict:
    """``python -c code json(args)`` with ``PYTHONPATH=tree/src``; its last line, parsed."""
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve() / "src"))
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])
