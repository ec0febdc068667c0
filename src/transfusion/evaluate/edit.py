"""`transfusion eval --suite edit`: does a model edit held-out images as it is told (paper §4.5)?

Recolour edits (data/edits.py) of Fashion-MNIST *test* items, which no fine-tune trains on, have exact targets:
the same gray item tinted the asked colour. Each edit is scored:
- colour right: the colour reader (alignment.read_colours) reads the asked colour in the output;
- item kept:    the item classifier (classifier.py) gives the output the class it gives the exact target, so its
                own errors on real images (~8%) are not charged to the edit; `item_true` compares with the real
                label instead;
- both:         colour right and item kept, the headline (issue 16 target: >= 0.80);
- distance to the exact target: MSE of [0, 1] pixels and PSNR; the same for the unedited input, the copy
  baseline (right item, wrong colour by construction) that an edit's distance should beat.
Edit i draws its noise from its own generator (seed, i), so the scores do not depend on the batch size.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transfusion.config import ConfigError
from transfusion.data.edits import RecolourExamples, recolour_examples
from transfusion.evaluate.alignment import ColourRule, is_heldout, read_colours

DEFAULT_N = 80  # 10 edits per target colour


def psnr(mse: Tensor) -> Tensor:
    """PSNR in dB of a mean squared error of [0, 1] pixels; identical images are capped at 100 dB."""
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def pixel_mse(a: Tensor, b: Tensor) -> Tensor:
    """(N, C, H, W) x 2 in [-1, 1] -> (N,) mean squared error of [0, 1] pixels."""
    return ((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)


@dataclass
class EditScores:
    """Per-edit verdicts (all (N,)); `summary()` aggregates them."""

    colour_ok: Tensor
    item_kept: Tensor
    item_true: Tensor
    heldout: Tensor  # (item, asked colour) is a combination of fashion.HELDOUT
    mse: Tensor
    copy_mse: Tensor  # the unedited input against the target

    @property
    def both(self) -> Tensor:
        return self.colour_ok & self.item_kept

    def summary(self) -> dict[str, float | int | None]:
        def mean(x: Tensor, mask: Tensor | None = None) -> float | None:
            x = x if mask is None else x[mask]
            return float(x.float().mean()) if x.numel() else None

        return {
            "both": mean(self.both), "colour": mean(self.colour_ok), "item_kept": mean(self.item_kept),
            "item_true": mean(self.item_true), "both_heldout_combo": mean(self.both, self.heldout),
            "mse": mean(self.mse), "psnr": mean(psnr(self.mse)),
            "copy_mse": mean(self.copy_mse), "copy_psnr": mean(psnr(self.copy_mse)),
            "n": int(len(self.mse)), "n_heldout_combo": int(self.heldout.sum()),
        }


def score_edits(outputs: Tensor, ex: RecolourExamples, classifier, rule: ColourRule = ColourRule()) -> EditScores:
    """Score outputs (N, 3, H, W) in [-1, 1] of the edits `ex`."""
    if len(outputs) != len(ex.targets):
        raise ValueError(f"{len(outputs)} outputs for {len(ex.targets)} edits")
    colour, _ = read_colours(outputs, rule)
    pred = classifier.predict(outputs)
    return EditScores(
        colour_ok=colour == ex.target, item_kept=pred == classifier.predict(ex.targets), item_true=pred == ex.items,
        heldout=is_heldout(ex.items, ex.target), mse=pixel_mse(outputs, ex.targets),
        copy_mse=pixel_mse(ex.inputs, ex.targets),
    )


def run_edits(model, tokenizer, cfg, ex: RecolourExamples, steps: int, cfg_scale: float, sampler: str, seed: int,
              batch: int = 16, progress: bool = True) -> Tensor:
    """The model's outputs (N, 3, H, W) in [-1, 1] for the edits `ex`, `batch` at a time."""
    from tqdm.auto import tqdm

    from transfusion.diffusion import build_schedule
    from transfusion.editing import edit_images

    schedule = build_schedule(cfg.diffusion)
    out = []
    for k in tqdm(range(0, len(ex.inputs), batch), desc="edit", disable=not progress):
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(k, min(k + batch, len(ex.inputs)))]
        out.append(edit_images(model, tokenizer, ex.inputs[k:k + batch], ex.instructions[k:k + batch], schedule,
                               steps=steps, cfg_scale=cfg_scale, sampler=sampler, generator=gens, progress=False))
    return torch.cat(out).float().clamp(-1, 1)


