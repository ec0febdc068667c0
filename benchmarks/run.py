"""Side-by-side benchmarks: ours vs transfusion-pytorch 0.20.0 (the peer) vs this machine's matmul peak.

    make bench                                   # = python benchmarks/run.py --out benchmarks/results/latest.json
    python benchmarks/run.py --quick --no-peer   # smoke run of our side at a tiny size (seconds)

Every measurement runs in a fresh subprocess (ours in this venv, the peer in `.venv-peer`) so each peak RSS is
its own; ours and the peer alternate in rounds (A B A B, the order flipped every other round) and we report
medians and per-round ratios. The matmul peak for fp32 and bf16 is measured in this process, at the same thread
count, at the start and the end of the run (best of both). Load average is recorded: numbers taken while other
work shares the cores are not comparable (`--wait-quiet` waits for an idle machine first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from common import matmul_peak_gflops, median, parse_last_json, quiet_env, workload, workload_dict  # noqa: E402

PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
TARGETS = {  # issue 5: (key in the summary, comparison, threshold)
    "train_speedup_fp32": (">=", 3.0),
    "train_speedup_bf16": (">=", 5.0),
    "mfu_fp32": (">=", 0.60),
    "sample_speedup_vs_peer": (">=", 4.0),
    "kv_cache_speedup_512": (">=", 3.0),
    "mask_overhead_300": ("<=", 0.10),
    "peak_rss_ratio": ("<=", 0.5),
}


class Runner:
    """Runs one benchmark subprocess and returns its JSON (or an error record), logging progress to stderr."""

    def __init__(self, threads: int, quick: bool, timeout: float, log: list[dict[str, Any]]):
        self.threads, self.quick, self.timeout, self.log = threads, quick, timeout, log

    def __call__(self, python: Path | str, script: str, *args: str) -> dict[str, Any]:
        cmd = [str(python), str(HERE / script), *args, "--threads", str(self.threads)]
        if self.quick:
            cmd.append("--quick")
        env = quiet_env()
        env["OMP_NUM_THREADS"] = str(self.threads)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH", "")]))
        label = f"{script} {' '.join(args)}"
        print(f"[bench] {label} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout, env=env, cwd=ROOT)
            out = parse_last_json(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-3000:]}
        except (subprocess.TimeoutExpired, ValueError) as e:
            out = {"error": str(e)[-3000:]}
        wall = time.perf_counter() - t0
        self.log.append(dict(cmd=label, wall_s=round(wall, 2), load=os.getloadavg()[0], ok="error" not in out))
        print(f"[bench] {label}: {wall:.1f}s{' ERROR' if 'error' in out else ''}", file=sys.stderr, flush=True)
        if "error" in out:
            print(out["error"][-1500:], file=sys.stderr)
        return out


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
        isa = sorted({f for f in flags.split() if f.startswith(("avx512", "amx", "avx2", "fma"))})
    except (OSError, StopIteration):
        isa = []
    return dict(cpu=cpu, logical_cpus=os.cpu_count(), threads=threads, isa=isa, torch=torch.__version__,
                python=platform.python_version(), load_avg_start=os.getloadavg())


def wait_quiet(max_wait: float, threshold: float) -> float:
    """Wait up to max_wait seconds for the 1-minute load average to drop below threshold; return it."""
    deadline = time.time() + max_wait
    while os.getloadavg()[0] > threshold and time.time() < deadline:
        print(f"[bench] waiting for a quiet machine (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
        time.sleep(15)
    return os.getloadavg()[0]


def matmul_peaks(threads: int, quick: bool) -> dict[str, float]:
    torch.set_num_threads(threads)
    n, secs = (256, 0.2) if quick else (2048, 2.0)
    return {"fp32": matmul_peak_gflops(torch.float32, n, secs), "bf16": matmul_peak_gflops(torch.bfloat16, n, secs)}


def train_rounds(run: Runner, rounds: int, steps: int, with_peer: bool,
                 warmup: int = 3) -> dict[str, list[dict[str, Any]]]:
    """ours fp32, ours bf16 and the peer in alternating order; each a fresh process. `warmup` untimed steps first
    on both sides: a fresh process's first 2-3 steps run ~25% slower (allocator and page warm-up)."""
    out: dict[str, list[dict[str, Any]]] = {"ours_fp32": [], "ours_bf16": [], "peer": []}
    s = ["--steps", str(steps), "--warmup", str(warmup)]
    for r in range(rounds):
        order = ["ours_fp32", "peer", "ours_bf16"] if r % 2 == 0 else ["ours_bf16", "peer", "ours_fp32"]
        for name in order:
            if name == "peer":
                if with_peer:
                    out[name].append(run(PEER_PYTHON, "peer.py", "train", *s))
            else:
                out[name].append(run(sys.executable, "ours.py", "train", "--dtype", name.split("_")[1], *s))
    return out


