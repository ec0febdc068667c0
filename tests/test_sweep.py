"""`transfusion sweep`: the grid, resume after a kill, the table, the plots, the parity-FLOP ratio."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import write_micro_config
from transfusion.config import ConfigError
from transfusion.sweep import load_spec, parity_flop_ratio, plot_metric_vs_flops, summarise, write_outputs

SPEC = """
[sweep]
base = "micro.toml"
seeds = [0]
metrics = ["lm_loss", "diffusion_loss"]

[axes.lr]
low = ["train.lr=1e-3"]
high = ["train.lr=3e-3"]
"""


def _spec(tmp_path: Path, steps: int, ckpt_every: int) -> Path:
    write_micro_config(tmp_path / "micro.toml", steps=steps, ckpt_every=ckpt_every)
    (tmp_path / "spec.toml").write_text(SPEC)
    return tmp_path / "spec.toml"


def test_spec_grid_and_errors(tmp_path):
    spec = load_spec(_spec(tmp_path, 4, 2))
    runs = spec.runs()
    assert [r.name for r in runs] == ["lr=low__seed0", "lr=high__seed0"]
    assert runs[1].overrides == ["train.lr=3e-3", "train.seed=0"]
    spec.extra = ["runtime.threads=1", "train.lr=5e-3"]  # `sweep --set`: after the cell's overrides, so they win
    assert spec.runs()[1].overrides == ["train.lr=3e-3", "runtime.threads=1", "train.lr=5e-3", "train.seed=0"]
    (tmp_path / "bad.toml").write_text('[sweep]\nbase = "micro.toml"\n[axes.x]\na = "not a list"\n')
    with pytest.raises(ConfigError, match="axes.x"):
        load_spec(tmp_path / "bad.toml")


def test_only_runs_part_of_the_grid_and_names_runs_as_the_full_grid(tmp_path):
    spec = load_spec(_spec(tmp_path, 4, 2))
    spec.restrict(["lr=high"])
    assert [r.name for r in spec.runs()] == ["lr=high__seed0"]  # the full sweep resumes from this run
    spec.seeds = [0, 1]
    spec.restrict(["seed=1"])
    assert [r.name for r in spec.runs()] == ["lr=high__seed1"]
    for bad, msg in [("lr=medium", "no value 'medium'"), ("size=s", "AXIS one of"), ("lr", "AXIS=LABEL"),
                     ("seed=7", "seeds are")]:
        with pytest.raises(ConfigError, match=msg):
            load_spec(tmp_path / "spec.toml").restrict([bad])
    r = subprocess.run([sys.executable, "-m", "transfusion.cli", "sweep", str(tmp_path / "spec.toml"), "--out",
                        str(tmp_path / "out"), "--only", "lr=medium"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "runs").exists()


def test_killed_sweep_resumes_skipping_done_runs_and_continuing_the_half_finished_one(tmp_path):
    spec, out = _spec(tmp_path, steps=24, ckpt_every=3), tmp_path / "out"
    cmd = [sys.executable, "-m", "transfusion.cli", "sweep", str(spec), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    second = out / "runs" / "lr=high__seed0" / "train" / "checkpoints"
    deadline = time.time() + 120
    try:  # kill the whole sweep (and its trainer) once the second run has a checkpoint but has not finished
        while time.time() < deadline and proc.poll() is None and not (second.is_dir() and any(second.glob("step_*"))):
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first_result = out / "runs" / "lr=low__seed0" / "result.json"
    assert first_result.is_file() and not (out / "runs" / "lr=high__seed0" / "result.json").exists()
    killed_at = max(int(p.name.split("_")[1]) for p in second.glob("step_*"))
    assert 0 < killed_at < 24
    stamp = first_result.stat().st_mtime_ns
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    assert first_result.stat().st_mtime_ns == stamp  # done: skipped
    result = json.loads((out / "runs" / "lr=high__seed0" / "result.json").read_text())
    assert result["step"] == 24 and result["flops"] > 0
    steps = [json.loads(x)["step"] for x in
             (out / "runs" / "lr=high__seed0" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # resumed, not restarted: every step logged once, in order
    summary = json.loads((out / "sweep.json").read_text())
    assert [c["cell"] for c in summary["cells"]] == ["lr=low", "lr=high"]
    assert (out / "sweep.md").read_text().count("| lr=") == 2
    assert (out / "plots" / "lm_loss_vs_flops.png").stat().st_size > 1000


def test_table_and_plots_mean_and_spread_over_seeds(tmp_path):
    spec = load_spec(_spec(tmp_path, 4, 2))
    spec.parity = {"ours": "high", "baseline": "low", "flops": "flops"}
    runs = [{"cell": f"lr={c}", "labels": {"lr": c}, "seed": s, "flops": f * (1 + s), "flops_6nd": f,
             "lm_loss": v + s, "diffusion_loss": 1.0}
            for c, f, v in [("low", 1e9, 3.0), ("high", 1e10, 2.0)] for s in (0, 1)]
    summary = summarise(spec, runs)
    low = summary["cells"][0]["stats"]["lm_loss"]
    assert low == {"mean": 3.5, "std": pytest.approx(0.7071, abs=1e-4), "n": 2}
    write_outputs(summary, tmp_path / "o")
    md = (tmp_path / "o" / "sweep.md").read_text()
    assert "3.5 ± 0.7071" in md and "parity-FLOP ratio" in md
    assert plot_metric_vs_flops(summary, "lm_loss", tmp_path / "o" / "p.png")
    # FID above the paper's 100 leaves the fit under its rule; `rule = "none"` keeps every point
    fid_runs = [{**r, "fid": 200.0 - r["flops_6nd"] / 1e9 - r["seed"]} for r in runs]  # all above 100
    spec.metrics = ["fid"]
    paper_rule = summarise(spec, fid_runs)["parity"]["fid"]
    assert (paper_rule["ours_points"], paper_rule["baseline_points"], paper_rule["rule"]) == (0, 0, ("<=", 100.0))
    spec.parity["rule"] = "none"
    no_rule = summarise(spec, fid_runs)["parity"]["fid"]
    assert (no_rule["ours_points"], no_rule["baseline_points"], no_rule["rule"]) == (1, 1, None)


def test_parity_flop_ratio_on_power_laws_and_the_outlier_rule():
    # ours: fid = 1000 * F^-0.5 ; baseline's largest point F = 1e6 reaches fid 4 -> we need (1000/4)^2 = 62500
    ours = [(f, 1000 * f ** -0.5) for f in (1e2, 1e3, 1e4)]
    base = [(1e4, 150.0), (1e5, 10.0), (1e6, 4.0)]
    r = parity_flop_ratio(ours, base, "fid")
    assert r["ratio"] == pytest.approx(62500 / 1e6, rel=1e-6)
    assert r["rule"] == ("<=", 100.0) and r["ours_points"] == 3 and r["baseline_points"] == 2  # FID 150 is out
    assert r["extrapolated"]  # 62,500 FLOPs lie beyond our largest point (1e4)
    inside = parity_flop_ratio(ours, [(1e6, 1000 * 3e3 ** -0.5)], "fid")
    assert inside["flops_needed"] == pytest.approx(3e3) and not inside["extrapolated"]
    none = parity_flop_ratio(ours, base, "fid", thresholds={"fid": ("<=", 1.0)})
    assert none["ratio"] is None and "outlier" in none["why"]


def test_eval_report_keys_do_not_overwrite_which_run_it_is(tmp_path, monkeypatch):
    """The eval report has its own `seed` (the sampling seed): the result must keep the run's seed and cell."""
    import transfusion.sweep as sweep_mod

    spec = load_spec(_spec(tmp_path, 4, 2))
    spec.eval = "fast"
    run = spec.runs()[1]
    run.seed = 7
    rdir = tmp_path / "out" / "runs" / run.name
    (rdir / "train").mkdir(parents=True)
    (rdir / "train" / "metrics.jsonl").write_text(json.dumps({"step": 4, "lm_loss": 2.5, "flops": 1e9}) + "\n")
    (rdir / "train" / "config.toml").write_text((tmp_path / "micro.toml").read_text())
    (rdir / "eval.json").write_text(json.dumps({"seed": 0, "cell": "x", "fid": 12.5, "alignment": {"both": 0.5}}))
    monkeypatch.setattr(sweep_mod, "_call", lambda cmd, log_path: None)  # train "resumes" a finished run
    result = sweep_mod.run_one(spec, run, tmp_path / "out")
    assert (result["seed"], result["cell"], result["eval_seed"]) == (7, "lr=high", 0)
    assert result["fid"] == 12.5 and result["alignment.both"] == 0.5 and result["lm_loss"] == 2.5


@pytest.mark.parametrize("spec_path", sorted((Path(__file__).parents[1] / "configs" / "sweeps").glob("*.toml")),
                         ids=lambda p: p.stem)
def test_every_shipped_spec_builds_a_valid_config_for_every_run(spec_path):
    """A typo in a shipped spec (an unknown key, a wrong type, a setting the config rejects) fails here, not an
    hour into a sweep."""
    from transfusion import config as config_mod

    spec = load_spec(spec_path)
    runs = spec.runs()
    assert len(runs) >= 4 and len(spec.seeds) >= 2  # the issue: >= 2 seeds per cell
    for run in runs:
        cfg = config_mod.load(spec.base, run.overrides)
        assert cfg.train.seed == run.seed
