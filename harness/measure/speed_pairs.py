"""Paired speed ratios between model shapes: which callables of two shapes are compared, the order they are timed
in within a round, and the ratio A/B per round summarised as a median with its 95% interval."""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness import schema
from harness.measure.bench.ratios import Pair, ratio_of
from harness.measure.bench.timing import RoundTimes


@dataclass(frozen=True)
class Compared:
    """A timed callable whose rate speed claims compare between shapes, and the metric it is logged as."""

    name: str  # its key in the timed callables
    shape: str
    kind: str  # "prefill", "decode_b{B}", "step": only callables of one kind are compared
    metric: str
    work: float  # tokens one call processes


def compared_callables(p) -> list[Compared]:
    """The callables of one prepared shape (a speed_runs._Prepared) that pairs compare, with the work per call."""
    key = p.group.key
    out = [Compared(f"{key}/prefill", key, "prefill", schema.SPEED_PREFILL, p.shape.prompt_len)]
    out += [
        Compared(f"{key}/decode_b{b}", key, f"decode_b{b}", schema.speed_decode(b), b * p.shape.new_tokens)
        for b in p.batch_sizes
    ]
    out += [
        Compared(f"{key}/{o}/step", key, "step", schema.speed_opt(o, "train_tokens_per_s"), p.tokens)
        for o in p.group.optims
    ]
    return out


def ratio_pairs(compared: list[Compared]) -> list[tuple[Compared, Compared]]:
    """Every pair of callables of one kind from different shapes (a train step with any optimizer against any
    other shape's with any optimizer): every pair a speed claim can compare (reports/claims.py pairs arms of
    different variants), so the report finds its ratio whichever arms a matrix holds."""
    return [
        (a, b) for i, a in enumerate(compared) for b in compared[i + 1 :] if a.kind == b.kind and a.shape != b.shape
    ]


def timing_order(names: list[str], compared: list[Compared]) -> list[str]:
    """The compared callables first, grouped by kind so that the two sides of a pair are timed close together
    in a round (steps by optimizer, then shape); then the rest (fwd+bwd and optimizer parts)."""
    kinds = list(dict.fromkeys(c.kind for c in compared))
    shapes = list(dict.fromkeys(c.shape for c in compared))
    first = sorted(compared, key=lambda c: (kinds.index(c.kind), c.name.split("/", 1)[1], shapes.index(c.shape)))
    head = [c.name for c in first]
    return head + [n for n in names if n not in set(head)]


def ratio_metrics(pairs: list[tuple[Compared, Compared]], rounds: RoundTimes) -> dict[str, dict[str, float]]:
    """{shape: its ratio metrics}: A/B on A's run and B/A on B's run, each with _lo, _hi (when an interval
    exists) and _n."""
    out: dict[str, dict[str, float]] = {}
    for a, b in pairs:
        r = ratio_of(Pair(a.name, b.name, a.work, b.work), rounds.times)
        for this, other, ratio in ((a, b, r), (b, a, r.inverse() if r.n else r)):
            key = schema.speed_ratio(this.metric, other.shape, other.metric)
            m = out.setdefault(this.shape, {})
            m[key], m[schema.n_of(key)] = ratio.median, float(ratio.n)
            if math.isfinite(ratio.half_width):
                m[key + schema.LO_SUFFIX], m[key + schema.HI_SUFFIX] = ratio.low, ratio.high
    return out


def widest(pairs: list[tuple[Compared, Compared]], rounds: RoundTimes) -> float:
    """The largest half-width (ln) over the pairs; inf while one has no interval."""
    return max((ratio_of(Pair(a.name, b.name, a.work, b.work), rounds.times).half_width for a, b in pairs), default=0.0)