def sample_rounds(run: Runner, rounds: int, evals: int, with_peer: bool) -> dict[str, list[dict[str, Any]]]:
    """Ours and the peer in fp32 (the target) and both with bf16 autocast, alternating; each a fresh process."""
    out: dict[str, list[dict[str, Any]]] = {"ours": [], "peer": [], "ours_bf16": [], "peer_bf16": []}
    names = ["ours", "peer", "ours_bf16", "peer_bf16"]
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            dtype = "bf16" if name.endswith("bf16") else "fp32"
            if name.startswith("peer"):
                if with_peer:
                    out[name].append(run(PEER_PYTHON, "peer.py", "sample", "--iters", "2", "--dtype", dtype))
            else:
                out[name].append(run(sys.executable, "ours.py", "sample", "--steps-list", str(evals),
                                     "--iters", "3", "--dtype", dtype))
    return out


def _vals(records: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in records if key in r]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize_train(tr: dict[str, list[dict[str, Any]]], flops: dict[str, Any], peaks: dict[str, float]):
    tps = {k: (median(_vals(v, "tokens_per_s")) if _vals(v, "tokens_per_s") else None) for k, v in tr.items()}
    per_round = {
        dt: [o["tokens_per_s"] / p["tokens_per_s"] for o, p in zip(tr[f"ours_{dt}"], tr["peer"])
             if "tokens_per_s" in o and "tokens_per_s" in p]
        for dt in ("fp32", "bf16")
    }
    step_fp32 = median(_vals(tr["ours_fp32"], "step_s_median")) if tr["ours_fp32"] else None
    step_bf16 = median(_vals(tr["ours_bf16"], "step_s_median")) if tr["ours_bf16"] else None
    f = flops.get("flops_per_step")
    mfu = {"fp32": _ratio(_ratio(f, step_fp32), peaks["fp32"] * 1e9),
           "bf16": _ratio(_ratio(f, step_bf16), peaks["bf16"] * 1e9)}
    rss = {"ours": max(_vals(tr["ours_fp32"], "peak_rss_mb"), default=None),
           "ours_bf16": max(_vals(tr["ours_bf16"], "peak_rss_mb"), default=None),
           "peer": max(_vals(tr["peer"], "peak_rss_mb"), default=None)}
    return dict(
        train_tokens_per_s=tps,
        train_speedup_vs_peer={"fp32": _ratio(tps["ours_fp32"], tps["peer"]),
                               "bf16": _ratio(tps["ours_bf16"], tps["peer"])},
        train_speedup_per_round=per_round,
        mfu_fp32=mfu["fp32"], mfu_bf16=mfu["bf16"],
        flops_per_step=f,
        peak_rss_mb=rss,
    )


