"""bench/multi_bench.py at tiny sizes: it runs end to end (both ways, the correctness check, times, memory, the traffic
model's W bytes, launches, the stubbed GPU-path count) and writes multi.json / multi.md; its correctness check
refuses adapters that differ. CPU only (the benchmark's own CPU path); a few seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import multi_bench  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the benchmark; on a GPU: "
                                                                  "bash bench/run_gpu.sh bench")


def test_bench_runs_and_writes_its_tables(tmp_path, monkeypatch):
    out = tmp_path / "multi"
    monkeypatch.setenv("FUSED_LORA_BACKEND", "torch")
    threads = torch.get_num_threads()
    try:  # in this process (the imports are paid already); the stubbed count needs its own process
        rc = multi_bench.main(["--preset", "tiny", "--ns", "1", "3", "--tokens", "5", "--blocks", "1", "--rounds",
                               "1", "--min-time", "0.05", "--no-rss", "--host-iters", "2", "--threads", "1", "--out",
                               str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads((out / "multi.json").read_text())
    assert [c["n"] for c in data["cases"]] == [1, 3]
    assert data["command"].startswith("python bench/multi_bench.py --preset tiny")
    assert data["environment"]["torch_threads"] == 1
    hidden, ffn = multi_bench.PRESETS["tiny"]
    for c in data["cases"]:
        n = c["n"]
        assert c["check"]["ok"] and c["check"]["adapter_rel_err"] <= 1e-5, c["check"]
        assert c["ratio"] == pytest.approx(c["time"]["concurrent"]["ms"] / c["time"]["sequential"]["ms"])
        tb = c["tensor_bytes"]
        w = (2 * hidden * ffn + hidden + ffn) * 4  # fc1, fc2 with biases, fp32
        assert tb["concurrent"]["base"] == w and tb["sequential"]["base"] == n * w  # one base vs n copies
        assert tb["concurrent"]["adapters"] == tb["sequential"]["adapters"] > 0
        tr = c["traffic"]["W_bytes_once"]
        assert tr["sequential"] == n * tr["concurrent"] == n * 2 * 2 * hidden * ffn * 4  # 2 GEMMs × 2 layers
        launches = c["launches_per_layer"]
        assert launches["concurrent"] > 0 and launches["sequential"] >= n
    stub = data["gpu_path_stubbed"]
    # the GPU path: five Triton launches per layer fwd+bwd concurrent, five per run sequential
    assert stub["1"]["concurrent"]["triton_launches"] == 5 and stub["3"]["concurrent"]["triton_launches"] == 5
    assert stub["3"]["sequential"]["triton_launches"] == 15
    md = (out / "multi.md").read_text()
    assert "Command: `python bench/multi_bench.py" in md and "| 3 |" in md and "Triton launches c / s" in md


def test_check_refuses_different_adapters(monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "torch")
    args = multi_bench.parse_args(["--preset", "tiny", "--tokens", "3", "--blocks", "1", "--quick"])
    conc, seq = multi_bench.make_ways(args, 2, torch.device("cpu"), torch.float32)
    assert multi_bench.check_equal(conc, seq, "float32")["ok"]
    conc, seq = multi_bench.make_ways(args, 2, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        seq.runs[1][0][0].fc2.lora_B.mul_(1.001)  # the second run's adapter, slightly off
    res = multi_bench.check_equal(conc, seq, "float32")
    assert not res["ok"] and res["adapter_rel_err"] > 1e-4
