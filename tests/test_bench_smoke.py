"""Smoke test of the benchmark harness: our side at a tiny size, JSON keys as issue 5 requires.

The peer (transfusion-pytorch in `.venv-peer`) is not needed: its entries are null here. The peer's own smoke
run is a slow test and skips when `.venv-peer` is missing (create it with benchmarks/setup_peer.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
REQUIRED = {
    "train_tokens_per_s": {"ours_fp32", "ours_bf16", "peer"},
    "train_speedup_vs_peer": {"fp32", "bf16"},
    "mfu_fp32": None,
    "sample_speedup_vs_peer": None,
    "kv_cache_speedup_512": None,
    "kv_cache_speedup_68": None,
    "mask_overhead_300": None,
    "mask_overhead_2048": None,
    "peak_rss_mb": {"ours", "peer"},
    "matmul_peak_gflops": {"fp32", "bf16"},
    "machine": {"threads", "cpu"},
    "targets": None,
}


def _run(tmp_path: Path, *extra: str, timeout: float) -> dict:
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(RUN), "--quick", "--threads", "1", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_quick_bench_writes_required_keys(tmp_path: Path) -> None:
    res = _run(tmp_path, "--no-peer", timeout=60)
    for key, sub in REQUIRED.items():
        assert key in res, f"missing {key}"
        if sub:
            assert sub <= set(res[key]), f"{key} lacks {sub - set(res[key])}"
    assert res["train_tokens_per_s"]["ours_fp32"] > 0 and res["train_tokens_per_s"]["ours_bf16"] > 0
    assert 0 < res["mfu_fp32"] < 1.5
    assert res["peak_rss_mb"]["ours"] > 0
    assert res["kv_cache_speedup_68"] > 0 and res["mask_overhead_300"] > -1
    assert res["sample_output"]["ours"]["finite"]
    assert res["train_speedup_vs_peer"]["fp32"] is None  # no peer in this run
    assert not [r for r in res["runs"] if not r["ok"]]


@pytest.mark.slow
def test_quick_bench_with_peer(tmp_path: Path) -> None:
    if not PEER_PYTHON.exists():
        pytest.skip("peer venv missing: run benchmarks/setup_peer.sh")
    res = _run(tmp_path, "--peer", timeout=300)
    assert res["train_tokens_per_s"]["peer"] > 0
    assert res["train_speedup_vs_peer"]["fp32"] > 0
    assert res["sample_network_calls"]["peer"] > 0


def test_onednn_ab_quick(tmp_path):
    """benchmarks/onednn_ab.py (the fast path against plain PyTorch) runs and reports every comparison."""
    from transfusion.backends.cpu import onednn

    if not onednn.available():
        pytest.skip("this torch build has no oneDNN linear")
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "onednn_ab.py"), "--quick", "--threads", "1",
                           "--rounds", "2", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["matmul"]) == {"rows_1", "rows_32", "rows_392"}
    assert all(v["speedup"] > 0 for v in res["matmul"].values())
    assert set(res["sample"]["seconds"]) == {"off", "packed_linears", "fused_blocks"}
    assert set(res["train"]["seconds"]) == {"off", "on"} and res["train"]["speedup"] > 0
