"""reports/gpu-common.sh, the shell both GPU scripts source, driven through bash as the scripts run it
(`set -euo pipefail`): the packer survives a tar that fails on a file appended while it reads, foreground
and background packs never share a temp file, the local interpreter is the active venv's, a missing carry and
a failed preflight are one line each."""

from __future__ import annotations

import os
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMON = REPO / "reports" / "gpu-common.sh"


def bash(script: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 60, **kw):
    """script after `set -euo pipefail` and sourcing gpu-common.sh, as the GPU scripts run."""
    code = f"set -euo pipefail\nGC_NAME=test\n. {COMMON}\n{script}"
    return subprocess.run(
        ["bash", "-c", code],
        cwd=cwd,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


class Appender:
    """Appends to record/big.bin without pause (tar reads it for a few hundred ms), like the trial loop
    appending to events.jsonl while the packer reads it."""

    def __init__(self, path: Path):
        self.path, self.stop = path, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with open(self.path, "ab", buffering=0) as f:
            while not self.stop.is_set():
                f.write(b"x" * 512)
                time.sleep(0.0005)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def make_record(tmp_path: Path) -> Path:
    rec = tmp_path / "record"
    rec.mkdir()
    (rec / "big.bin").write_bytes(os.urandom(6 * 2**20))  # incompressible: tar + gzip take a while
    (rec / "events.jsonl").write_text('{"ev": "format"}\n')
    return rec


def members(tgz: Path) -> dict[str, bytes]:
    with tarfile.open(tgz) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.mark.slow
def test_a_pack_failed_by_an_appended_file_is_a_warning_and_the_loop_survives(tmp_path):
    rec, out = make_record(tmp_path), tmp_path / "out"
    out.mkdir()
    dest, log = out / "record.tgz", tmp_path / "loop.err"
    with open(log, "w") as err:
        loop = subprocess.Popen(
            ["bash", "-c", f"set -euo pipefail\nGC_NAME=test\n. {COMMON}\ngc_pack_loop {rec} {dest} 0.05"],
            stderr=err,
            start_new_session=True,
        )
    try:
        with Appender(rec / "big.bin"):
            assert wait_for(lambda: "file changed as we read it" in log.read_text(), 60), log.read_text()
            time.sleep(0.3)
            assert loop.poll() is None, "the pack loop died on a failed tar"
        (rec / "events.jsonl").write_text('{"ev": "format"}\n{"ev": "last"}\n')  # nothing writes any more
        assert wait_for(lambda: dest.exists() and b"last" in members(dest).get("record/events.jsonl", b""), 30)
        assert loop.poll() is None
    finally:
        loop.terminate()
        loop.wait(10)
    subprocess.run(["flock", f"{rec}.pack.lock", "true"], timeout=30, check=True)  # a pack still in flight ends
    warning = next(line for line in log.read_text().splitlines() if "file changed" in line)
    assert warning.startswith("test: warning: packing") and "record.tgz keeps the previous pack" in warning
    assert members(dest)["record/big.bin"] == (rec / "big.bin").read_bytes()
    assert not list(out.glob("*.tmp"))  # a failed pack leaves no temp file behind


@pytest.mark.slow
def test_a_failed_pack_does_not_end_a_set_e_script(tmp_path):
    """The foreground pack after each seed: under set -e a failing tar used to end the whole run."""
    rec, out = make_record(tmp_path), tmp_path / "out"
    out.mkdir()
    with Appender(rec / "big.bin"):
        for _ in range(10):  # the appender makes (nearly) every pack fail; 10 tries to see one
            done = bash(f"gc_pack {rec} {out}/record.tgz\necho carried on")
            assert done.returncode == 0 and done.stdout.strip() == "carried on", done.stderr
            if "file changed as we read it" in done.stderr:
                break
        else:
            pytest.fail("no pack saw the appended file")
    assert not (out / "record.tgz").exists() and not list(out.iterdir())  # no half pack, no temp file


@pytest.mark.slow
def test_foreground_and_background_packs_never_clobber_each_other(tmp_path):
    rec, out = make_record(tmp_path), tmp_path / "out"
    out.mkdir()
    dest = out / "record.tgz"
    # two background loops without pause and the foreground: every pack overlaps another one
    done = bash(
        f"gc_pack_loop {rec} {dest} 0 & a=$!\ngc_pack_loop {rec} {dest} 0 & b=$!\n"
        "trap 'kill $a $b 2>/dev/null || true' EXIT\n"
        f"for i in $(seq 1 6); do gc_pack {rec} {dest}; done\n"
        "kill -0 $a && kill -0 $b\nkill $a $b; wait $a $b 2>/dev/null || true\n"
        f"gc_pack {rec} {dest}\necho done",
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
    assert "warning" not in done.stderr, done.stderr  # nothing writes during a pack: every pack succeeds
    assert members(dest)["record/events.jsonl"] == (rec / "events.jsonl").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["record.tgz"]


def test_the_local_python_is_the_active_venvs_or_one_line(tmp_path):
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    import sys

    (venv / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("PY", "PYTHON", "VIRTUAL_ENV")}
    done = bash("gc_local_python json", cwd=tmp_path, env={**env, "VIRTUAL_ENV": str(tmp_path / "venv")})
    assert done.returncode == 0 and done.stdout.strip() == str(venv / "python")
    done = bash(
        "gc_local_python json", cwd=tmp_path, env={**env, "PY": sys.executable, "VIRTUAL_ENV": str(tmp_path / "venv")}
    )
    assert done.stdout.strip() == sys.executable  # PY wins
    done = bash("gc_local_python json", cwd=tmp_path, env=env)  # no venv active, no .venv here
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "no Python environment: none is active and .venv/bin/python is missing" in done.stderr
    done = bash("gc_local_python no_such_module_here", cwd=tmp_path, env={**env, "PY": sys.executable})
    assert done.returncode == 2 and "cannot import no_such_module_here" in done.stderr


def test_a_missing_carry_is_one_line(tmp_path):
    done = bash("gc_require_carry .carry/wheels 'bash x.sh --prepare' || exit $?", cwd=tmp_path)
    assert done.returncode == 3 and done.stderr.count("\n") == 1
    assert ".carry/wheels is missing or empty" in done.stderr and "run 'bash x.sh --prepare'" in done.stderr
    assert "name .carry in the run's carry" in done.stderr
    (tmp_path / ".carry" / "wheels").mkdir(parents=True)
    (tmp_path / ".carry" / "wheels" / "a.whl").write_text("")
    assert bash("gc_require_carry .carry/wheels x", cwd=tmp_path).returncode == 0


def test_a_failed_preflight_ends_the_run_with_one_line(tmp_path):
    log = tmp_path / "run.log"
    done = bash(f"gc_preflight 20 {log} bash -c 'echo preflight FAILED on cuda: kimi train; exit 1'\necho timed work")
    assert done.returncode == 4 and "timed work" not in done.stdout
    assert done.stdout.splitlines()[-1].startswith("test: stopped: the preflight failed (rc=1, after")
    assert "preflight FAILED on cuda: kimi train" in log.read_text()
    done = bash(f"gc_preflight 1 {log} sleep 30\necho timed work")
    assert done.returncode == 4 and "cut at its 1s limit" in done.stdout
    assert bash(f"gc_preflight 20 {log} true\necho timed work").stdout.strip() == "timed work"


def test_the_paper_run_without_its_carry_stops_with_one_line(tmp_path):
    """On a fresh device machine without .carry (not named in carry, or never prepared): one line, not pip's."""
    copy = tmp_path / "repo"
    (copy / "reports" / "results").mkdir(parents=True)
    for rel in ("reports/results/paper-h200-run.sh", "reports/gpu-common.sh"):
        (copy / rel).write_text((REPO / rel).read_text())
    done = subprocess.run(
        ["bash", str(copy / "reports/results/paper-h200-run.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "OUT": str(tmp_path / "out")},
        timeout=60,
    )
    assert done.returncode == 3
    assert "paper-h200-run.sh: error: .carry/wheels is missing or empty here" in done.stdout + done.stderr
    assert "--prepare', then name .carry in the run's carry" in done.stdout + done.stderr
