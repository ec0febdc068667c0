"""A micro training config for the trainer/CLI tests: committed data subset only, runs in seconds on 2 cores."""

from __future__ import annotations

from pathlib import Path

MICRO_TOML = """
[model]
preset = "micro"
vocab_size = 2048  # the shipped tokenizer's size

[data]
seq_len = 128
use_full_dataset = false  # the committed subset: tests never need the Debian package

[train]
steps = {steps}
batch_size = 8
lr = 3e-3
min_lr = 3e-4
warmup_steps = 5
log_every = 1
ckpt_every = {ckpt_every}
sample_n = 0
{extra}

[diffusion]
sample_steps = 4
sampler = "ddim"

[runtime]
threads = 1  # tiny matmuls gain nothing from 2 threads, and a busy machine makes OMP spin-waits costly
"""


def write_micro_config(path: Path, steps: int = 30, ckpt_every: int = 10, extra: str = "") -> Path:
    path.write_text(MICRO_TOML.format(steps=steps, ckpt_every=ckpt_every, extra=extra))
    return path