def evaluate_edits(ckpt: str | Path, n: int | None = None, out: str | Path = "eval/edit.json", steps: int | None = None,
                   cfg_scale: float | None = None, sampler: str | None = None, seed: int = 0, use_ema: bool = True,
                   classifier=None, progress: bool = True) -> dict[str, Any]:
    """Edit `n` held-out recolour examples with the checkpoint, score them, write OUT (+ .md, _grid.png)."""
    from transfusion.decoding import sampling_args
    from transfusion.evaluate.classifier import get_classifier
    from transfusion.inference import load

    start = time.time()
    m = load(ckpt, use_ema=use_ema)
    c = m.config.model
    if c.image_channels != 3:
        raise ConfigError(f"the edit suite scores RGB recolour edits; this checkpoint has model.image_channels="
                          f"{c.image_channels}")
    clf = classifier or get_classifier(progress=progress)
    sampling = sampling_args(m.config.diffusion, steps, cfg_scale, sampler)
    ex = recolour_examples("test", n=n or DEFAULT_N, seed=seed, size=c.image_size,
                           use_full_dataset=m.config.data.use_full_dataset)
    outputs = run_edits(m.model, m.tokenizer, m.config, ex, seed=seed, progress=progress, **sampling)
    report: dict[str, Any] = {
        "checkpoint": str(m.path), "suite": "edit", "split": "test", "sampler": sampling["sampler"],
        "steps": sampling["steps"], "cfg": sampling["cfg_scale"],
        "seed": seed, "ema": use_ema, "classifier_test_accuracy": clf.test_accuracy,
        "edit": score_edits(outputs, ex, clf).summary(),
        "examples": [{"instruction": ex.instructions[i], "item": int(ex.items[i]), "from": int(ex.source[i]),
                      "to": int(ex.target[i])} for i in range(min(8, len(ex.items)))],
    }
    out = Path(out)
    report["grid"] = str(save_edit_grid(ex, outputs, out.with_name(out.stem + "_grid.png")))
    report["seconds"] = round(time.time() - start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_summary(report))
    return report


def save_edit_grid(ex: RecolourExamples, outputs: Tensor, path: Path, rows: int = 16) -> Path:
    """One edit per row: input | output | exact target."""
    from transfusion.metrics import save_image_grid

    k = min(rows, len(outputs))
    triples = torch.stack([ex.inputs[:k], outputs[:k].cpu(), ex.targets[:k]], 1).flatten(0, 1)  # (3k, C, H, W)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(triples, path, nrow=3, scale=2)
    return path


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown_summary(report: dict[str, Any]) -> str:
    e = report["edit"]
    return "\n".join([
        f"# Edit evaluation: {report['checkpoint']}",
        "",
        f"{e['n']} held-out recolour edits (Fashion-MNIST test items), sampler {report['sampler']}, "
        f"{report['steps']} steps, CFG {report['cfg']}; item classifier test accuracy "
        f"{_fmt(report['classifier_test_accuracy'])}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| right and kept (colour right and item kept) | {_fmt(e['both'])} |",
        f"| colour right / item kept / item = true label | {_fmt(e['colour'])} / {_fmt(e['item_kept'])} / "
        f"{_fmt(e['item_true'])} |",
        f"| right and kept, held-out combinations ({e['n_heldout_combo']}) | {_fmt(e['both_heldout_combo'])} |",
        f"| MSE / PSNR to the exact target | {_fmt(e['mse'])} / {_fmt(e['psnr'])} dB |",
        f"| copy baseline (input unchanged) MSE / PSNR | {_fmt(e['copy_mse'])} / {_fmt(e['copy_psnr'])} dB |",
        "",
        f"grid (input, output, target per row): {report.get('grid', '-')}; {report.get('seconds', '-')} s",
    ]) + "\n"
