"""reports/benchmarks/gpu-run.sh rehearsed on CPU at the tiny preset, end to end, as the GPU run will go: the
wheel check, the CUDA tests (skipped here), every bench step appending to one record, the summary. And the
bench's imports: only what the GPU image has or the carried wheels bring (no MLflow, Optuna, Ray there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[4]
SCRIPT = REPO / "reports" / "benchmarks" / "gpu-run.sh"
STEPS = (
    "tests",
    "train-gpt2",
    "train-kimi",
    "moe",
    "decode",
    "muon-kimi",
    "muon-gpt2",
    "optim",
    "attention",
)


@pytest.mark.slow
def test_cpu_rehearsal_writes_one_record(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "KIMI_BENCH_GIT_COMMIT": "rehearsal",
        "SITE": str(tmp_path / "site"),
    }
    done = subprocess.run(
        ["bash", str(SCRIPT), "--device", "cpu", "--preset", "tiny", "--budget", "900"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout[done.stdout.index("== summary") :]
    for name in STEPS:
        assert f"  {name}: ok" in summary, summary
    # the preflight came first, before any timed step, and the summary says which MoE dispatch ran
    assert "  preflight: ok" in summary and "MoE dispatch: grouped_mm" in summary, summary
    assert done.stdout.index("preflight ok: 5 arms") < done.stdout.index("== tests")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "record.json",
        "record.md",
        "run.log",
        "test_cuda.log",
    ]
    assert "skipped" in (tmp_path / "test_cuda.log").read_text()  # no GPU here: every CUDA test skips
    raw = json.loads((tmp_path / "record.json").read_text())
    assert len(raw["runs"]) == len(STEPS) - 1 and raw["env"]["git_commit"] == "rehearsal"
    # train-gpt2, train-kimi, muon-kimi, muon-gpt2: one eager row each (tiny: both variants at the tiny preset)
    assert [(r["variant"], r["optimizer"]) for r in raw["train"]] == [
        ("gpt", "adamw"),
        ("kimi", "adamw"),
        ("kimi", "muon"),
        ("gpt", "muon"),
    ]
    for section in ("train", "moe", "decode", "optim", "attention"):
        assert raw[section] and all(
            r["status"] == "ok" or r["status"].startswith("not eligible") for r in raw[section]
        ), section
    assert "| target | scope |" in summary  # the targets table closes the output the device tool returns


def test_a_failed_preflight_stops_the_run_before_any_timed_step(tmp_path):
    """PYTHON runs everything but the preflight, which fails as a broken CUDA path would: the run ends there."""
    python = tmp_path / "python"
    python.write_text(f"""#!/usr/bin/env bash
if [ "$2" = harness.measure.preflight ]; then
  echo "preflight FAILED on cpu after 0.1 s, 1 check(s): kimi@tiny:muon train step (RuntimeError: CUDA error)"; exit 1
fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(python), "KIMI_BENCH_GIT_COMMIT": "rehearsal"}
    done = subprocess.run(
        ["bash", str(SCRIPT), "--device", "cpu", "--preset", "tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 4, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu-run.sh: stopped: the preflight failed (rc=1") and "nothing timed has run" in last
    assert "== tests" not in done.stdout and not (tmp_path / "out" / "record.json").exists()


def test_prepare_says_so_when_no_python_environment_is_there(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PY", "PYTHON", "VIRTUAL_ENV")}
    copy = tmp_path / "repo"
    (copy / "reports" / "benchmarks").mkdir(parents=True)
    for rel in ("reports/benchmarks/gpu-run.sh", "reports/gpu-common.sh"):
        (copy / rel).write_text((REPO / rel).read_text())
    done = subprocess.run(
        ["bash", str(copy / "reports/benchmarks/gpu-run.sh"), "--prepare"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "no Python environment: none is active and .venv/bin/python is missing" in done.stderr


def test_bad_options_are_one_line_errors(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    for args, message in (
        (["--device", "tpu"], "--device tpu"),
        (["--frobnicate"], "unknown option"),
        (
            ["--steps", "moe,proposals"],
            "--steps: unknown step proposals",
        ),  # a removed name is an error, not a silent no-op
    ):
        done = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr
    no_out = {k: v for k, v in env.items() if k != "OUT"}
    done = subprocess.run(["bash", str(SCRIPT)], env=no_out, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "OUT is not set" in done.stderr


# What the H200 image's python3 has (docs/gpu-image.md) plus the wheels carried in .whl/.
IMAGE_MODULES = {
    "torch",
    "typer",
    "click",
    "rich",
    "markdown_it",
    "mdurl",
    "pygments",
    "shellingham",
    "numpy",
    "sympy",
    "mpmath",
    "networkx",
    "jinja2",
    "markupsafe",
    "filelock",
    "fsspec",
    "triton",
    "packaging",
    "typing_extensions",
    "yaml",
    "annotated_doc",
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "typing_inspection",
    "torchgen",
    "setuptools",
    "pkg_resources",
    "tqdm",
    # setuptools' vendored packages, importable top-level once pkg_resources has loaded (newer setuptools)
    "jaraco",
    "more_itertools",
    "backports",
}


@pytest.mark.slow
def test_bench_imports_only_what_the_gpu_image_has():
    code = (
        "import sys, harness.measure.bench.suite, harness.measure.bench.kit, harness.measure.preflight;"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    imported = set(done.stdout.split()) - {"harness", "arch", "reports", "tests", "_distutils_hack"}
    imported = {m for m in imported if not m.startswith("_")}
    assert imported <= IMAGE_MODULES, imported - IMAGE_MODULES
