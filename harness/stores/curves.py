"""A trial's learning curves as one small artifact, so a report reads a few hundred points per run in one download
instead of asking MLflow for every logged step.

The trainer keeps (step, value) for each key in CURVE_KEYS; at the end of a trial it logs `curves.json` (name:
schema.ARTIFACT_CURVES) and tags the run `kb.curves`. Step-dense keys are thinned to about CURVE_POINTS points,
evenly over the logged steps, with the first, the last and every eval step kept exactly; eval keys (val/*) keep
every point. The metric history in MLflow stays complete: the artifact is a view of it, not a replacement, and a
run without the tag (killed, or logged by an older version) is read from the history instead (reports.collect).

Why: on an `mlflow server`, MLflow's downsampled history endpoint still reads and sorts every logged row of each
run and key; at 128 runs x 20,000 steps that alone took ~166 s of a report (reports/bench_report.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from harness import schema

CURVE_POINTS = 400  # about this many points per run for a step-dense key (first and last kept)
CURVE_KEYS = (schema.TRAIN_LOSS, schema.GRAD_NORM, schema.TRAIN_TOKENS, schema.TRAIN_ELAPSED, schema.VAL_LOSS)
FORMAT = 1


def is_eval_key(key: str) -> bool:
    """Keys logged at evals only: few enough to keep every point."""
    return key.startswith("val/")


def thin(points: list[tuple], n: int = CURVE_POINTS, keep_steps: Iterable[int] = ()) -> list[tuple]:
    """About `n` of `points` ((step, value, ...) tuples), sorted by step: every stride-th from the first, the last,
    and those at `keep_steps` (the eval steps, so that keys read at an eval line up)."""
    points = sorted(points)
    if len(points) <= n:
        return points
    stride = math.ceil(len(points) / max(n - 1, 1))
    keep = set(keep_steps)
    last = len(points) - 1
    return [p for i, p in enumerate(points) if i % stride == 0 or i == last or p[0] in keep]


def curves_payload(history: dict[str, list[tuple[int, float]]], n: int = CURVE_POINTS) -> dict:
    """The JSON document of `curves.json`: {"format", "points", "keys": {key: {"step": [...], "value": [...]}}}."""
    eval_steps = {s for key, pts in history.items() if is_eval_key(key) for s, _ in pts}
    keys = {}
    for key, pts in sorted(history.items()):
        kept = sorted(pts) if is_eval_key(key) else thin(pts, n, eval_steps)
        keys[key] = {"step": [int(s) for s, _ in kept], "value": [float(v) for _, v in kept]}
    return {"format": FORMAT, "points": n, "keys": keys}


def write_curves(path: Path, history: dict[str, list[tuple[int, float]]], n: int = CURVE_POINTS) -> Path:
    path.write_text(json.dumps(curves_payload(history, n), separators=(",", ":")), encoding="utf-8")
    return path


def read_curves(path: Path) -> tuple[int, dict[str, list[tuple[int, float]]]]:
    """(points it was thinned to, key -> [(step, value), ...]) from a `curves.json`; ValueError on a format this
    version does not read."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: curves format {doc.get('format')!r}, expected {FORMAT}")
    return int(doc["points"]), {key: list(zip(k["step"], k["value"], strict=True)) for key, k in doc["keys"].items()}
