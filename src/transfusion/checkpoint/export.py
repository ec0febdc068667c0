"""The export format (full weights in safetensors) and the one way to load any checkpoint for inference.

    RUN/checkpoints/step_XXXXXXXX/  model.safetensors  ema.safetensors (when trained with train.ema > 0)
                                    config.toml  tokenizer.json  manifest.json        (layout.py)

`export_from_dcp` (one process, offline; `transfusion export`) and `export_safetensors` (collective, during
training) write it; `load_for_inference` reads both this format and the training format (dcp.py). Loading for
inference builds the model through model.build.build_model only: no training setting (activation
checkpointing, compile, sharding) applies, and the caller's global RNG is untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from transfusion.checkpoint import dcp, layout
from transfusion.checkpoint.layout import CKPT_SUBDIR, EMA_FILE, MODEL_FILE, TOKENIZER_FILE, CheckpointError
from transfusion.config import Config
from transfusion.model.build import build_model

FORMAT = "safetensors-1"


def save_export(out_dir: str | Path, step: int, model: nn.Module, cfg: Config,
                ema_state: dict[str, torch.Tensor] | None = None, tokenizer: Any | None = None, keep: int = 0) -> Path:
    """Write OUT/checkpoints/step_XXXXXXXX (weights of `model`, optional fp32 EMA) atomically; returns its path."""
    root = Path(out_dir) / CKPT_SUBDIR
    final = root / layout.step_name(step)
    tmp = root / f".tmp-{final.name}"
    try:
        layout.temp_dir(root, final.name)
        save_model(model, str(tmp / MODEL_FILE))  # handles tied (shared) tensors
        if ema_state is not None:
            save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp / EMA_FILE))
        layout.write_common(tmp, cfg, tokenizer)
        layout.seal(tmp, step, FORMAT)
        return layout.publish(tmp, final, keep)
    except (OSError, SafetensorError) as e:  # a full disk: one error line, nothing published is touched
        layout.abandon_write(tmp, e, Path(out_dir), final.name, then="run the export again")
        raise


def _plain_from(weights: dict[str, torch.Tensor], cfg: Config) -> nn.Module:
    model = build_model(cfg.model)  # then overwritten; load_state_dict keeps tied weights tied
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"export: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def export_safetensors(model: nn.Module, cfg: Config, out_dir: str | Path, step: int, ema: Any | None = None,
                       tokenizer: Any | None = None) -> Path | None:
    """Collective: write an export of a (possibly sharded) training model. Returns the path on rank 0, else None."""
    full, ema_full = dcp.full_weights(model, ema)
    path = None
    if dcp.is_main():
        path = save_export(out_dir, step, _plain_from(full, cfg), cfg, ema_full, tokenizer)
    dcp.barrier()
    return path


def export_from_dcp(path: str | Path, out_dir: str | Path) -> Path:
    """One process, no process group: turn a training checkpoint saved at any world size into an export."""
    from transfusion.tokenizer import Tokenizer

    ckpt = layout.resolve(path)
    if not dcp.is_dcp_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt} is not a training (DCP) checkpoint; it already is a single-file export")
    step = int(layout.check_sizes(ckpt)["step"])
    cfg = layout.read_config(ckpt)
    model = build_model(cfg.model)  # then overwritten
    ema = dcp.load_into_plain(ckpt, model)
    tokenizer = Tokenizer.load(ckpt / TOKENIZER_FILE) if (ckpt / TOKENIZER_FILE).is_file() else None
    return save_export(Path(out_dir), step, model, cfg, ema, tokenizer)


def _load_weights(model: nn.Module, path: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load weights ({e})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def _load_ema(ckpt: Path) -> dict[str, torch.Tensor] | None:
    p = ckpt / EMA_FILE
    if not p.is_file():
        return None
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot load EMA weights ({e})") from None


def load_for_inference(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu",
                       check: bool = True) -> tuple[nn.Module, Config, Path]:
    """(model in eval mode, its config, checkpoint dir): EMA weights when present and `use_ema`.

    Reads a training checkpoint (DCP shards written at any world size) and an export alike; `check` verifies
    every file's checksum first. The model is plain (no converters: see backends.convert_model, which
    transfusion.inference.load applies)."""
    ckpt = layout.resolve(path)
    if check:
        layout.verify(ckpt)
    cfg = layout.read_config(ckpt)
    model = build_model(cfg.model, device=device)
    if dcp.is_dcp_checkpoint(ckpt):
        ema = dcp.load_into_plain(ckpt, model)
    else:
        _load_weights(model, ckpt / MODEL_FILE)
        ema = _load_ema(ckpt) if use_ema else None
    if ema is not None and use_ema:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in ema.items():
                if name not in params or params[name].shape != value.shape:
                    raise CheckpointError(f"{ckpt}: EMA weight {name} does not match the model")
                params[name].copy_(value)
    model.eval()
    return model, cfg, ckpt


def tokenizer_path_for(ckpt: Path, cfg: Config) -> str | None:
    """The checkpoint's own tokenizer copy, else the config's, else None (-> the shipped tokenizer)."""
    if (ckpt / TOKENIZER_FILE).is_file():
        return str(ckpt / TOKENIZER_FILE)
    return cfg.data.tokenizer or None
