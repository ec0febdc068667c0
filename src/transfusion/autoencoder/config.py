"""Typed configuration of an image autoencoder run (`transfusion train-vae CONFIG.toml`).

Tables: [vae] (architecture, quantiser, latent scale), [loss] (weights of paper App. A's terms, discriminator),
[data] (the project's DataConfig: which dataset), [train] (optimisation, GAN start, logging), [runtime] (threads).
Loading goes through the same rules as transfusion.config: unknown keys are errors that list the valid keys,
values are coerced to their declared type, and `--set section.key=value` overrides apply on top of the file.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfusion import config as config_mod
from transfusion.config import ConfigError, DataConfig, RuntimeConfig


class AEKind(str, enum.Enum):
    KL = "kl"  # continuous latents, diagonal Gaussian posterior (Transfusion's VAE, paper App. A)
    VQ = "vq"  # the same encoder/decoder with a vector-quantisation layer (Chameleon's VQ-VAE twin)


class ScaleMode(str, enum.Enum):
    CHANNEL = "channel"  # one mean/std per latent channel
    GLOBAL = "global"  # one mean/std over all channels (LDM's scale_factor, plus a shift)


@dataclass
class VAEConfig:
    kind: AEKind = AEKind.KL
    image_size: int = 64  # training resolution (the networks are convolutional: any multiple of factor encodes)
    image_channels: int = 3
    latent_channels: int = 4  # C (paper: 8 at f = 8)
    factor: int = 4  # spatial downsampling f: h = H / f; one downsampling step per level after the first
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # channels per level, log2(f) + 1 levels
    blocks: int = 1  # ResNet blocks per level (the decoder has blocks + 1, as LDM/taming)
    attention: bool = True  # a self-attention block in the middle of each network, at the lowest resolution
    norm_groups: int = 8  # GroupNorm groups; every width must be divisible by it
    # VQ only: a codebook of codebook_size vectors of latent_channels dims (paper: 16,384; CPU default smaller)
    codebook_size: int = 1024
    beta: float = 0.25  # commitment weight: beta * ||z - sg(z_q)||^2 (van den Oord et al. 2017; paper App. A)
    kmeans_init: bool = True  # initialise the codebook by k-means on the first training batch's encoder outputs
    kmeans_iters: int = 10
    # dead codes: usage is an exponential average of assignments per step; every restart_every steps the codes
    # whose average is below restart_threshold are moved onto random encoder outputs of the batch (0 -> never)
    restart_every: int = 50
    restart_threshold: float = 0.03
    usage_decay: float = 0.99
    scale_mode: ScaleMode = ScaleMode.CHANNEL  # latent statistics saved with the VAE (diffusion sees ~N(0, 1))

    def __post_init__(self) -> None:
        self.kind = AEKind(self.kind)
        self.scale_mode = ScaleMode(self.scale_mode)
        if not isinstance(self.widths, list) or not all(isinstance(w, int) and w > 0 for w in self.widths):
            raise ConfigError(f"vae.widths must be a list of positive integers, got {self.widths!r}")
        for name in ("image_size", "image_channels", "latent_channels", "factor", "blocks", "norm_groups",
                     "codebook_size", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"vae.{name} must be >= 1, got {getattr(self, name)}")
        if self.factor not in (1, 2, 4, 8, 16):
            raise ConfigError(f"vae.factor must be a power of two <= 16 (paper: 8; CPU: 4), got {self.factor}")
        levels = int(math.log2(self.factor)) + 1
        if len(self.widths) != levels:
            raise ConfigError(f"vae.widths has {len(self.widths)} entries; factor {self.factor} needs "
                              f"log2(factor) + 1 = {levels} (one per resolution)")
        if bad := [w for w in self.widths if w % self.norm_groups]:
            raise ConfigError(f"vae.widths {bad} are not divisible by vae.norm_groups={self.norm_groups}")
        if self.image_size % self.factor:
            raise ConfigError(f"vae.image_size={self.image_size} is not divisible by vae.factor={self.factor}")
        if self.beta < 0 or self.restart_every < 0 or self.restart_threshold < 0:
            raise ConfigError("vae.beta, vae.restart_every and vae.restart_threshold must be >= 0")
        if not 0.0 <= self.usage_decay < 1.0:
            raise ConfigError(f"vae.usage_decay must be in [0, 1), got {self.usage_decay}")

    @property
    def latent_size(self) -> int:
        return self.image_size // self.factor


@dataclass
class LossConfig:
    """Weights of paper App. A: L1 + LPIPS + 0.5 GAN + 0.2 ID(MoCo-v2) + 1e-6 KL (VQ: codebook 1.0 instead)."""

    l1: float = 1.0
    kl: float = 1e-6  # on LDM's per-image KL sum, normalised like the L1 mean (autoencoder/losses.py)
    codebook: float = 1.0  # VQ: weight of codebook + beta * commitment
    gan: float = 0.5  # generator hinge loss, times the adaptive weight
    adaptive_max: float = 1e4  # clamp of ||grad nll|| / ||grad g|| on the decoder's last layer (LDM)
    disc_layers: int = 3  # NLayer PatchGAN depth (stride-2 convolutions)
    disc_width: int = 64
    # perceptual terms need weights no package ships offline (DESIGN.md §6): a user-supplied TorchScript network
    # images (N, 3, H, W) in [-1, 1] -> a feature tensor or a list of them. Off (0) by default
    lpips: float = 0.0  # paper: 1.0
    lpips_weights: str = ""
    moco: float = 0.0  # paper: 0.2 (its "ID" loss)
    moco_weights: str = ""

    def __post_init__(self) -> None:
        for name in ("l1", "kl", "codebook", "gan", "lpips", "moco"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_layers < 1 or self.disc_width < 1 or self.adaptive_max <= 0:
            raise ConfigError("loss.disc_layers, loss.disc_width and loss.adaptive_max must be positive")
        for name in ("lpips", "moco"):
            weights = getattr(self, f"{name}_weights")
            if getattr(self, name) > 0 and not weights:
                raise ConfigError(f"loss.{name} > 0 needs loss.{name}_weights: a TorchScript feature network you "
                                  "supply (no such weights ship offline; see docs/autoencoder.md)")
            if getattr(self, name) > 0 and not Path(weights).is_file():
                raise ConfigError(f"loss.{name}_weights={weights!r}: no such file")


@dataclass
class VAETrainConfig:
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-4
    min_lr: float = 2e-5  # cosine decay to this after warm-up
    warmup_steps: int = 50
    beta1: float = 0.5  # taming/LDM's Adam betas for the autoencoder and the discriminator
    beta2: float = 0.9
    disc_lr: float = 2e-4
    grad_clip: float = 0.0  # 0 -> no clipping
    bf16: bool = False  # bf16 autocast for the networks (losses, KL and code lookup stay fp32)
    gan_start: int = 500  # paper: 50,000 of 1M; no discriminator work at all before this step
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    recon_every: int = 0  # reconstruction grid every N steps (0 -> at the end only)
    recon_n: int = 8  # test images in the grid (originals over reconstructions)
    scale_images: int = 1024  # training images whose latents give the saved mean/std
    time_limit_min: float = 0.0  # stop (checkpoint, latent statistics, grid) after this much training time
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "recon_n", "scale_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "disc_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        for name in ("min_lr", "warmup_steps", "grad_clip", "gan_start", "ckpt_every", "keep_checkpoints",
                     "recon_every", "time_limit_min"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class AEConfig:
    vae: VAEConfig = field(default_factory=VAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: VAETrainConfig = field(default_factory=VAETrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


_SECTIONS = ("vae", "loss", "data", "train", "runtime")


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> AEConfig:
    """An AEConfig from an optional TOML file plus `section.key=value` overrides (as transfusion.config.load)."""
    raw: dict[str, Any] = config_mod.read_toml(path) if path is not None else {}
    return from_dict(config_mod.apply_overrides(raw, overrides))


def from_dict(raw: dict[str, Any]) -> AEConfig:
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"unknown config table [{name}]; an autoencoder config has {list(_SECTIONS)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{name} is a table: write [{name}] and its keys, not {name} = {value!r}")
    cfg = AEConfig()
    try:
        config_mod._apply(cfg, raw, "")
        for section in (cfg.vae, cfg.loss, cfg.train):  # re-validate after the values are in
            section.__post_init__()
    except TypeError as e:
        raise ConfigError(str(e)) from None
    return cfg


def dump_toml(cfg: AEConfig) -> str:
    """The resolved config as TOML (written with every checkpoint; `load` reads it back)."""
    return config_mod.dump_toml(cfg)  # type: ignore[arg-type]  # same shape: tables of scalars and lists


def to_dict(cfg: AEConfig) -> dict[str, Any]:
    return config_mod.to_dict(cfg)
