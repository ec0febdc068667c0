"""Load a trained model to use it: the one entry point for the CLI, the demo, evaluation and the Python API.

    m = load("runs/demo")                  # latest checkpoint of a run (training or export format)
    m.model, m.tokenizer, m.config, m.path
    m.codec                                # pixels <-> the model's images (VAE latents when data.vae is set)

The model is built by model/build.py and its weights read by checkpoint/export.py (never through the trainer:
no training setting applies, and the caller's global RNG is untouched); then the inference kernel converters of
the checkpoint's [runtime] section are applied (backends/), unless `runtime` overrides them. Process-wide
settings (threads, allocator) are the entry point's business: `backends.setup_process(loaded.config.runtime)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from transfusion.backends import convert_model
from transfusion.checkpoint.export import load_for_inference, tokenizer_path_for
from transfusion.autoencoder.codec import image_codec
from transfusion.codec import Codec
from transfusion.config import Config, RuntimeConfig
from transfusion.model.transfusion import Transfusion
from transfusion.tokenizer import Tokenizer


@dataclass
class Loaded:
    model: Transfusion  # eval mode, EMA weights when the checkpoint has them (unless use_ema=False)
    tokenizer: Tokenizer
    config: Config
    path: Path  # the checkpoint directory that was read
    converters: list[str]  # the backends applied, e.g. ["cpu_math_attention", "onednn_packed"]
    codec: Codec  # pixels <-> what the model sees (codec.py): pass it to generate_images / caption_images / ...


def load(run_or_ckpt: str | Path, use_ema: bool = True, device: str | torch.device = "cpu",
         runtime: RuntimeConfig | None = None, check: bool = True) -> Loaded:
    """A run directory (its latest checkpoint) or one step directory -> model, tokenizer, config."""
    model, cfg, path = load_for_inference(run_or_ckpt, use_ema=use_ema, device=device, check=check)
    converters = convert_model(model, runtime or cfg.runtime, inference=True)
    return Loaded(model, Tokenizer.load(tokenizer_path_for(path, cfg)), cfg, path, converters, image_codec(cfg, base=path))
