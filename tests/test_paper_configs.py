"""The paper's configs train (issue 14): configs/paper/*.toml describe VAE latents 32x32x8 in 2x2 patches, which
need an 8-channel f = 8 autoencoder (`data.vae`). A tiny one is trained for two steps on the committed emoji subset
at 256 px, then the 0.16B transformer takes two optimiser steps on its latents with a short sequence (slow: a
0.16B model on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from transfusion import config as config_mod
from transfusion.autoencoder import config as ae_config
from transfusion.autoencoder.train import train_vae
from transfusion.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_paper_016b_trains_on_latents_of_an_f8_vae(tmp_path: Path) -> None:
    vae = tmp_path / "vae"
    train_vae(ae_config.load(ROOT / "configs" / "vae" / "paper_f8.toml", [
        "data.dataset=emoji", "data.use_full_dataset=false", "vae.widths=[8, 8, 16, 16]", "vae.blocks=1",
        "vae.norm_groups=4", "loss.disc_width=8", "train.steps=2", "train.batch_size=2", "train.bf16=false",
        "train.ckpt_every=2", "train.scale_images=8", "runtime.threads=2"]), vae, progress=False)
    cfg = config_mod.load(ROOT / "configs" / "paper" / "0.16B.toml", [
        f'data.vae="{vae}"', "data.dataset=emoji", "data.use_full_dataset=false", "data.seq_len=384",
        "model.max_seq_len=384", "model.vocab_size=2048", "model.attention_impl=sdpa", "train.batch_size=2",
        "train.steps=2", "train.warmup_steps=1", "train.log_every=1", "train.ckpt_every=2", "train.sample_n=0",
        "train.bf16=false", "runtime.threads=2"])
    assert (cfg.model.image_channels, cfg.model.image_size, cfg.model.patch_size) == (8, 32, 2)  # the paper's
    from transfusion.train import train

    train(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["n_images"] > 0 for r in rows)
