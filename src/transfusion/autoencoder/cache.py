"""Latents of a dataset split, computed once per autoencoder and kept on disk as safetensors shards.

    cache_dir()/latents/<vae fingerprint>/<data key>/
        shard_00000.safetensors ...   latents (n, C, h, w) float32 scaled as encode() gives them;
                                      KL: also std (n, C, h, w), the posterior std in the same scale;
                                      VQ: also indices (n, h, w) int64
        meta.json                     written last: fingerprint, data key, count, shapes, shard names

The key is the VAE's fingerprint (a hash of its config and every weight and buffer, model.py) and the images'
content key (their pixels, size and split, data.py): a retrained or different VAE, or changed data, gets a new
directory and never reads an old one. A directory is written under a temporary name and renamed into place, so
a killed process leaves no half cache; one whose meta.json does not match is recomputed.

KL latents are cached as the posterior mean and std, so a trainer can draw z = mean + std * eps per step (as
LDM does) or use the mean.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from transfusion import env
from transfusion.autoencoder.data import content_key
from transfusion.autoencoder.model import Autoencoder
from transfusion.config import DataConfig
from transfusion.data.image_text import ImageTextSet
from transfusion.log import log

META_FILE = "meta.json"
VERSION = 1


@dataclass
class CachedLatents:
    latents: Tensor  # (N, C, h, w) float32, scaled (what encode() returns; KL: the posterior mean)
    std: Tensor | None  # KL: (N, C, h, w) posterior std in the scaled space
    indices: Tensor | None  # VQ: (N, h, w) int64
    path: Path
    computed: bool  # False when read from disk

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def sample(self, idx: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Latents of images `idx`: KL a posterior sample mean + std * eps, VQ the codes."""
        z = self.latents[idx]
        if self.std is None:
            return z
        return z + self.std[idx] * torch.randn(z.shape, generator=generator)


def latents_root() -> Path:
    return env.cache_dir() / "latents"


def cache_path(model: Autoencoder, images: ImageTextSet, split: str, root: Path | None = None) -> Path:
    return Path(root or latents_root()) / model.fingerprint() / content_key(images, split)


@torch.no_grad()
def _encode_shard(model: Autoencoder, x: Tensor) -> dict[str, Tensor]:
    """One batch of images -> the tensors cached for it."""
    if model.quantizer is None:
        post = model.posterior(x)
        scale = model.latent_scale.view(1, -1, 1, 1)
        return {"latents": model.scale(post.mean).float().cpu(), "std": (post.std / scale).float().cpu()}
    z_e, q = model.quantize(x)
    return {"latents": model.scale(q.z_q).float().cpu(), "indices": q.indices.cpu()}


def _compute(model: Autoencoder, images: ImageTextSet, tmp: Path, batch_size: int, shard_size: int,
             progress: bool) -> list[str]:
    device = model.latent_shift.device
    names: list[str] = []
    idx = torch.arange(len(images))
    for start in tqdm(range(0, len(images), shard_size), desc="latents", disable=not progress, leave=False):
        parts = [_encode_shard(model, images.render(b).to(device))
                 for b in idx[start:start + shard_size].split(batch_size)]
        shard = {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}
        name = f"shard_{len(names):05d}.safetensors"
        save_file(shard, str(tmp / name))
        names.append(name)
    return names


def _read(path: Path, meta: dict) -> CachedLatents:
    shards = [load_file(str(path / name)) for name in meta["shards"]]
    cat = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    return CachedLatents(cat["latents"], cat.get("std"), cat.get("indices"), path, computed=False)


def _valid_meta(path: Path, fingerprint: str, key: str, n: int) -> dict | None:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ok = (meta.get("version") == VERSION and meta.get("fingerprint") == fingerprint and meta.get("data_key") == key
          and meta.get("count") == n and all((path / s).is_file() for s in meta.get("shards", [])))
    return meta if ok else None


def split_latents(model: Autoencoder, images: ImageTextSet, split: str, root: Path | None = None,
                  batch_size: int = 64, shard_size: int = 4096, progress: bool = False) -> CachedLatents:
    """Latents of every image of `images` (a split of a dataset), from the cache or computed and cached."""
    fingerprint, key = model.fingerprint(), content_key(images, split)
    path = Path(root or latents_root()) / fingerprint / key
    meta = _valid_meta(path, fingerprint, key, len(images))
    if meta is not None:
        try:
            return _read(path, meta)
        except (SafetensorError, OSError, KeyError) as e:
            log.warning(f"latent cache {path} unreadable ({e}); recomputing")
    was_training = model.training
    model.eval()
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        names = _compute(model, images, tmp, batch_size, shard_size, progress)
        meta = {"version": VERSION, "fingerprint": fingerprint, "data_key": key, "count": len(images),
                "split": split, "name": images.name, "image_size": images.image_size, "shards": names,
                "kind": model.kind.value, "latent_channels": model.latent_channels, "factor": model.factor}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        shutil.rmtree(path, ignore_errors=True)  # a stale or corrupt directory of the same key
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        model.train(was_training)
    cached = _read(path, meta)
    cached.computed = True
    return cached


def dataset_latents(model: Autoencoder, data: DataConfig, split: str, image_size: int | None = None,
                    root: Path | None = None, progress: bool = False) -> CachedLatents:
    """Latents of split `split` of the dataset `data` names, at `image_size` (default: the VAE's own)."""
    from transfusion.autoencoder.data import image_set

    images = image_set(data, split, image_size or model.cfg.image_size, model.cfg.image_channels)
    return split_latents(model, images, split, root=root, progress=progress)
