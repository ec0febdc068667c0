"""`make demo` / `make demo-latent` (transfusion.demo): the latent demo trains the autoencoder its config names,
then the transformer on its latents, draws the grid and captions; a rerun reuses both runs. A shrunken model and
a 2-step VAE stand in for the real ones (the real runs' numbers are in docs/demo.md)."""

from __future__ import annotations

import json
from pathlib import Path

from transfusion import demo

ROOT = Path(__file__).resolve().parent.parent


def _small_vae_config(tmp_path: Path) -> Path:
    text = (ROOT / "configs" / "vae" / "fashion_kl_demo.toml").read_text()
    text = text.replace("steps = 1500", "steps = 2").replace("gan_start = 900", "gan_start = 1")
    text = text.replace("scale_images = 2048", "scale_images = 16").replace("threads = 2", "threads = 1")
    path = tmp_path / "vae.toml"
    path.write_text(text)
    return path


def test_latent_demo_trains_the_vae_then_the_model_and_a_rerun_reuses_both(tmp_path: Path) -> None:
    vae_dir, out = tmp_path / "vae_run", tmp_path / "demo"
    sets = [f'data.vae="{vae_dir}"', "model.dim=32", "model.n_layers=1", "model.n_heads=2", "train.steps=2",
            "train.batch_size=4", "data.use_full_dataset=false", "diffusion.sample_steps=2", "runtime.threads=1",
            "train.warmup_steps=1"]
    args = ["--config", str(ROOT / "configs" / "demo_latent.toml"), "--vae-config", str(_small_vae_config(tmp_path)),
            "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    assert demo.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["autoencoder"]["reused"] is False and summary["autoencoder"]["steps"] == 2
    assert (vae_dir / "checkpoints" / "step_00000002").is_dir()
    assert (out / "grid.png").is_file() and (out / "captions.png").is_file()
    cfg_text = (out / "config.toml").read_text()
    assert "vae_fingerprint" in cfg_text and "image_channels = 4" in cfg_text
    assert demo.main(args) == 0  # rerun: nothing is trained again
    summary = json.loads((out / "summary.json").read_text())
    assert summary["autoencoder"]["reused"] is True
    assert sorted(p.name for p in (vae_dir / "checkpoints").iterdir() if p.name.startswith("step_"))[-1] == \
        "step_00000002"


def test_a_vae_config_without_a_place_to_train_it_is_one_error_line(tmp_path: Path, capsys) -> None:
    args = ["--config", str(ROOT / "configs" / "tiny.toml"), "--vae-config",
            str(ROOT / "configs" / "vae" / "fashion_kl_demo.toml"), "--out", str(tmp_path / "demo")]
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert "names no data.vae" in err and "Traceback" not in err