def summarize_sample(sr: dict[str, list[dict[str, Any]]], evals: int) -> dict[str, Any]:
    key = f"steps_{evals}"
    ours = [r[key]["sample_s_median"] for r in sr["ours"] if key in r]
    ours_bf16 = [r[key]["sample_s_median"] for r in sr.get("ours_bf16", []) if key in r]
    peer = _vals(sr["peer"], "sample_s_median")
    peer_bf16 = _vals(sr.get("peer_bf16", []), "sample_s_median")
    med = {k: median(v) if v else None for k, v in
           dict(ours=ours, peer=peer, ours_bf16=ours_bf16, peer_bf16=peer_bf16).items()}
    return dict(
        sample_s=med,
        sample_speedup_vs_peer=_ratio(med["peer"], med["ours"]),
        sample_speedup_vs_peer_bf16=_ratio(med["peer"], med["ours_bf16"]),  # ours bf16 vs the peer in fp32
        sample_speedup_bf16_vs_peer_bf16=_ratio(med["peer_bf16"], med["ours_bf16"]),  # both in bf16 autocast
        sample_speedup_per_round=[p / o for o, p in zip(ours, peer)],
        sample_speedup_bf16_per_round=[p / o for o, p in zip(ours_bf16, peer_bf16)],
        sample_network_calls={"ours": next((r[key]["model_calls"] for r in sr["ours"] if key in r), None),
                              "ours_rows_per_call": 2,
                              "peer": next((r["transformer_calls_per_sample"] for r in sr["peer"]
                                            if "transformer_calls_per_sample" in r), None)},
        sample_output={"ours": next((r[key]["output"] for r in sr["ours"] if key in r), None),
                       "peer": next((r["output"] for r in sr["peer"] if "output" in r), None)},
    )


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    rss = summary.get("peak_rss_mb", {})
    values = {
        "train_speedup_fp32": summary["train_speedup_vs_peer"]["fp32"],
        "train_speedup_bf16": summary["train_speedup_vs_peer"]["bf16"],
        "mfu_fp32": summary["mfu_fp32"],
        "sample_speedup_vs_peer": summary["sample_speedup_vs_peer"],
        "kv_cache_speedup_512": summary.get("kv_cache_speedup_512"),
        "mask_overhead_300": summary.get("mask_overhead_300"),
        "peak_rss_ratio": _ratio(rss.get("ours"), rss.get("peer")),
    }
    out = {}
    for k, (op, thr) in TARGETS.items():
        v = values[k]
        met = None if v is None else (v >= thr if op == ">=" else v <= thr)
        out[k] = dict(value=v, target=f"{op} {thr}", met=met)
    return out


def print_table(summary: dict[str, Any]) -> None:
    print("\n  target                       value      goal     met", file=sys.stderr)
    for k, t in summary["targets"].items():
        v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        print(f"  {k:<26} {v:>9}   {t['target']:<8} {t['met']}", file=sys.stderr)


def run_full(run: Runner, args: argparse.Namespace, with_peer: bool) -> dict[str, Any]:
    """Every bench at C1 size; returns the raw per-process records."""
    w = workload(False)
    raw: dict[str, Any] = {"train": train_rounds(run, args.rounds, args.steps, with_peer)}
    raw["flops_ours"] = run(sys.executable, "ours.py", "flops")
    if with_peer:
        raw["flops_peer"] = run(PEER_PYTHON, "peer.py", "train", "--steps", "1", "--warmup", "0", "--flops")
    raw["sample"] = sample_rounds(run, args.sample_rounds, w.sample_evals, with_peer)
    raw["sample_250"] = run(sys.executable, "ours.py", "sample", "--steps-list", "250")
    raw["kv"] = run(sys.executable, "ours.py", "kv", "--prefixes", "68,512", "--iters", "10", "--warmup", "2")
    raw["mask"] = run(sys.executable, "ours.py", "mask", "--lengths", "300,2048", "--iters", "6")
    return raw


def summarize_full(raw: dict[str, Any], peaks: dict[str, float]) -> dict[str, Any]:
    w = workload(False)
    summary = summarize_train(raw["train"], raw["flops_ours"], peaks)
    summary.update(summarize_sample(raw["sample"], w.sample_evals))
    summary["peer_flops_per_step"] = raw.get("flops_peer", {}).get("flops_per_step")
    summary["sample_250_steps_s"] = raw["sample_250"].get("steps_250", {}).get("sample_s_median")
    for p in (68, 512):
        summary[f"kv_cache_speedup_{p}"] = raw["kv"].get(f"prefix_{p}", {}).get("speedup")
    for L in (300, 2048):
        m = raw["mask"].get(f"L_{L}", {})
        summary[f"mask_overhead_{L}"] = m.get("overhead_vs_causal_kernel")
        summary[f"mask_overhead_vs_dense_causal_{L}"] = m.get("overhead_vs_causal_dense")
    return summary


