"""Trainer pieces that do not need the model core: LR schedule, parameter groups, EMA, micro-batch split,
metrics files and image grids."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from transfusion.batch import MixedBatch, make_lm_targets
from transfusion.config import TrainConfig
from transfusion.train.ema import EMA
from transfusion.metrics import MetricsLogger, make_grid, plot_loss_curve, read_metrics, save_image_grid
from transfusion.train.optim import build_optimizer, lr_at, param_groups
from transfusion.train.step import split_rows


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.lin(self.emb(x))))


def test_lr_schedule_warmup_cosine_floor() -> None:
    cfg = TrainConfig(steps=1000, warmup_steps=100, lr=3e-4, min_lr=1.5e-5)
    assert lr_at(0, cfg) == pytest.approx(3e-6)
    assert lr_at(99, cfg) == pytest.approx(3e-4)
    assert lr_at(100, cfg) == pytest.approx(3e-4)
    mid = 100 + (999 - 100) / 2
    assert lr_at(int(mid), cfg) == pytest.approx((3e-4 + 1.5e-5) / 2, rel=1e-2)
    assert lr_at(999, cfg) == pytest.approx(1.5e-5)
    assert lr_at(5000, cfg) == pytest.approx(1.5e-5)
    lrs = [lr_at(s, cfg) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warm-up


def test_lr_schedule_no_warmup() -> None:
    cfg = TrainConfig(steps=10, warmup_steps=0, lr=1.0, min_lr=0.0)
    assert lr_at(0, cfg) == pytest.approx(1.0)
    assert lr_at(9, cfg) == pytest.approx(0.0, abs=1e-12)


def test_param_groups_decay_only_matrices() -> None:
    model = Toy()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["head.weight", "lin.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["emb.weight", "lin.bias", "norm.bias", "norm.weight"]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, TrainConfig())
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_param_groups_tied_weight_counted_once() -> None:
    model = Toy()
    model.head.weight = model.emb.weight  # tied LM head follows the embedding: no decay
    decay, no_decay = param_groups(model, 0.1)
    n = sum(len(g["params"]) for g in (decay, no_decay))
    assert n == len(list(model.parameters()))
    assert all(p is not model.emb.weight for p in decay["params"])


def test_ema_update_and_swap_restores_exactly() -> None:
    torch.manual_seed(0)
    model = Toy()
    ema = EMA(model, 0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[n], before[n] + 0.1)
        assert ema.shadow[n].dtype == torch.float32
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped_into(model):
        torch.testing.assert_close(model.lin.weight, ema.shadow["lin.weight"])
    for n, p in model.named_parameters():
        assert torch.equal(p, trained[n])
    other = EMA(Toy(), 0.9)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ema.names)
    with pytest.raises(ValueError):
        EMA(model, 1.0)


def _toy_batch() -> MixedBatch:
    """4 rows of 8: rows 0 and 2 hold one 2-patch image each, row 3 holds two."""
    B, L, D = 4, 8, 3
    tokens = torch.randint(5, 20, (B, L))
    image_ids = torch.full((B, L), -1)
    image_ids[0, 2:4] = 0
    image_ids[2, 1:3] = 1
    image_ids[3, 0:2] = 2
    image_ids[3, 5:7] = 3
    doc_ids = torch.zeros(B, L, dtype=torch.long)
    positions = torch.arange(L).expand(B, L).clone()
    patches = torch.arange(8 * D, dtype=torch.float32).reshape(8, D)
    return MixedBatch(tokens, image_ids, doc_ids, positions, make_lm_targets(tokens, image_ids, doc_ids),
                      patches, torch.tensor([999, 499, 999, 499]))


def test_split_rows_keeps_patches_and_images_aligned() -> None:
    batch = _toy_batch()
    batch.validate(patch_dim=3, patches_per_image=2)
    parts = split_rows(batch, 2)
    assert [p.tokens.shape[0] for p in parts] == [2, 2]
    for p in parts:
        p.validate(patch_dim=3, patches_per_image=2)
    assert torch.equal(parts[0].patches, batch.patches[:2])
    assert torch.equal(parts[1].patches, batch.patches[2:])
    assert parts[0].image_max_t.tolist() == [999]
    assert parts[1].image_max_t.tolist() == [499, 999, 499]
    assert parts[1].image_ids[0, 1:3].tolist() == [0, 0] and parts[1].image_ids[1, 5:7].tolist() == [2, 2]
    assert sum(p.num_images for p in split_rows(batch, 4)) == 4
    assert split_rows(batch, 1)[0] is batch


def test_metrics_logger_resume_truncates(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    log = MetricsLogger(path)
    for s in range(1, 6):
        log.log({"step": s, "loss": 1.0 / s, "lm_loss": torch.tensor(0.5), "diffusion_loss": float("nan")})
    with path.open("a") as f:
        f.write('{"step": 6, "lo')  # torn line from a killed process
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    MetricsLogger(path, resume_step=3)
    recs = read_metrics(path)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[0]["lm_loss"] == 0.5 and recs[0]["diffusion_loss"] == "nan"
    json.loads(path.read_text().splitlines()[0])
    plot_loss_curve(path, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_image_grid(tmp_path) -> None:
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    grid = make_grid(images, nrow=3, scale=4, pad=2, borders=[None, (255, 0, 0), None, None, None])
    assert grid.size == (3 * (32 + 4), 2 * (32 + 4))
    assert grid.getpixel((36, 0)) == (255, 0, 0)  # red frame of image 1
    save_image_grid(images, tmp_path / "g.png", nrow=3)
    assert (tmp_path / "g.png").is_file() and not list(tmp_path.glob("*.tmp.png"))
    assert math.isfinite(float(images.sum()))


def test_tune_malloc_applies_on_glibc_and_can_be_switched_off(monkeypatch):
    """Process-global, so it runs in a fresh interpreter: mallopt must accept both settings here (glibc);
    `[runtime] tune_malloc = false` keeps setup_process from calling it."""
    import subprocess
    import sys

    from transfusion import backends
    from transfusion.config import RuntimeConfig

    code = "from transfusion.backends.cpu.runtime import tune_malloc; print(tune_malloc())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    if sys.platform.startswith("linux") and __import__("platform").libc_ver()[0] == "glibc":
        assert on == "True"
    calls: list[int] = []
    monkeypatch.setattr(backends, "tune_malloc", lambda: calls.append(1))
    backends.setup_process(RuntimeConfig(tune_malloc=False))
    assert calls == []
    backends.setup_process(RuntimeConfig())
    assert calls == [1]
