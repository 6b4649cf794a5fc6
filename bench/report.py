"""Writing results: environment metadata, markdown tables, JSON, and PNG plots (matplotlib optional).

Run it alone to redraw a plot from a JSON file (e.g. after a run was cut off by a time limit):

    python bench/report.py bench/results/<run>/layer.json
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

MiB = 2**20


# ------------------------------------------------------------------------------------- environment


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def device_slug(device: torch.device) -> str:
    """Short folder-name form: 'cpu', 'h100', 'h200', or the GPU's name lower-cased."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for known in ("h200", "h100", "a100", "l40s", "l4", "a10"):
        if known in name:
            return known
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def default_out_dir(device: torch.device) -> Path:
    date = datetime.date.today().isoformat()
    return Path(__file__).resolve().parent / "results" / f"{device_slug(device)}-{date}"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # missing or broken: record, never fail the run for it
        return None


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    """What a result depends on: device, software versions, threads, load, date, commit."""
    import fused_lora

    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "fused_lora": fused_lora.__version__,
        "fused_lora_file": fused_lora.__file__,
        "git_commit": _git_commit(),
        "torch_threads": torch.get_num_threads(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "FUSED_LORA_BACKEND": os.environ.get("FUSED_LORA_BACKEND"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return env


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: on a shared CPU a load above the core count means noisy timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def wait_for_quiet(max_wait_s: float, threshold: float | None = None, poll_s: float = 15) -> list[float] | None:
    """Waits (up to ``max_wait_s``) until the 1-minute load average drops under ``threshold`` (default: half
    the cores). On a shared CPU, other processes' load doubles timings and makes them noisy; waiting is
    cheaper than a meaningless run. Returns the load average it stopped at."""
    import time

    threshold = threshold if threshold is not None else max(0.5, (os.cpu_count() or 1) / 2)
    deadline = time.time() + max_wait_s
    load = load_average()
    while load and load[0] > threshold and time.time() < deadline:
        print(f"# waiting for a quiet CPU: load average {load[0]} > {threshold}", flush=True)
        time.sleep(poll_s)
        load = load_average()
    return load


# ------------------------------------------------------------------------------------------ output


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)  # atomic: a run killed mid-write leaves the previous complete file


def fmt(value, spec: str = ".2f", none: str = "–") -> str:
    if value is None:
        return none
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def mib(nbytes: int | None) -> str:
    return fmt(nbytes / MiB if nbytes is not None else None, ".1f")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def case_label(rec: dict) -> str:
    s = rec["shape"]
    name = f" {s['label']}" if s.get("label") else ""
    return f"{rec['dtype']} M={s['M']} {s['K']}→{s['N']} r={s['r']} p={s['p']:g}{name}"


def layer_table(records: list[dict]) -> str:
    """One row per (case, provider): the table layer_bench prints and writes as layer.md."""
    header = ["case", "provider", "fwd ms", "bwd ms", "fwd+bwd ms", "×base", "×PEFT", "TFLOP/s", "GB/s",
              "peak MiB", "saved MiB", "launches f/b"]
    rows = []
    for rec in records:
        for name, r in rec["providers"].items():
            if "error" in r:
                rows.append([case_label(rec), name, "error: " + r["error"][:60]] + [""] * (len(header) - 3))
                continue
            t = r.get("time", {})
            lf, lb = r.get("launches_fwd"), r.get("launches_bwd")
            rows.append([
                case_label(rec), name,
                fmt(t.get("fwd", {}).get("ms")), fmt(t.get("bwd", {}).get("ms")), fmt(t.get("fwdbwd", {}).get("ms")),
                fmt(r.get("x_base")), fmt(r.get("x_peft")),
                fmt(r.get("tflops"), ".3f"), fmt(r.get("gbps"), ".1f"),
                mib(r.get("peak_bytes")), mib(r.get("saved_bytes")),
                f"{fmt(lf)}/{fmt(lb)}",
            ])
    return markdown_table(header, rows)


# ------------------------------------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_layer(records: list[dict], path: Path) -> str:
    """Two panels against the cases: fwd+bwd time relative to the base layer, and saved activation MiB.
    Returns a line saying what was written (or why nothing was)."""
    plt = _pyplot()
    if plt is None:
        return f"matplotlib is not installed: no plot written ({path.name}); the JSON and the table hold the data"
    records = [r for r in records if r.get("providers")]
    if not records:
        return "nothing to plot"
    names = list(dict.fromkeys(n for rec in records for n in rec["providers"]))
    labels = [case_label(rec).replace(" M=", "\nM=") for rec in records]
    width = 0.8 / len(names)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(records)), 9), sharex=True)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(records))]
        ratio = [rec["providers"].get(name, {}).get("x_base") or 0 for rec in records]
        saved = [(rec["providers"].get(name, {}).get("saved_bytes") or 0) / MiB for rec in records]
        axes[0].bar(xs, ratio, width, label=name)
        axes[1].bar(xs, saved, width, label=name)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("fwd+bwd time / base layer")
    axes[0].set_title(f"LoRA linear layer, {records[0].get('device', '')}")
    axes[1].set_ylabel("saved for backward, MiB\n(excl. parameters)")
    axes[1].set_xticks(range(len(records)))
    axes[1].set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    axes[0].legend(ncol=len(names), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def plot_model(records: list[dict], path: Path) -> str:
    """Step time and saved activation per (model, p) for each provider."""
    plt = _pyplot()
    if plt is None:
        return f"matplotlib is not installed: no plot written ({path.name})"
    ok = [r for r in records if "error" not in r]
    if not ok:
        return "nothing to plot"
    keys = list(dict.fromkeys(f"{r['model']}\np={r['p']:g}" for r in ok))
    names = list(dict.fromkeys(r["provider"] for r in ok))
    width = 0.8 / len(names)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.5 * len(keys)), 4.5))
    for i, name in enumerate(names):
        by_key = {f"{r['model']}\np={r['p']:g}": r for r in ok if r["provider"] == name}
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(keys))]
        axes[0].bar(xs, [by_key.get(k, {}).get("step_ms") or 0 for k in keys], width, label=name)
        axes[1].bar(xs, [(by_key.get(k, {}).get("saved_bytes") or 0) / MiB for k in keys], width, label=name)
    for ax, title in zip(axes, ("training step, ms", "saved for backward, MiB"), strict=True):
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Redraw the PNG of a layer.json or model.json")
    parser.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    payload = json.loads(args.json.read_text())
    if "cases" in payload:
        print(plot_layer(payload["cases"], args.json.with_suffix(".png")))
    else:
        print(plot_model(payload["runs"], args.json.with_suffix(".png")))


if __name__ == "__main__":
    main()
