"""The codec of a config (codec.py): pixels, or the latents of the autoencoder `data.vae` names.

Kept apart from codec.py because it loads an autoencoder checkpoint from disk, which decoding must not reach.
"""

from __future__ import annotations

from pathlib import Path

from transfusion.codec import Codec, LatentCodec, PixelCodec
from transfusion.autoencoder.checkpoint import load_autoencoder
from transfusion.config import Config, ConfigError


def image_codec(cfg: Config, base: Path | None = None) -> Codec:
    """The codec of a config: pixels unless `data.vae` names an autoencoder, which must fit `[model]`. A relative
    `data.vae` is looked up in `base` (the checkpoint's directory) first: a release carries its VAE as `vae/`."""
    m = cfg.model
    if not cfg.data.vae:
        return PixelCodec(channels=m.image_channels, pixel_size=m.image_size)
    path = Path(cfg.data.vae)
    if not path.is_absolute() and base is not None and (Path(base) / path).exists():
        path = Path(base) / path
    if not path.exists():
        raise ConfigError(f"data.vae={cfg.data.vae!r} does not exist; train one with `transfusion train-vae "
                          "configs/vae/emoji_kl.toml --out DIR` and point data.vae at DIR")
    codec = LatentCodec(load_autoencoder(path), str(path), m.image_size)
    if codec.channels != m.image_channels:
        raise ConfigError(f"the autoencoder {path} makes {codec.channels}-channel latents but model.image_channels"
                          f"={m.image_channels}; set model.image_channels = {codec.channels}")
    if cfg.data.vae_fingerprint and cfg.data.vae_fingerprint != codec.fingerprint:
        raise ConfigError(f"the autoencoder at {path} is not the one this model was trained with (fingerprint "
                          f"{codec.fingerprint[:12]} vs {cfg.data.vae_fingerprint[:12]}); its latents would "
                          "mean something else")
    return codec
