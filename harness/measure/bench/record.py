"""The benchmark record: environment capture, markdown + JSON rendering, and merging runs into one record.

A record is `<name>.md` with the raw rows beside it as `<name>.json`. Runs of one session (several commands,
or one prepared script's steps appending to one record) merge into one: rows concatenated, targets
re-evaluated over all of them, every command listed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from harness.errors import UserError
from harness.mdformat import fmt_spec as fmt
from harness.mdformat import md_table
from harness.measure.bench.targets import MISS_MARGIN, evaluate_targets

REPO = Path(__file__).resolve().parents[3]
RECORD_DIR = REPO / "reports" / "benchmarks"
SECTIONS = ("train", "moe", "decode", "optim", "attention")


# ============================================================================ environment


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: device, driver, CUDA, torch, date, code version."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_runtime": torch.version.cuda or "none",
        "grouped_mm": "F.grouped_mm" if hasattr(F, "grouped_mm") else "missing (MoE falls back to loop)",
    }
    commit = os.environ.get("KIMI_BENCH_GIT_COMMIT") or _run(["git", "rev-parse", "--short", "HEAD"])
    if commit and "KIMI_BENCH_GIT_COMMIT" not in os.environ:
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
        commit += " (+ uncommitted changes)" if dirty else ""
    env["git_commit"] = commit or "unknown (no git; set KIMI_BENCH_GIT_COMMIT)"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["device"] = torch.cuda.get_device_name(device)
        env["device_detail"] = f"sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver"] = smi.splitlines()[0] if smi else f"unknown (no nvidia-smi); CUDA runtime {torch.version.cuda}"
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
        env["device_detail"] = f"{torch.get_num_threads()} torch threads"
        env["driver"] = "n/a (cpu)"
    return env


def device_slug(env: dict[str, Any]) -> str:
    name = "cpu" if env["device"].startswith("cpu") else env["device"]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_record_path(env: dict[str, Any], directory: Path = RECORD_DIR) -> Path:
    """reports/benchmarks/<date>-<device-slug>.md, with -2, -3, ... when that name is taken."""
    stem = f"{env['date'][:10]}-{device_slug(env)}"
    path, n = directory / f"{stem}.md", 2
    while path.exists():
        path, n = directory / f"{stem}-{n}.md", n + 1
    return path


# ============================================================================ tables


def _pct(value: float | None) -> str:
    return fmt(value, "{:.1%}")


def _spread(r: dict, median: str, iqr: str, spec: str = "{:,.2f}") -> str:
    noisy = " noisy" if r.get("noisy") else ""
    return (
        f"{fmt(r.get(median), spec)} ±{fmt(r.get(iqr), spec)}{noisy}"
        if r.get(iqr) is not None
        else fmt(r.get(median), spec)
    )


# Columns per section: (header, row -> cell text). One definition feeds the console and the markdown.
COLUMNS: dict[str, list[tuple[str, Callable[[dict], str]]]] = {
    "train": [
        ("preset", lambda r: r["preset"]),
        ("variant", lambda r: r["variant"]),
        ("optim", lambda r: r["optimizer"]),
        ("compile", lambda r: "yes" if r["compile"] else "no"),
        ("B x T", lambda r: f"{r['batch']}x{r['seq']}"),
        ("step ms (IQR)", lambda r: _spread(r, "step_ms", "step_iqr_ms")),
        ("fwd+bwd ms", lambda r: fmt(r.get("fwd_bwd_ms"))),
        ("opt ms", lambda r: fmt(r.get("opt_ms"))),
        ("tokens/s", lambda r: fmt(r.get("tokens_per_s"), "{:,.0f}")),
        ("TFLOP/s", lambda r: fmt(r.get("model_tflops"), "{:.3g}")),
        ("MFU", lambda r: _pct(r.get("mfu"))),
        ("MFU fwd+bwd", lambda r: _pct(r.get("mfu_fwd_bwd"))),
        ("of matmul peak", lambda r: _pct(r.get("of_matmul_peak"))),
        ("mem GiB", lambda r: fmt(r.get("peak_mem_gib"), "{:.1f}")),
        ("syncs/step", lambda r: fmt(r.get("host_syncs"), "{}")),
        ("MoE dispatch", lambda r: r.get("moe_dispatch") or ""),
        ("1st step s", lambda r: fmt(r.get("first_step_s"), "{:.1f}")),
        ("status", lambda r: r["status"]),
    ],
    "moe": [
        ("preset", lambda r: r["preset"]),
        ("layer", lambda r: r["layer"]),
        ("tokens", lambda r: fmt(r.get("tokens"), "{:,}")),
        ("params", lambda r: fmt(r.get("params"), "{:,}")),
        ("active/token", lambda r: fmt(r.get("active_params"), "{:,}")),
        ("fwd ms", lambda r: fmt(r.get("fwd_ms"))),
        ("fwd+bwd ms (IQR)", lambda r: _spread(r, "fwd_bwd_ms", "fwd_bwd_iqr_ms")),
        ("tokens/s", lambda r: fmt(r.get("tokens_per_s"), "{:,.0f}")),
        ("vs dense", lambda r: fmt(r.get("vs_dense"), "{:.2f}x")),
        ("vs all-experts", lambda r: fmt(r.get("vs_all_experts"), "{:.2f}x")),
        ("dtype", lambda r: r.get("dtype", "")),
        ("status", lambda r: r["status"]),
    ],
    "decode": [
        ("preset", lambda r: r["preset"]),
        ("variant", lambda r: r["variant"]),
        ("batch", lambda r: str(r["batch"])),
        ("prompt+new", lambda r: f"{r['prompt']}+{r['new_tokens']}"),
        ("ms/step (IQR)", lambda r: _spread(r, "step_ms", "step_iqr_ms", "{:.3f}")),
        ("tokens/s", lambda r: fmt(r.get("tokens_per_s"), "{:,.0f}")),
        ("prefill tokens/s", lambda r: fmt(r.get("prefill_tokens_per_s"), "{:,.0f}")),
        ("KV B/token", lambda r: fmt(r.get("kv_bytes_per_token"), "{:,.0f}")),
        ("KV B/token (counting)", lambda r: fmt(r.get("kv_bytes_per_token_counted"), "{:,}")),
        ("cache MiB", lambda r: fmt(r.get("cache_mib"), "{:.3g}")),
        ("dtype", lambda r: r["dtype"]),
        ("status", lambda r: r["status"]),
    ],
    "optim": [
        ("preset", lambda r: r["preset"]),
        ("variant", lambda r: r["variant"]),
        ("optimizer", lambda r: r["optimizer"]),
        ("params", lambda r: fmt(r.get("params"), "{:,}")),
        ("step ms", lambda r: fmt(r.get("step_ms"))),
        ("Muon groups ms", lambda r: fmt(r.get("muon_groups_ms"))),
        ("AdamW groups ms", lambda r: fmt(r.get("adamw_groups_ms"))),
        ("NS GFLOP", lambda r: fmt(r.get("ns_gflop"), "{:,.1f}")),
        ("NS TFLOP/s", lambda r: fmt(r.get("ns_tflops"), "{:.3g}")),
        ("status", lambda r: r["status"]),
    ],
    "attention": [
        ("preset", lambda r: r["preset"]),
        ("kind", lambda r: r["kind"]),
        ("d_qk/d_v", lambda r: f"{r['d_qk']}/{r['d_v']}"),
        ("B x H x T", lambda r: f"{r['batch']}x{r['heads']}x{r['seq']}"),
        ("backend", lambda r: r["backend"]),
        ("fwd+bwd ms", lambda r: fmt(r.get("fwd_bwd_ms"), "{:.3f}")),
        ("TFLOP/s", lambda r: fmt(r.get("tflops"), "{:.3g}")),
        ("status", lambda r: r["status"]),
    ],
    "targets": [
        ("target", lambda r: r["target"]),
        ("scope", lambda r: r["scope"]),
        ("measured", lambda r: r["measured_text"]),
        ("threshold", lambda r: r["threshold_text"]),
        ("met", lambda r: {True: "yes", False: "NO", None: "n/a"}[r["met"]]),
        ("note", lambda r: r["note"]),
    ],
    "kernels": [
        ("op / kernel", lambda r: r["name"]),
        ("calls", lambda r: str(r["calls"])),
        ("ms per call", lambda r: fmt(r["ms_per_call"], "{:.3f}")),
        ("share", lambda r: _pct(r["share"])),
    ],
}

TITLES = {
    "targets": "Targets",
    "train": "Train step: tokens/s and MFU",
    "moe": "MoE layer: sparse dispatch vs dense of equal active params and vs all-experts",
    "decode": "MLA decode vs MHA decode (KV cache)",
    "optim": "Muon step vs AdamW step (optimizer.step() alone)",
    "attention": "Attention kernels (SDPA backends, fwd+bwd)",
    "kernels": "Top kernels",
}

NOTES = {
    "train": "One step = forward (bf16 autocast on CUDA) + MoE aux loss, backward, grad clip 1.0, optimizer "
    "step, zero_grad, MoE bias update (harness/trial/loop.py's step without data loading). MFU = "
    "flops_per_token (arch/counting.py: 6 x active matmul params + attention at full T^2, nanoGPT's "
    "convention) x tokens/s / datasheet dense bf16 peak. 'MFU fwd+bwd' leaves out clip/optimizer. "
    "'of matmul peak': the same FLOP/s over the measured large-matmul rate. Muon rows run eager only (the "
    "optimizer step is never compiled). syncs/step: synchronizing CUDA calls in one step (torch sync debug "
    "mode).",
    "moe": "Same router and expert weights for every MoE row. dense-active: one SwiGLU of width "
    "top_k x inter + shared width, i.e. the MoE's active parameters without the router. all-experts: "
    "every expert on every token times a mostly-zero gate (nanoKimi's dispatch).",
    "decode": "Tokens/s counts all sequences' tokens: batch x new tokens / time of the new-token steps. KV "
    "B/token: bytes of the allocated cache / (batch x positions), all layers; 'counting' is "
    "arch.counting.kv_cache_bytes_per_token in the same dtype.",
    "optim": "Fixed random gradients; only optimizer.step() is timed. Muon/AdamW groups: the Muon optimizer's "
    "two kinds of groups stepped by two separate optimizers. Newton-Schulz runs one batched call per matrix "
    "shape (arch.muon's single-process default). NS GFLOP: exact Newton-Schulz matmul FLOPs per step.",
    "attention": "Random q, k, v (bf16 on CUDA, fp32 on CPU) at the training shape (micro-batch x heads x "
    "block). 'not eligible': the backend refused the shape (reason from torch's warning).",
}


def table_cells(section: str, rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols = COLUMNS[section]
    return [h for h, _ in cols], [[fn(r) for _, fn in cols] for r in rows]


def print_section(console: Console, section: str, rows: list[dict]) -> None:
    headers, cells = table_cells(section, rows)
    table = Table(title=TITLES[section], header_style="bold")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 2 or h in ("status", "note", "target") else "right")
    for row in cells:
        table.add_row(*row)
    console.print(table)


# ============================================================================ markdown


def _kernel_tables(targets: list[dict]) -> list[str]:
    """One top-kernels table per target missed by more than the margin whose row was profiled."""
    out = []
    for t in targets:
        if t.get("top_kernels"):
            out += [
                f"### {t['target']} ({t['scope']}): {t['measured_text']}, target {t['threshold_text']}",
                "",
                f"Profiled: {t['profiled']} (torch.profiler: self time per call; CUDA kernels on GPU, ops on CPU).",
                "",
                md_table(*table_cells("kernels", t["top_kernels"])),
                "",
            ]
    missed = [t for t in targets if t.get("missed_by_over_margin") and not t.get("top_kernels")]
    for t in missed:
        out += [
            f"- {t['target']} ({t['scope']}) missed by more than {MISS_MARGIN:.0%}; no profile was taken "
            "(run the section with --profile).",
            "",
        ]
    return out


def render_markdown(results: dict[str, Any]) -> str:
    env, settings = results["env"], results["settings"]
    out = [
        f"# Benchmarks: {env['device']}, {env['date']}",
        "",
        "Written by `harness/measure/bench` (`kimi-bench bench`); see reports/benchmarks/README.md for how to "
        "run it and what each target means.",
        "",
        "## Environment",
        "",
    ]
    env_rows = [[k, str(v)] for k, v in env.items()]
    env_rows += [
        [
            "datasheet peak (MFU denominator)",
            fmt(settings.get("peak_flops"), "{:.4g} FLOP/s")
            if settings.get("peak_flops")
            else "n/a (no datasheet entry for this device; --peak-tflops)",
        ],
        ["measured matmul peak", fmt(settings.get("matmul_peak"), "{:.4g} FLOP/s")],
    ]
    out += [md_table(["what", "value"], env_rows), "", "## Commands", "", "```bash", results["command"], "```", ""]
    for i, run in enumerate(results.get("runs", [{"settings": settings}]), 1):
        shown = {k: v for k, v in run["settings"].items() if k not in ("peak_flops", "matmul_peak")}
        seconds = f" ({run['seconds']:.0f} s)" if run.get("seconds") is not None else ""
        out.append(f"Run {i}{seconds}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    out.append("")
    ran = set(settings["sections"].split(","))
    for section in ("targets", *SECTIONS):
        out += [f"## {TITLES[section]}", ""]
        rows = results.get(section)
        if section != "targets" and section not in ran:
            out += ["Not run (section not selected).", ""]
            continue
        if not rows:
            out += [
                "No rows yet (the run stopped before this section finished)."
                if section != "targets"
                else "No targets evaluated.",
                "",
            ]
            continue
        out += [md_table(*table_cells(section, rows)), ""]
        if section in NOTES:
            out += [NOTES[section], ""]
        if section == "targets":
            out += _kernel_tables(rows)
    out += [
        "## Method",
        "",
        "harness/measure/bench/timing.py: torch.utils.benchmark blocks (the timer synchronizes the device around "
        "each block), the arms of a comparison in interleaved rounds; median and IQR over the blocks, "
        "'noisy' where IQR/median > 10%. Train steps: CUDA events recorded on the stream at each phase "
        "boundary (no host sync between timed steps), after warm-up steps; the first step (compilation, "
        "autotuning) is timed apart as '1st step s'. On CPU the same code reads time.perf_counter. TF32 is "
        "allowed for fp32 matmuls on CUDA (the trainer's setting); the models run bf16 autocast over fp32 "
        "weights except decode, which casts the model to bf16. Token ids are random (uniform over the "
        "vocabulary), so MoE routing is that of random inputs.",
        "",
    ]
    return "\n".join(out)


def write_record(results: dict[str, Any], path: Path) -> None:
    """The markdown record and, beside it, the raw rows as JSON (<stem>.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(results))
    path.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))