def run_quick(run: Runner, with_peer: bool) -> dict[str, Any]:
    """Smoke run: every bench of ours at a tiny size in one process, the peer only if asked and present."""
    everything = run(sys.executable, "ours.py", "all", "--steps", "1", "--warmup", "0")
    ours = everything.get("results", {})
    if "train_fp32" in ours:  # one process ran every bench: its peak RSS stands in for the training one
        ours["train_fp32"]["peak_rss_mb"] = everything.get("peak_rss_mb")
    train = {"ours_fp32": [ours.get("train_fp32", {})], "ours_bf16": [ours.get("train_bf16", {})], "peer": []}
    sample = {"ours": [ours.get("sample", {})], "peer": []}
    if with_peer:
        train["peer"].append(run(PEER_PYTHON, "peer.py", "train", "--steps", "1", "--warmup", "0"))
        sample["peer"].append(run(PEER_PYTHON, "peer.py", "sample"))
    return {"ours": ours, "train": train, "sample": sample}


def summarize_quick(raw: dict[str, Any], peaks: dict[str, float]) -> dict[str, Any]:
    w = workload(True)
    ours, train, sample = raw["ours"], raw["train"], raw["sample"]
    summary = summarize_train(train, ours.get("flops", {}), peaks)
    summary.update(summarize_sample(sample, w.sample_evals))
    kv, mask = ours.get("kv", {}), ours.get("mask", {})
    summary["kv_cache_speedup_512"] = kv.get("prefix_24", {}).get("speedup")  # the quick sizes stand in
    summary["kv_cache_speedup_68"] = kv.get(f"prefix_{w.prefix_tokens}", {}).get("speedup")
    summary["mask_overhead_300"] = mask.get("L_40", {}).get("overhead_vs_causal_kernel")
    summary["mask_overhead_2048"] = mask.get("L_200", {}).get("overhead_vs_causal_kernel")
    return summary


