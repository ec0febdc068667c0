"""A release: one directory to publish as is (`transfusion release RUN --out DIR`).

    DIR/model.safetensors   the weights to use: the EMA when the run kept one (what `load` and sampling use),
                            else the training weights. One file, no optimiser state, no second copy
    DIR/config.toml         the run's resolved config, the file every checkpoint carries
    DIR/tokenizer.json      the tokenizer the model was trained with
    DIR/manifest.json       size + SHA-256 of the three files above
    DIR/README.md           the model card (card.py): data, config, parameters, compute, evaluation, limits, licences
    DIR/vae/                a latent model's autoencoder checkpoint (data.vae = "vae" in DIR/config.toml, looked up
                            relative to DIR), so the release samples and captions with nothing else at hand

DIR is a checkpoint of the export format (layout.py), so the project's one loading path reads it unchanged:
`transfusion.load(DIR)`, `transfusion sample --ckpt DIR`. The card is written after the manifest and is not in
it, so a publisher may edit it (fill in a licence) without breaking verification. Weights are read with
`load_for_inference`, the path every command uses, after the source checkpoint's checksums are verified.
Written like a checkpoint: into a hidden temp directory, fsync'd, renamed into place; a full disk removes the
temp directory and says so (CheckpointWriteError), leaving the run untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_model

from transfusion.checkpoint import card, dcp, export, layout
from transfusion.checkpoint.layout import CKPT_SUBDIR, EMA_FILE, MODEL_FILE, STATE_JSON, CheckpointError


def _has_ema(ckpt: Path) -> bool:
    if dcp.is_dcp_checkpoint(ckpt):
        try:
            return bool(json.loads((ckpt / STATE_JSON).read_text()).get("has_ema"))
        except (OSError, ValueError):
            return False
    return (ckpt / EMA_FILE).is_file()


def _run_dir(source: Path, ckpt: Path) -> Path | None:
    """The run directory around a checkpoint (for metrics.jsonl and eval reports), None for a bare step dir."""
    if ckpt.parent.name == CKPT_SUBDIR:
        return ckpt.parent.parent
    return source if source != ckpt and source.is_dir() else None


def _weights_text(cfg_ema: float, has_ema: bool, use_ema: bool) -> str:
    if has_ema and use_ema:
        return f"the EMA of the training weights (train.ema = {cfg_ema}), which sampling uses"
    if has_ema:
        return "the raw training weights (released with --no-ema; the run also kept an EMA)"
    return "the training weights (the run kept no EMA)"


def _check_out(out: Path, ckpt: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"release --out {out} already exists and is not empty; pick another directory")
    if out.resolve().is_relative_to(ckpt.resolve()):
        raise CheckpointError(f"release --out {out} is inside the checkpoint {ckpt}; pick a directory outside it")


def _with_vae(cfg, tmp: Path):
    """Copy the autoencoder's checkpoint (the one the model was trained with: its fingerprint is checked when
    the release loads) into tmp/vae and return the config naming it relatively."""
    import copy

    from transfusion.autoencoder.checkpoint import resolve as resolve_vae

    vae_ckpt, _ = resolve_vae(cfg.data.vae)
    (tmp / "vae").mkdir()
    for name in (MODEL_FILE, layout.CONFIG_FILE):  # the weights and config; not its optimiser or discriminator
        shutil.copy2(vae_ckpt / name, tmp / "vae" / name)
    manifest = json.loads((vae_ckpt / layout.MANIFEST_FILE).read_text())
    layout.seal(tmp / "vae", int(manifest["step"]), manifest["format"])
    cfg = copy.deepcopy(cfg)
    cfg.data.vae = "vae"
    return cfg


def make_release(source: str | Path, out: str | Path, use_ema: bool = True,
                 eval_reports: list[str | Path] | None = None) -> Path:
    """Write the release of `source` (a run: its latest checkpoint; or a step directory) to `out`; returns it.
    `eval_reports`: `transfusion eval` JSON reports for the card (default: eval*.json found with the run)."""
    from transfusion.tokenizer import Tokenizer

    source, out = Path(source), Path(out)
    ckpt = layout.resolve(source)
    _check_out(out, ckpt)
    step = int(layout.verify(ckpt)["step"])  # checksums first: a damaged checkpoint is never published
    model, cfg, _ = export.load_for_inference(ckpt, use_ema=use_ema, check=False)
    tokenizer = Tokenizer.load(export.tokenizer_path_for(ckpt, cfg))
    run_dir = _run_dir(source, ckpt)
    reports = [Path(p) for p in eval_reports] if eval_reports else card.find_eval_reports(run_dir)
    for p in reports:
        if not p.is_file():
            raise CheckpointError(f"release --eval {p}: no such file")
    text = card.render(out.name, cfg, model.num_params(), card.training_facts(ckpt, run_dir, step),
                       _weights_text(cfg.train.ema, _has_ema(ckpt), use_ema), reports)
    tmp = out.parent / f".tmp-{out.name}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / MODEL_FILE))  # handles tied (shared) tensors, as the export does
        os.chmod(tmp / MODEL_FILE, 0o644)  # safetensors creates it owner-only; a release is for everyone to read
        if cfg.data.vae:  # a latent model ships its autoencoder: DIR/vae/, named relatively in DIR/config.toml
            cfg = _with_vae(cfg, tmp)
        layout.write_common(tmp, cfg, tokenizer)
        layout.seal(tmp, step, export.FORMAT)
        (tmp / card.CARD_FILE).write_text(text, encoding="utf-8")  # after the manifest: editable
        layout.fsync_file(tmp / card.CARD_FILE)
        if out.exists():
            out.rmdir()  # empty (checked above): os.replace needs the name free
        os.replace(tmp, out)
        layout.fsync_dir(out.parent)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        os_err = layout.os_error(e)
        if os_err is None:
            raise
        raise layout.CheckpointWriteError(
            f"{layout.failure_text(os_err)} while writing the release {out}; the partial release was removed and "
            f"nothing already saved is lost: {ckpt} is untouched. Free some space, then run the release again"
        ) from e
    return out
