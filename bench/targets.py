"""The project's layer targets (README, Benchmarks: "Targets and where they stand"), checked against a layer
benchmark's records.

Each target names the case it is judged on; a run that did not measure that case reports it as
"not measured" rather than judging another case.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    device: str  # "cpu" or "cuda"
    dtype: str
    M: int
    K: int
    N: int
    r: int
    p: float
    what: str  # human-readable
    metric: str  # key of METRICS
    limit: float
    upper: bool = True  # measured must be <= limit (else >= limit)


TARGETS = [
    Target("cpu", "float32", 2048, 1024, 1024, 16, 0.1, "fused fwd+bwd time / PEFT's", "time_vs_peft", 0.8),
    Target("cpu", "float32", 2048, 1024, 1024, 16, 0.1, "fused saved bytes / PEFT's", "saved_vs_peft", 0.55),
    Target("cuda", "bfloat16", 8192, 4096, 4096, 16, 0.1, "fused fwd+bwd time / base layer's", "time_vs_base",
           1.10),
    Target("cuda", "bfloat16", 8192, 4096, 4096, 16, 0.1, "PEFT fwd+bwd time / fused (speed-up)", "speedup_vs_peft",
           1.4, upper=False),
    Target("cuda", "bfloat16", 8192, 4096, 4096, 16, 0.1, "fused fwd+bwd time / torch.compile's",
           "time_vs_compile", 1.0),
    Target("cuda", "bfloat16", 8192, 4096, 4096, 16, 0.1, "fused saved bytes / PEFT's (one layer)",
           "saved_vs_peft", 0.7),
    Target("cuda", "bfloat16", 8192, 4096, 4096, 16, 0.1, "fused saved bytes / PEFT's (q/k/v sharing x)",
           "qkv_saved_vs_peft", 0.35),
]


def _fwdbwd(prov: dict) -> float | None:
    return prov.get("time", {}).get("fwdbwd", {}).get("ms") if prov and "error" not in prov else None


def _ratio(a, b):
    return a / b if a is not None and b else None


METRICS = {
    "time_vs_peft": lambda ps, qkv: _ratio(_fwdbwd(ps.get("fused")), _fwdbwd(ps.get("peft"))),
    "time_vs_base": lambda ps, qkv: _ratio(_fwdbwd(ps.get("fused")), _fwdbwd(ps.get("base"))),
    "time_vs_compile": lambda ps, qkv: _ratio(_fwdbwd(ps.get("fused")), _fwdbwd(ps.get("compile"))),
    "speedup_vs_peft": lambda ps, qkv: _ratio(_fwdbwd(ps.get("peft")), _fwdbwd(ps.get("fused"))),
    "saved_vs_peft": lambda ps, qkv: _ratio(ps.get("fused", {}).get("saved_bytes"),
                                            ps.get("peft", {}).get("saved_bytes")),
    "qkv_saved_vs_peft": lambda ps, qkv: _ratio((qkv or {}).get("fused"), (qkv or {}).get("peft")),
}


def _matches(target: Target, rec: dict) -> bool:
    s = rec["shape"]
    return (rec["device_type"] == target.device and rec["dtype"] == target.dtype and s["M"] == target.M
            and s["K"] == target.K and s["N"] == target.N and s["r"] == target.r and s["p"] == target.p)


def evaluate(records: list[dict], device_type: str) -> list[dict]:
    """One row per target of ``device_type``: measured value, limit, and verdict."""
    out = []
    for target in TARGETS:
        if target.device != device_type:
            continue
        rec = next((r for r in records if _matches(target, r)), None)
        value = METRICS[target.metric](rec["providers"], rec.get("qkv_saved_bytes")) if rec else None
        if value is None:
            verdict = "not measured"
        else:
            verdict = "met" if (value <= target.limit if target.upper else value >= target.limit) else "MISSED"
        case = f"{target.dtype} M={target.M} {target.K}→{target.N} r={target.r} p={target.p:g}"
        out.append({"case": case, "what": target.what, "limit": ("≤ " if target.upper else "≥ ") + f"{target.limit}",
                    "measured": value, "verdict": verdict})
    return out


def targets_table(rows: list[dict]) -> str:
    from report import fmt, markdown_table

    return markdown_table(["case", "target", "limit", "measured", "verdict"],
                          [[r["case"], r["what"], r["limit"], fmt(r["measured"], ".3f"), r["verdict"]] for r in rows])