def _fmt(v: Any, spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if v is None else format(v, spec) + unit


def markdown_table(res: dict[str, Any]) -> str:
    """The docs/benchmarks.md table from a results JSON (`run.py --table FILE`)."""
    t, tps, rss, m = res["targets"], res["train_tokens_per_s"], res["peak_rss_mb"], res["machine"]
    pk = res["matmul_peak_gflops"]
    rounds = res.get("train_speedup_per_round", {})
    rows = [
        ("Training tokens/s, fp32 (ours / peer)", f"{_fmt(tps['ours_fp32'], '.0f')} / {_fmt(tps['peer'], '.0f')}",
         _fmt(t["train_speedup_fp32"]["value"], unit="x"), ">= 3x", t["train_speedup_fp32"]["met"],
         ", ".join(_fmt(x) for x in rounds.get("fp32", []))),
        ("Training tokens/s, ours bf16 autocast", _fmt(tps["ours_bf16"], ".0f"),
         _fmt(t["train_speedup_bf16"]["value"], unit="x"), ">= 5x", t["train_speedup_bf16"]["met"],
         ", ".join(_fmt(x) for x in rounds.get("bf16", []))),
        ("MFU fp32 (FLOPs/step / step time / fp32 matmul peak)", _fmt(res["flops_per_step"] / 1e9 if res.get("flops_per_step") else None, ".1f", " GFLOP/step"),
         _fmt(res["mfu_fp32"], ".1%"), ">= 60%", t["mfu_fp32"]["met"], f"bf16 MFU {_fmt(res.get('mfu_bf16'), '.1%')}"),
        ("Sampling, caption -> image, s (ours / peer)",
         f"{_fmt(res['sample_s']['ours'])} / {_fmt(res['sample_s']['peer'])}",
         _fmt(t["sample_speedup_vs_peer"]["value"], unit="x"), ">= 4x", t["sample_speedup_vs_peer"]["met"],
         ", ".join(_fmt(x) for x in res.get("sample_speedup_per_round", []))
         + f"; ours bf16 {_fmt(res['sample_s'].get('ours_bf16'))} s = "
         f"{_fmt(res.get('sample_speedup_vs_peer_bf16'), unit='x')} the peer's fp32; both in bf16: "
         f"{_fmt(res['sample_s'].get('ours_bf16'))} / {_fmt(res['sample_s'].get('peer_bf16'))} s = "
         f"{_fmt(res.get('sample_speedup_bf16_vs_peer_bf16'), unit='x')}"),
        ("KV cache, diffusion step cached vs recomputed, 512 prefix", "", _fmt(res.get("kv_cache_speedup_512"), unit="x"),
         ">= 3x", t["kv_cache_speedup_512"]["met"], f"68 prefix: {_fmt(res.get('kv_cache_speedup_68'), unit='x')}"),
        ("Mask overhead, Transfusion vs causal kernel, L = 300", "", _fmt(res.get("mask_overhead_300"), "+.1%"),
         "<= 10%", t["mask_overhead_300"]["met"], f"L = 2048: {_fmt(res.get('mask_overhead_2048'), '+.1%')}"),
        ("Peak RSS of the training step, MB (ours / peer)", f"{_fmt(rss['ours'], '.0f')} / {_fmt(rss['peer'], '.0f')}",
         _fmt(t["peak_rss_ratio"]["value"]), "<= 0.5", t["peak_rss_ratio"]["met"], ""),
    ]
    out = ["| measure | value | result | target | met | per round / notes |", "|---|---|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} | {'yes' if e else ('no' if e is False else 'n/a')} | {f} |"
            for a, b, c, d, e, f in rows]
    out.append("")
    out.append(f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['threads']} threads, torch {m['torch']}; "
               f"matmul peak fp32 {pk['fp32']:.0f} GFLOP/s, bf16 {pk['bf16']:.0f} GFLOP/s; load average "
               f"{m['load_avg_start'][0]:.2f} at start, {m['load_avg_end'][0]:.2f} at end; wall {m['wall_s']:.0f} s.")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json")
    p.add_argument("--quick", action="store_true", help="tiny sizes, ours only unless --peer (smoke test)")
    p.add_argument("--no-peer", action="store_true", help="skip the peer even if .venv-peer exists")
    p.add_argument("--peer", action="store_true", help="with --quick: also run the peer")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count())
    p.add_argument("--rounds", type=int, default=4, help="training rounds (ours fp32, peer, ours bf16)")
    p.add_argument("--sample-rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="timed training steps per process (after 3 warm-up)")
    p.add_argument("--timeout", type=float, default=600.0, help="per subprocess, seconds")
    p.add_argument("--table", type=Path, default=None, help="print the markdown table of a results JSON and exit")
    p.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to N s for load < 0.5 before starting")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    with_peer = not args.no_peer and (args.peer or not args.quick)
    if with_peer and not PEER_PYTHON.exists():
        print(f"[bench] {PEER_PYTHON} missing (run benchmarks/setup_peer.sh): peer skipped", file=sys.stderr)
        with_peer = False
    if args.wait_quiet:
        wait_quiet(args.wait_quiet, 0.5)
    t0 = time.perf_counter()
    log: list[dict[str, Any]] = []
    run = Runner(args.threads, args.quick, args.timeout, log)
    info = machine_info(args.threads)
    peaks = matmul_peaks(args.threads, args.quick)
    raw = run_quick(run, with_peer) if args.quick else run_full(run, args, with_peer)
    end = matmul_peaks(args.threads, args.quick)
    peaks = {k: max(peaks[k], end[k]) for k in peaks}  # MFU against the best peak seen in this run
    res_sum = summarize_quick(raw, peaks) if args.quick else summarize_full(raw, peaks)
    info.update(load_avg_end=os.getloadavg(), wall_s=round(time.perf_counter() - t0, 1))
    summary = dict(machine=info, workload=workload_dict(workload(args.quick)), quick=args.quick,
                   peer_included=with_peer, matmul_peak_gflops=peaks, **res_sum)
    summary["targets"] = targets(summary)
    summary["runs"] = log
    summary["raw"] = raw
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    tmp.replace(args.out)
    print_table(summary)
    print(f"[bench] wrote {args.out} in {info['wall_s']}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
