"""The speed targets (reports/benchmarks/README.md says what each means) and their verdicts over a run's rows.

A target missed by more than MISS_MARGIN carries the top-kernels table of the row that decided it, where the
section profiled one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

TARGET_DECODE_BATCH = 32
MISS_MARGIN = 0.20  # "missed by more than 20%": below 0.8x a floor, above 1.2x a ceiling


@dataclasses.dataclass(frozen=True)
class Target:
    key: str
    text: str
    op: str  # ">=" or "<="
    threshold: float
    fmt: str = "{:.1%}"
    profiled: bool = True  # False: a count (bytes), which no kernel profile explains

    def met(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def missed_by_more_than(self, value: float, margin: float = MISS_MARGIN) -> bool:
        if self.op == ">=":
            return value < self.threshold * (1 - margin)
        return value > self.threshold * (1 + margin)


TARGETS = (
    Target("mfu_gpt2", "dense GPT-2 124M (gpt @ gpt2-124m) train-step MFU, AdamW, best compile mode", ">=", 0.45),
    Target("mfu_kimi", "kimi @ paper train-step MFU, active FLOPs, AdamW, best compile mode", ">=", 0.30),
    Target(
        "moe_vs_dense",
        "MoE layer fwd+bwd (best sparse dispatch) / dense SwiGLU of equal active params",
        "<=",
        1.5,
        "{:.2f}x",
    ),
    Target("muon_share", "Muon optimizer step / train step (fastest fwd+bwd of the variant)", "<=", 0.05),
    Target(
        "mla_decode",
        f"MLA decode tokens/s / MHA decode tokens/s (gpt-mla vs gpt) at batch {TARGET_DECODE_BATCH}",
        ">=",
        1.0,
        "{:.2f}x",
    ),
    Target("mla_kv", "MLA KV bytes/token / MHA KV bytes/token (gpt-mla vs gpt)", "<=", 0.25, "{:.3f}", profiled=False),
)
BY_KEY = {t.key: t for t in TARGETS}


def ok_rows(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def verdict(key: str, scope: str, value: float | None, note: str = "", source: dict | None = None) -> dict[str, Any]:
    t = BY_KEY[key]
    met = None if value is None else t.met(value)
    missed_far = value is not None and t.missed_by_more_than(value) and t.profiled
    out = {
        "key": key,
        "target": t.text,
        "scope": scope,
        "measured": value,
        "measured_text": "not measured" if value is None else t.fmt.format(value),
        "threshold_text": f"{t.op} {t.fmt.format(t.threshold)}",
        "met": met,
        "note": note,
        "missed_by_over_margin": missed_far,
    }
    if missed_far and source is not None and source.get("top_kernels"):
        out["top_kernels"] = source["top_kernels"]
        out["profiled"] = describe_row(source)
    return out


def describe_row(r: dict) -> str:
    """One line naming the row a profile came from."""
    parts = [r.get("variant") or r.get("layer", ""), f"@ {r['preset']}"]
    if "optimizer" in r:
        parts.append(r["optimizer"])
    if "compile" in r:
        parts.append("compiled" if r["compile"] else "eager")
    if "batch" in r and "compile" not in r:
        parts.append(f"batch {r['batch']}")
    return " ".join(p for p in parts if p)


def _mfu_verdicts(train: list[dict]) -> list[dict]:
    out = []
    for key, preset, variant in (("mfu_gpt2", "gpt2-124m", "gpt"), ("mfu_kimi", "paper", "kimi")):
        rows = [
            r
            for r in train
            if (r["preset"], r["variant"], r["optimizer"]) == (preset, variant, "adamw") and r.get("mfu") is not None
        ]
        best = max(rows, key=lambda r: r["mfu"], default=None)
        if best is None:
            out.append(
                verdict(key, f"{variant} @ {preset}", None, "needs a CUDA run with a known peak (or --peak-tflops)")
            )
            continue
        note = f"{'compiled' if best['compile'] else 'eager'}; fwd+bwd alone {best['mfu_fwd_bwd']:.1%}"
        out.append(verdict(key, f"{variant} @ {preset}", best["mfu"], note, best))
    return out


def _moe_verdicts(moe: list[dict]) -> list[dict]:
    out = []
    for preset in dict.fromkeys(r["preset"] for r in moe):
        rows = [r for r in moe if r["preset"] == preset]
        sparse = [r for r in rows if r["layer"].startswith("moe/")]
        if not sparse:
            continue
        best = min(sparse, key=lambda r: r["fwd_bwd_ms"])
        note = best["layer"]
        for alle in (r for r in rows if r["layer"].startswith("all-experts")):
            note += f"; sparse is {alle['fwd_bwd_ms'] / best['fwd_bwd_ms']:.2f}x faster than all-experts"
        out.append(verdict("moe_vs_dense", f"MoE layer @ {preset}", best["vs_dense"], note, best))
    return out or [verdict("moe_vs_dense", "MoE layer", None)]


def _muon_share(r: dict, fastest_fwd_bwd: float) -> float:
    return r["opt_ms"] / (fastest_fwd_bwd + r["clip_ms"] + r["opt_ms"] + r["rest_ms"])


def _muon_verdicts(train: list[dict], optim: list[dict]) -> list[dict]:
    out = []
    for r in (r for r in train if r["optimizer"] == "muon"):
        scope = (r["preset"], r["variant"])
        fastest = min(x["fwd_bwd_ms"] for x in train if (x["preset"], x["variant"]) == scope)
        note = f"eager Muon row: {r['opt_ms'] / r['step_ms']:.1%} of its own step"
        o = next(
            (o for o in optim if o.get("muon_groups_ms") is not None and (o["preset"], o["variant"]) == scope), None
        )
        if o is not None:
            note += (
                f"; optimizer.step() alone: Muon groups {o['muon_groups_ms']:.2f} ms, AdamW groups "
                f"{o['adamw_groups_ms']:.2f} ms"
            )
        out.append(verdict("muon_share", f"{r['variant']} @ {r['preset']}", _muon_share(r, fastest), note, r))
    return out or [verdict("muon_share", "Muon", None)]


def _decode_verdicts(decode: list[dict]) -> list[dict]:
    out = []
    for preset in dict.fromkeys(r["preset"] for r in decode):

        def pick(variant, preset=preset):
            return {r["batch"]: r for r in decode if (r["preset"], r["variant"]) == (preset, variant)}

        mha, mla = pick("gpt"), pick("gpt-mla")
        common = sorted(set(mha) & set(mla))
        if not common:
            continue
        b = TARGET_DECODE_BATCH if TARGET_DECODE_BATCH in common else common[-1]
        note = "" if b == TARGET_DECODE_BATCH else f"at batch {b}: batch {TARGET_DECODE_BATCH} not measured"
        out.append(
            verdict(
                "mla_decode",
                f"gpt-mla vs gpt @ {preset}, batch {b}",
                mla[b]["tokens_per_s"] / mha[b]["tokens_per_s"],
                note,
                mla[b],
            )
        )
        out.append(
            verdict(
                "mla_kv",
                f"gpt-mla vs gpt @ {preset}",
                mla[b]["kv_bytes_per_token"] / mha[b]["kv_bytes_per_token"],
                f"{mla[b]['kv_bytes_per_token']:,.0f} vs {mha[b]['kv_bytes_per_token']:,.0f} B/token",
            )
        )
    return out or [verdict("mla_decode", "gpt-mla vs gpt", None), verdict("mla_kv", "gpt-mla vs gpt", None)]


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per target and scope; a target whose rows were not measured reads "not measured"."""
    train = ok_rows(results.get("train", []))
    return (
        _mfu_verdicts(train)
        + _moe_verdicts(ok_rows(results.get("moe", [])))
        + _muon_verdicts(train, ok_rows(results.get("optim", [])))
        + _decode_verdicts(ok_rows(results.get("decode", [])))
    )
