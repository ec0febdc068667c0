"""Collect issue 12's quality numbers into benchmarks/results/quality.json from the measured result files.

    python benchmarks/quality_summary.py [--results benchmarks/results]

Reads (each written by the benchmark named beside it):
    eps_ablation.json      benchmarks/quality_sweep.py + lean_reference.py   eps-prediction at the demo budget
    objectives.json        benchmarks/quality_sweep.py                       eps / v / flow at equal compute
    time_to_quality.json   benchmarks/time_to_quality.py                     ours vs transfusion-pytorch
    small_eval.json        `transfusion eval --ckpt RUN --suite full` of a configs/small.toml run (issue 12 §2)
A number that has not been measured yet is null, with the reason under `missing`: nothing here is typed in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.exists() else None


def _raw(variants: list[dict], name: str) -> dict | None:
    return next((v["raw"] for v in variants if v["name"] == name), None)


def summarise(results: Path) -> dict:
    out: dict = {"missing": {}}
    eps = _load(results / "eps_ablation.json")
    if eps:
        paper = _raw(eps["variants"], "eps_ema")  # raw weights of the paper-weighting eps run
        best = max((v for v in eps["variants"] if v["raw"]), key=lambda v: v["raw"]["both"])
        out["eps_demo_both"] = paper["both"] if paper else None
        out["eps_demo_best"] = {"name": best["name"], "overrides": best["overrides"], "both": best["raw"]["both"]}
        lean = eps.get("lean_reference", {}).get("runs", [])
        out["eps_lean_reference_both"] = {r["name"]: r["score"]["both"] for r in lean}
    obj = _load(results / "objectives.json")
    if obj:
        out["objectives_both"] = {v["name"]: v["raw"]["both"] for v in obj}
    else:
        out["missing"]["objectives_both"] = "benchmarks/results/objectives.json not written yet"
    ttq = _load(results / "time_to_quality.json")
    if ttq:
        out["time_to_quality_s"] = ttq["time_to_quality_s"]
        out["time_to_quality_speedup_vs_peer"] = ttq["time_to_quality_speedup_vs_peer"]
        out["peer_reached_target"] = ttq["peer_reached"]
        out["peer_best_both"] = ttq["peer_best_both"]
        out["peer_budget_s"] = ttq["peer_budget_s"]
        last = max(ttq["ours"], key=lambda q: q["step"])  # the demo config at its full 720 steps
        out["demo_both"], out["demo_both_n"] = last["both"], ttq["n_prompts"]
    else:
        out["missing"]["time_to_quality_s"] = "benchmarks/results/time_to_quality.json not written yet"
    small = _load(results / "small_eval.json")
    keys = ("small_both", "small_both_seen", "small_both_heldout", "small_fid", "small_captions_both",
            "small_diversity")
    if small:
        a, cap = small["alignment"], small.get("caption_accuracy") or {}
        out.update(small_both=a["both"], small_both_seen=a["both_seen"], small_both_heldout=a["both_heldout"],
                   small_fid=small.get("fid"), small_captions_both=cap.get("both"),
                   small_diversity=small.get("diversity"), small_n_samples=small.get("n_samples"),
                   small_checkpoint=small.get("checkpoint"), small_ema=small.get("ema"))
    else:
        for key in keys:
            out[key] = None
            out["missing"][key] = "benchmarks/results/small_eval.json (configs/small.toml, issue 12 §2) not written yet"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results")
    args = p.parse_args(argv)
    results = Path(args.results)
    summary = summarise(results)
    (results / "quality.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
