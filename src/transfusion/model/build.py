"""The one way to construct a Transfusion model: meta device -> `to_empty` -> `init_weights`.

    model = build_model(cfg.model, device="cpu", seed=0)      # initialised, global RNG untouched
    model = build_model(cfg.model, device="meta")             # a skeleton for parallelize() (the trainer's path)
    init_model(model, seed)                                   # initialise a skeleton moved by `to_empty`

Building on the meta device first allocates nothing until the final device is known (a 7B model is never
materialised on the CPU by accident) and lets the trainer shard the skeleton before any weight exists.
The initial weights are a function of the seed alone: they are drawn under a forked RNG, so building a model
(to sample, to evaluate, to export) never changes the caller's random stream.
"""

from __future__ import annotations

import torch

from transfusion.config import Family, ModelConfig
from transfusion.model.chameleon import Chameleon
from transfusion.model.transfusion import Transfusion

Model = Transfusion | Chameleon  # model.family picks the class; both share blocks, init rule and cache


def model_class(cfg: ModelConfig) -> type[Model]:
    return Chameleon if cfg.family == Family.CHAMELEON else Transfusion


def init_model(model: Model, seed: int) -> Model:
    """Fill every parameter and buffer of `model` (already on its device) from `seed`; global RNG untouched."""
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        model.init_weights()
    return model


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0) -> Model:
    """An initialised model on `device` (weights from `seed`), or an uninitialised skeleton for "meta"."""
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    return init_model(model, seed)
