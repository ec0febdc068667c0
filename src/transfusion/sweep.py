"""`transfusion sweep SPEC.toml --out DIR`: a grid of config overrides x seeds, each cell trained by the ordinary
trainer and scored by the ordinary eval suite, summarised as a table and metric-vs-FLOPs plots (docs/sweeps.md).

    [sweep]
    base = "../tiny.toml"          # the config every run starts from (relative to the spec file)
    set = ["train.steps=300"]      # overrides for every run
    seeds = [0, 1]
    eval = "fast"                  # `transfusion eval --suite` after training; "" -> no eval
    eval_args = ["--n", "32"]      # more `transfusion eval` arguments
    metrics = ["fid", "lm_loss"]   # columns: keys of the eval report (dotted for nested) or of metrics.jsonl
    series = "family"              # plots: one line per value of this axis (default: the first axis)
    launcher = []                  # e.g. ["torchrun", "--nproc_per_node=2"]; default: this Python
    [axes.family]                  # one table per axis: value label -> overrides; the grid is their product
    transfusion = []
    chameleon = ["model.family=chameleon", ...]

Each run lives in DIR/runs/<cell>__seed<S>/ and goes through `transfusion train ... --resume` and
`transfusion eval` as subprocesses, one after another (on a GPU when the trainer finds one). Resuming a killed
sweep: a run with result.json is done and skipped; any other run is started again with --resume, which
continues from its latest checkpoint exactly (the trainer's contract); an eval is redone only if its report is
missing. Outputs: DIR/sweep.json (every run, every cell's mean and spread over seeds), DIR/sweep.md, and
DIR/plots/<metric>_vs_flops.png (log-log, Figure 5 style). Parity-FLOP ratios: `parity_flop_ratio`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfusion.config import ConfigError
from transfusion.log import log

RESULT = "result.json"
EVAL = "eval.json"
FLOPS_KEYS = ("flops", "flops_6nd")


@dataclass
class Run:
    cell: str  # "family=chameleon,size=s"
    labels: dict[str, str]  # axis -> value label
    seed: int
    overrides: list[str]

    @property
    def name(self) -> str:
        return f"{re.sub(r'[^A-Za-z0-9=,._-]', '_', self.cell) or 'base'}__seed{self.seed}"


@dataclass
class Spec:
    base: Path
    axes: dict[str, dict[str, list[str]]]
    seeds: list[int] = field(default_factory=lambda: [0])
    set: list[str] = field(default_factory=list)
    eval: str = ""
    eval_args: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: ["lm_loss", "diffusion_loss"])
    series: str = ""
    launcher: list[str] = field(default_factory=list)
    # parity-FLOP ratios between two values of the series axis: {ours = "transfusion", baseline = "chameleon",
    # flops = "flops_6nd"} (6ND: the paper's theoretical count, fn. 15; "flops": this project's StepFlops)
    parity: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)  # `sweep --set`: after every cell's overrides, so they win
    only: dict[str, list[str]] = field(default_factory=dict)  # `sweep --only`: axis -> the value labels to run

    def restrict(self, selections: list[str]) -> None:
        """`--only AXIS=LABEL[,LABEL...]` (repeatable): run that part of the grid. Its runs keep their names, so
        the full sweep later resumes from them; the summary covers the runs of this invocation."""
        for sel in selections:
            axis, _, labels = sel.partition("=")
            wanted = [x for x in labels.split(",") if x]
            if axis == "seed":  # e.g. seed=1: the second seed of every cell, beside a process running seed 0
                if not wanted or any(x not in {str(s) for s in self.seeds} for x in wanted):
                    raise ConfigError(f"--only {sel!r}: the spec's seeds are {self.seeds}")
                self.seeds = [s for s in self.seeds if str(s) in wanted]
                continue
            if axis not in self.axes or not wanted:
                raise ConfigError(f"--only {sel!r}: expected AXIS=LABEL[,LABEL...] with AXIS one of "
                                  f"{list(self.axes) + ['seed']}")
            unknown = [x for x in wanted if x not in self.axes[axis]]
            if unknown:
                raise ConfigError(f"--only {sel!r}: axis {axis!r} has no value {unknown[0]!r} "
                                  f"(values: {list(self.axes[axis])})")
            self.only[axis] = wanted

    def runs(self) -> list[Run]:
        names = list(self.axes)
        out = []
        for combo in itertools.product(*(list(self.axes[a].items()) for a in names)):
            if any(label not in self.only.get(a, [label]) for a, (label, _) in zip(names, combo)):
                continue
            labels = {a: label for a, (label, _) in zip(names, combo)}
            cell = ",".join(f"{a}={label}" for a, label in labels.items())
            sets = [*self.set, *(s for _, sets in combo for s in sets), *self.extra]
            out += [Run(cell, labels, seed, sets + [f"train.seed={seed}"]) for seed in self.seeds]
        return out


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"sweep spec {path}: {e}") from None
    sweep, axes = dict(raw.get("sweep", {})), raw.get("axes", {})
    unknown = set(raw) - {"sweep", "axes"}
    if unknown or "base" not in sweep:
        raise ConfigError(f"sweep spec {path}: needs [sweep] base = ...; unknown tables {sorted(unknown)}")
    for axis, values in axes.items():
        if not isinstance(values, dict) or not values or not all(isinstance(v, list) for v in values.values()):
            raise ConfigError(f"sweep spec {path}: [axes.{axis}] maps each value label to a list of overrides")
    sweep["base"] = (path.parent / sweep["base"]).resolve()
    try:
        spec = Spec(axes=axes, **sweep)
    except TypeError as e:
        raise ConfigError(f"sweep spec {path}: {e}") from None
    if spec.series and spec.series not in axes:
        raise ConfigError(f"sweep spec {path}: series = {spec.series!r} is not an axis ({list(axes)})")
    return spec


# ------------------------------------------------------------------------------------------ running


def _cli(spec: Spec) -> list[str]:
    return [*(spec.launcher or [sys.executable]), "-m", "transfusion.cli"]


def _call(cmd: list[str], log_path: Path) -> None:
    log.info("$ " + " ".join(cmd))
    with open(log_path, "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if rc != 0:
        raise RuntimeError(f"exit status {rc}; see {log_path}")


def run_one(spec: Spec, run: Run, out: Path) -> dict[str, Any]:
    """Train (resuming), evaluate, collect: the run's result dict, also written to its result.json."""
    rdir = out / "runs" / run.name
    done = rdir / RESULT
    if done.is_file():
        return json.loads(done.read_text())
    rdir.mkdir(parents=True, exist_ok=True)
    if (rdir / "train" / "checkpoints").is_dir():
        log.info(f"{run.name}: resuming from its latest checkpoint")
    sets = [x for s in run.overrides for x in ("--set", s)]
    _call([*_cli(spec), "train", str(spec.base), "--out", str(rdir / "train"), "--resume", "--no-progress", *sets],
          rdir / "train.log")
    identity = {"cell": run.cell, "labels": run.labels, "seed": run.seed, "overrides": run.overrides}
    result: dict[str, Any] = dict(identity)
    result.update(_train_metrics(rdir / "train"))
    if spec.eval:
        report = rdir / EVAL
        try:
            if not report.is_file():
                _call([*_cli(spec), "eval", "--ckpt", str(rdir / "train"), "--suite", spec.eval, "--out",
                       str(report), *spec.eval_args], rdir / "eval.log")
            report_scalars = _flatten(json.loads(report.read_text()))
            report_scalars["eval_seed"] = report_scalars.pop("seed", None)  # the sampling seed, not the run's
            result.update(report_scalars)
        except RuntimeError as e:  # e.g. a family the suite cannot score yet: the run's losses still count
            result["eval_error"] = str(e)
            log.info(f"{run.name}: eval failed ({e})")
    result.update(identity)  # a metric row must not overwrite which run this is
    done.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def _train_metrics(train_dir: Path) -> dict[str, Any]:
    """The last row of metrics.jsonl (losses, flops, tokens_seen) plus 6ND FLOPs (paper fn. 15)."""
    from transfusion import config as config_mod
    from transfusion.model.build import build_model

    rows = [json.loads(x) for x in (train_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = {k: v for k, v in rows[-1].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    mc = config_mod.load(train_dir / "config.toml").model
    n = sum(p.numel() for k, p in build_model(mc, "meta").named_parameters()
            if k not in ("tok_emb.weight", "lm_head.weight"))
    last["params_non_embedding"] = n
    last["flops_6nd"] = 6.0 * n * last.get("tokens_seen", 0)
    return last


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def run_sweep(spec_path: str | Path, out: str | Path, extra_sets: list[str] | None = None,
              only: list[str] | None = None) -> dict[str, Any]:
    """Every run of the spec (or of the part `only` selects), then the summary. `extra_sets` are appended to every
    run's overrides (they win): for how this machine runs (runtime.threads when two sweeps share the cores), not
    for what a cell means."""
    spec, out = load_spec(spec_path), Path(out)
    spec.extra = list(extra_sets or [])
    spec.restrict(list(only or []))
    out.mkdir(parents=True, exist_ok=True)
    runs = spec.runs()
    results = []
    for i, run in enumerate(runs):
        log.info(f"[{i + 1}/{len(runs)}] {run.name}")
        results.append(run_one(spec, run, out))
    summary = summarise(spec, results)
    write_outputs(summary, out)
    return summary


# ------------------------------------------------------------------------------------------ summaries


def _stats(values: list[float]) -> dict[str, float | int | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals)}


def summarise(spec: Spec, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per cell: mean, sample std and count over seeds of every metric and of the FLOPs."""
    cells: dict[str, dict[str, Any]] = {}
    for r in results:
        cells.setdefault(r["cell"], {"cell": r["cell"], "labels": r["labels"], "runs": []})["runs"].append(r)
    for c in cells.values():
        c["stats"] = {m: _stats([r.get(m) for r in c["runs"]]) for m in [*spec.metrics, *FLOPS_KEYS]}
        del c["runs"]
    series = spec.series or next(iter(spec.axes), "")
    summary = {"metrics": spec.metrics, "series": series, "cells": list(cells.values()), "runs": results}
    if spec.parity:
        summary["parity"] = {m: _parity(summary, m, spec.parity) for m in spec.metrics}
    return summary


def _parity(summary: dict[str, Any], metric: str, p: dict[str, str]) -> dict[str, Any]:
    fk = p.get("flops", "flops_6nd")

    def points(label: str) -> list[tuple[float, float]]:
        return [(c["stats"][fk]["mean"], c["stats"][metric]["mean"]) for c in summary["cells"]
                if c["labels"].get(summary["series"]) == label and c["stats"][metric]["mean"] is not None]

    # rule = "none": no outlier rule (at CPU scale the paper's fn. 16 thresholds drop every point)
    thresholds = {} if p.get("rule") == "none" else None
    return {**parity_flop_ratio(points(p["ours"]), points(p["baseline"]), metric, thresholds), "flops": fk}


def markdown_table(summary: dict[str, Any]) -> str:
    metrics = summary["metrics"]
    head = ["cell", "seeds", "FLOPs", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in summary["cells"]:
        st = c["stats"]
        cols = [c["cell"], str(st["flops"]["n"]), _fmt(st["flops"], sci=True)] + [_fmt(st[m]) for m in metrics]
        lines.append("| " + " | ".join(cols) + " |")
    text = "\n".join(lines) + "\n\nmean ± sample standard deviation over seeds; FLOPs = model/flops.StepFlops, summed\n"
    if summary.get("parity"):
        text += "\n| metric | parity-FLOP ratio | points (ours / baseline) | outlier rule |\n|---|---|---|---|\n"
        for m, r in summary["parity"].items():
            ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.3g}" + (" (extrapolated)" if r["extrapolated"] else "")
            rule = " ".join(map(str, r["rule"])) if r["rule"] else "none"
            text += f"| {m} | {ratio} | {r['ours_points']} / {r['baseline_points']} | {rule} |\n"
    return text


def _fmt(s: dict[str, Any], sci: bool = False) -> str:
    if s["mean"] is None:
        return "n/a"
    f = (lambda v: f"{v:.3g}") if sci else (lambda v: f"{v:.4g}")
    return f(s["mean"]) + (f" ± {f(s['std'])}" if s["n"] > 1 else "")


def plot_metric_vs_flops(summary: dict[str, Any], metric: str, path: Path, flops_key: str = "flops") -> bool:
    """Log-log metric vs FLOPs, one line per value of the series axis (Figure 5 style); False if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple[float, float, float]]] = {}
    for c in summary["cells"]:
        x, y = c["stats"][flops_key], c["stats"][metric]
        if x["mean"] and y["mean"] and x["mean"] > 0 and y["mean"] > 0:
            label = c["labels"].get(summary["series"], c["cell"])
            groups.setdefault(label, []).append((x["mean"], y["mean"], y["std"] or 0.0))
    if not groups:
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, pts in groups.items():
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", label=label,
                    capsize=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"training FLOPs ({flops_key})")
    ax.set_ylabel(metric)
    ax.legend(title=summary["series"] or None)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out / "sweep.md").write_text("# Sweep\n\n" + markdown_table(summary))
    for m in summary["metrics"]:
        plot_metric_vs_flops(summary, m, out / "plots" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', m)}_vs_flops.png")


# ------------------------------------------------------------------------------------------ parity


# Paper fn. 16: data points below these thresholds are outliers (small Chameleon models) and leave the fit
PAPER_THRESHOLDS: dict[str, tuple[str, float]] = {"fid": ("<=", 100.0), "clip": (">=", 17.0), "cider": (">=", 4.0)}


def _fit_loglog(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares log y = a + b log x -> (a, b)."""
    xs, ys = [math.log(p[0]) for p in points], [math.log(p[1]) for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        raise ValueError("all points have the same FLOPs: no trend to fit")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    return my - b * mx, b


def parity_flop_ratio(ours: list[tuple[float, float]], baseline: list[tuple[float, float]], metric: str = "",
                      thresholds: dict[str, tuple[str, float]] | None = None) -> dict[str, Any]:
    """The paper's parity-FLOP ratio (§4.2, Table 3) from (FLOPs, metric) points of two families.

    Outlier rule (paper fn. 16): points failing `thresholds[metric]` (default the paper's: FID <= 100,
    CLIP >= 17, CIDEr >= 4; none for other metrics) are dropped from both families. Then log metric is fitted
    linearly in log FLOPs for `ours` (>= 2 points), and the ratio is the FLOPs at which that fit reaches the
    baseline's metric at its largest-FLOP point, over that point's FLOPs. < 1: we need less compute."""
    rule = (thresholds if thresholds is not None else PAPER_THRESHOLDS).get(metric.split(".")[-1].lower())

    def keep(p: tuple[float, float]) -> bool:
        if p[0] <= 0 or p[1] <= 0:
            return False
        return rule is None or (p[1] <= rule[1] if rule[0] == "<=" else p[1] >= rule[1])

    ours_k, base_k = [p for p in ours if keep(p)], [p for p in baseline if keep(p)]
    result: dict[str, Any] = {"metric": metric, "rule": rule, "ours_points": len(ours_k),
                              "baseline_points": len(base_k), "ratio": None}
    if len(ours_k) < 2 or not base_k:
        result["why"] = "needs >= 2 points of ours and >= 1 of the baseline that pass the outlier rule"
        return result
    a, b = _fit_loglog(ours_k)
    base_flops, base_value = max(base_k)
    if b == 0:
        result["why"] = "our fit is flat: no FLOPs reach the baseline's value"
        return result
    flops_needed = math.exp((math.log(base_value) - a) / b)
    lo, hi = min(p[0] for p in ours_k), max(p[0] for p in ours_k)
    result.update(ratio=flops_needed / base_flops, fit={"a": a, "b": b}, baseline_flops=base_flops,
                  baseline_value=base_value, flops_needed=flops_needed,
                  # outside our measured FLOPs the ratio is the fit's extrapolation, not an observation
                  extrapolated=not lo <= flops_needed <= hi)
    return result
