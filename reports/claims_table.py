"""The claims table of the report: one row per claim and pair of arms with its verdict, the branch of the rule
that decided it, and under the table the rules themselves, printed exactly as applied (reports/stats.py,
reports/speed.py, reports/fairness.py), with a link to docs/verdicts.md."""

from __future__ import annotations

import math
import os
from pathlib import Path

from harness.mdformat import md_table

NOT_MEASURED = "not measured"


VERDICTS_DOC = "docs/verdicts.md"


def _docs_link(out_dir: Path | None) -> str:
    """A link to docs/verdicts.md relative to the report when the report is written inside the repository, else
    the repository path."""
    doc = Path(__file__).resolve().parent.parent / VERDICTS_DOC
    if out_dir is not None and doc.is_file():
        try:
            rel = Path(os.path.relpath(doc, Path(out_dir).resolve()))
            if not rel.as_posix().startswith("../" * 6):
                return f"[How verdicts are decided]({rel.as_posix()})"
        except ValueError:  # another drive (Windows)
            pass
    return f"How verdicts are decided: `{VERDICTS_DOC}` in the kimi-bench repository"


def _p_cell(r) -> str:
    """'diff p → Holm p; eq p → Holm p' for rows in the Holm family; the raw p of an exploratory row."""
    if getattr(r, "exploratory", False):
        return f"{r.p:.3g} (exploratory, not in the Holm family)" if math.isfinite(r.p) else "n/a"
    parts = []
    if math.isfinite(r.p):
        parts.append(f"diff {r.p:.3g} → {r.p_adj:.3g}")
    p_eq = getattr(r, "p_eq", math.nan)
    if math.isfinite(p_eq):
        parts.append(f"eq {p_eq:.3g} → {r.p_eq_adj:.3g}")
    return "; ".join(parts) or "n/a"


def claims_section(rows, folded: dict[str, str], match, family_size: int = 0, out_dir: Path | None = None) -> str:
    from reports.fairness import RULE
    from reports.speed import SPEED_RULE, noisy_threshold
    from reports.stats import EXACT_RULE, VERDICT_RULE

    table = []
    # what was measured first (a scaling matrix without a Muon-vs-AdamW pair has a dozen "not measured" rows)
    for r in sorted(rows, key=lambda r: r.verdict == NOT_MEASURED):
        text = r.claim.text + (f" [{r.label}]" if r.label else "")
        verdict = f"**{r.verdict}**" if r.verdict not in (NOT_MEASURED,) else r.verdict
        why = getattr(r, "why", "") or ("the speed rule below" if r.claim.kind == "speed" and r.a else "n/a")
        table.append([text, r.claim.paper, r.a_text, r.b_text, r.diff_text, _p_cell(r), r.tuning, verdict, why])
    header = [
        "claim",
        "paper (Kimi vs GPT)",
        "A measured",
        "B measured",
        "A vs B",
        "p → Holm p",
        "tuning",
        "verdict",
        "why (the rule's branch)",
    ]
    notes = [
        _docs_link(out_dir) + ": the rules below, their margins and thresholds and the reasons for their defaults.",
        "A = Kimi (kimi+muon, else kimi+muonclip) and B = GPT (gpt+adamw) for the paper's table pair; optimizer "
        "claims compare optimizers within each variant. The paper's perplexities were measured with GPT-2 BPE "
        "tokens on other data: compare bits per byte between tokenizers, never perplexities.",
        VERDICT_RULE + f" Holm family of this table: {family_size} p-value(s) (a difference and an equivalence "
        "test per tested row; exploratory rows are not in it).",
        "Compute to target: the tokens, FLOPs and seconds each arm needs to reach the target val loss (the LAST "
        "crossing: the curve stays at or below it from there; interpolated between evals); one claim per pair, "
        "tested on its named axis, the other axes beside it. A seed whose curve ends above the target is "
        "censored: it enters at the compute it had (a lower bound) and cannot count in its own arm's favour. "
        "Tested only with a target set before the runs ([verdicts] target_loss) on a WSD schedule, reading the "
        "stable-phase evals; otherwise exploratory. A/B < 1 means A needs less; geometric mean over seeds.",
        EXACT_RULE + ("" if match else " (no [match] section is recorded on these runs)"),
        RULE,
        SPEED_RULE.format(noisy=noisy_threshold()) if any(r.claim.kind == "speed" for r in rows) else "",
    ]
    if folded:
        notes.insert(
            0,
            "Identical arms folded: "
            + "; ".join(
                f"`{a}` equals `{b}` at every eval of every seed both ran (QK-Clip never fired), so its rows are "
                f"`{b}`'s"
                for a, b in sorted(folded.items())
            )
            + ".",
        )
    return md_table(header, table) + "\n\n" + "\n\n".join(n for n in notes if n)
