"""Docs that cannot lie: every repository file a doc cites exists.

The docs are README.md, docs/*.md and every folder's README.md. A citation is a relative markdown link, or a
backticked span that looks like a repository path: it starts with one of the repository's top-level names
(`harness/...`, `experiments/x.toml`), or it is a bare file name with a source extension (`gpt.py`), which
must name some tracked file. A `path::test_name` citation also needs the test. Generated outputs and files
outside the repository that docs name on purpose are in IGNORED, each with its reason.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# prefix (or exact name) -> why a doc may cite it though it is not in the repository
IGNORED: dict[str, str] = {
    "reports/out/": "written by `kimi-bench report`",
    "reports/benchmarks/<": "written by `kimi-bench bench` (placeholder date/device)",
    "reports/benchmarks/20": "a bench record the GPU run writes (dated)",
    "runs/": "trial folders written by `kimi-bench run`",
    "mlflow.db": "the sqlite store `kimi-bench run` creates",
    "./mlflow.db": "the sqlite store `kimi-bench run` creates",
    "optuna.db": "the Optuna store `kimi-bench tune` creates",
    "exported/": "written by `kimi-bench export`",
    ".whl/": "wheels carried to the GPU machine (ignored by git)",
    "train.py": "nanoGPT's training script, the reference the GPT arm follows",
    "matrix.toml": "the artifact of a matrix's parent run (the file as given)",
    "record.md": "the bench record the GPU run writes under $OUT",
    "2026-12-02-nvidia-h200.md": "the bench record's name on the GPU run's date",
}
BARE_EXTENSIONS = (".py", ".md", ".toml", ".sh")
SKIP_MARKS = ("<", "{", "*", "...", "$")  # placeholders and shell variables, not paths

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TICK = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"```.*?```", re.S)


def tracked() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()


def docs() -> list[Path]:
    files = tracked()
    return sorted(
        REPO / f for f in files if f == "README.md" or f.endswith("/README.md") or re.fullmatch(r"docs/[^/]+\.md", f)
    )


def is_ignored(cited: str) -> bool:
    return any(cited == k or (k.endswith(("/", "<", "20")) and cited.startswith(k)) for k in IGNORED)


def citations(text: str, top_level: set[str]) -> tuple[list[str], list[str]]:
    """(relative link targets, backticked repo-looking paths) of one markdown text; code blocks excluded from
    the backticked ones (commands there are tested by running them)."""
    links = [t.split("#")[0] for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    paths = []
    for span in TICK.findall(FENCE.sub("", text)):
        span = span.strip()
        if " " in span or any(m in span for m in SKIP_MARKS) or span.startswith("-"):
            continue
        head = span.split("/")[0]
        if ("/" in span and head in top_level) or (
            "/" not in span and span.endswith(BARE_EXTENSIONS) and not span.startswith(".")
        ):
            paths.append(span)
    return links, paths


def missing_citations(doc: Path, files: list[str]) -> list[str]:
    top_level = {f.split("/")[0] for f in files} | {"runs", "reports", "mlflow.db", "optuna.db", "exported"}
    names = {Path(f).name for f in files}
    links, paths = citations(doc.read_text(encoding="utf-8"), top_level)
    out = []
    for target in links:
        if target and not is_ignored(target) and not (doc.parent / target).exists():
            out.append(f"link {target}")
    for span in paths:
        if is_ignored(span):
            continue
        path, _, test = span.partition("::")
        if "/" not in path:
            if path not in names:
                out.append(f"`{span}` (no tracked file of that name)")
            continue
        where = REPO / path
        if not where.exists():
            out.append(f"`{span}`")
        elif test and not re.search(rf"^def {re.escape(test.split('[')[0])}\(", where.read_text(), re.M):
            out.append(f"`{span}` (no such test)")
    return out


@pytest.mark.parametrize("doc", docs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_cited_file_exists(doc):
    missing = missing_citations(doc, tracked())
    assert not missing, f"{doc.relative_to(REPO)} cites what the repository lacks: {missing}"


def test_the_check_catches_a_missing_file(tmp_path):
    """The rules find a dead link, a dead path, a bare name nobody has, and a renamed test; and let the rest be."""
    doc = tmp_path / "README.md"
    doc.write_text(
        "See [x](nowhere.md), `harness/nothing.py`, `KINDS.md`, `harness/trial/loop.py`, `gpt.py`,\n"
        "`tests/test_docs.py::test_gone`, `train/loss`, `reports/out/smoke/report.md`,\n"
        "[ray](https://docs.ray.io), `runs/<experiment>/`.\n"
        "```bash\nkimi-bench run --matrix experiments/missing.toml\n```\n"
    )
    assert missing_citations(doc, tracked()) == [
        "link nowhere.md",
        "`harness/nothing.py`",
        "`KINDS.md` (no tracked file of that name)",
        "`tests/test_docs.py::test_gone` (no such test)",
    ]


def test_ignored_entries_are_not_in_the_repository():
    """An ignore entry that names a tracked file hides nothing and should go."""
    files = tracked()
    for key in IGNORED:
        exact = key.rstrip("/")
        assert exact not in files and not any(f.startswith(exact + "/") for f in files if key.endswith("/")), key
