"""Autoencoder checkpoints in the project's layout (checkpoint/layout.py: temp dir, fsync, manifest, atomic
publish, `latest`), and `load_autoencoder`, the one way other code gets a trained VAE.

    RUN/checkpoints/step_00001200/
        model.safetensors        the Autoencoder's weights and buffers (latent statistics, codebook usage)
        config.toml              the run's AEConfig ([vae] builds the network)
        disc.safetensors         training only: the PatchGAN discriminator
        optim.safetensors        training only: both Adam states (tensors) and the training RNG state
        train_state.json         training only: step, optimiser hyper-parameters, training seconds
        manifest.json            size + sha256 of every other file, written last

Nothing is pickled: tensors are safetensors, the rest JSON or TOML. `load_autoencoder` reads model.safetensors
and config.toml only, so a release may drop the training files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from transfusion.autoencoder import config as ae_config
from transfusion.autoencoder.config import AEConfig
from transfusion.autoencoder.model import Autoencoder
from transfusion.checkpoint import layout
from transfusion.checkpoint.layout import CKPT_SUBDIR, CONFIG_FILE, MODEL_FILE, CheckpointError
from transfusion.config import ConfigError

FORMAT = "autoencoder-safetensors-1"
DISC_FILE = "disc.safetensors"
OPTIM_FILE = "optim.safetensors"
STATE_FILE = "train_state.json"


# ------------------------------------------------------------------------------------------ optimiser state


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimiser's state as flat tensors `prefix.<param index>.<key>` plus its param groups (JSON-able)."""
    sd = opt.state_dict()
    tensors = {f"{prefix}.{i}.{k}": v.detach().clone().contiguous()
               for i, st in sd["state"].items() for k, v in st.items() if isinstance(v, torch.Tensor)}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict],
                   prefix: str) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    opt.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------------------------ writing


def save_checkpoint(out_dir: Path, step: int, cfg: AEConfig, model: Autoencoder, disc: nn.Module,
                    optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator,
                    extra: dict[str, Any], keep: int) -> Path:
    """Write OUT/checkpoints/step_XXXXXXXX atomically (a killed save leaves the previous one intact)."""
    root = Path(out_dir) / CKPT_SUBDIR
    final = root / layout.step_name(step)
    tmp = root / f".tmp-{final.name}"
    try:
        layout.temp_dir(root, final.name)
        save_file(_plain(model.state_dict()), str(tmp / MODEL_FILE))
        save_file(_plain(disc.state_dict()), str(tmp / DISC_FILE))
        tensors: dict[str, torch.Tensor] = {"rng.train": generator.get_state()}
        groups = {}
        for name, opt in optimizers.items():
            t, groups[name] = optimizer_tensors(opt, name)
            tensors.update(t)
        save_file(tensors, str(tmp / OPTIM_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "param_groups": groups, **extra}, indent=1))
        (tmp / CONFIG_FILE).write_text(ae_config.dump_toml(cfg))
        layout.seal(tmp, step, FORMAT)
        return layout.publish(tmp, final, keep)
    except (OSError, SafetensorError) as e:  # a full disk: one error line, nothing published is touched
        layout.abandon_write(tmp, e, Path(out_dir), final.name)
        raise


def _plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------ reading


def read_config(ckpt: Path) -> AEConfig:
    try:
        return ae_config.load(ckpt / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt} is not an autoencoder checkpoint (its {CONFIG_FILE}: {e})") from None


def _load_weights(module: nn.Module, path: Path) -> None:
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")


def resolve(path: str | Path) -> tuple[Path, AEConfig]:
    """A run directory or step directory -> (complete step directory, its config)."""
    ckpt = layout.resolve(path)
    manifest = layout.check_sizes(ckpt)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is a {manifest.get('format')!r} checkpoint, not an autoencoder ({FORMAT})")
    return ckpt, read_config(ckpt)


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> Autoencoder:
    """The trained autoencoder of a run (its latest checkpoint) or of one step directory, in eval mode with
    frozen weights. Errors are CheckpointError with the reason (missing, truncated, not an autoencoder)."""
    ckpt, cfg = resolve(path)
    model = Autoencoder(cfg.vae)
    _load_weights(model, ckpt / MODEL_FILE)
    model.eval().requires_grad_(False)
    return model.to(device)


def load_vq(path: str | Path, device: str | torch.device = "cpu") -> Autoencoder:
    """`load_autoencoder` for callers that need codes (the Chameleon baseline): CheckpointError unless the
    checkpoint is a VQ-VAE."""
    model = load_autoencoder(path, device)
    if model.quantizer is None:
        raise CheckpointError(f"{path} is a KL-VAE; code indices need a VQ-VAE (vae.kind = \"vq\", "
                              "configs/vae/emoji_vq.toml)")
    return model


def load_training_state(ckpt: Path, model: Autoencoder, disc: nn.Module,
                        optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator) -> dict[str, Any]:
    """Restore everything a resumed run needs in place; returns train_state.json (step, counters)."""
    _load_weights(model, ckpt / MODEL_FILE)
    _load_weights(disc, ckpt / DISC_FILE)
    try:
        tensors = load_file(str(ckpt / OPTIM_FILE))
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}: training state unreadable ({e}); it cannot be resumed") from None
    for name, opt in optimizers.items():
        load_optimizer(opt, tensors, state["param_groups"][name], name)
    generator.set_state(tensors["rng.train"])
    return state