# ============================================================================ merging


def load_record(path: Path, field: str = "--merge") -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{field}: cannot read {path} ({e}); give the .json written beside each record") from None


def merge_results(runs: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """One results dict from several: rows concatenated, targets re-evaluated over all of them (so e.g. the
    Muon share can use another run's compiled fwd+bwd), environment of the first, every command kept."""
    devices = {r["env"]["device"] for r in runs}
    if len(devices) > 1:
        raise UserError(f"--merge: records from different devices {sorted(devices)}; merge one device at a time")
    merged: dict[str, Any] = {"env": runs[0]["env"], "command": "\n".join(r["command"] for r in runs)}
    sections = [s for s in SECTIONS if any(s in r["settings"]["sections"].split(",") for r in runs)]
    merged["settings"] = {**runs[0]["settings"], "sections": ",".join(sections)}
    if names:
        merged["settings"]["merged_from"] = ",".join(names)
    merged["runs"] = [run for r in runs for run in r.get("runs", [{"settings": r["settings"]}])]
    for section in SECTIONS:
        merged[section] = [row for r in runs for row in r.get(section, [])]
    merged["targets"] = evaluate_targets(merged)
    return merged


def merge_records(json_paths: Sequence[Path], out_md: Path, console: Console | None = None) -> dict[str, Any]:
    """Merge the .json of several runs into one record at out_md (+ .json)."""
    runs = [load_record(p) for p in json_paths]
    merged = merge_results(runs, [Path(p).name for p in json_paths])
    write_record(merged, out_md)
    console = console or Console(width=200)
    print_section(console, "targets", merged["targets"])
    console.print(f"merged record written: {out_md}")
    return merged
