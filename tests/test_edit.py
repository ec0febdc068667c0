"""Image editing (paper §4.5): the edit document (input clean at t = 0 with no diffusion loss, output diffused),
the edit folder reader and its skip counts, the recolour source, `train --init-from`, edit decoding (the CFG twin
keeps the image and drops the instruction; batched == one at a time), CLI errors, and a micro end to end:
train, fine-tune on edits, `transfusion edit`, `transfusion eval --suite edit`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transfusion import config
from transfusion.batch import CLEAN, IGNORE
from transfusion.checkpoint import layout as ck
from transfusion.checkpoint import load_for_inference
from transfusion.cli import main
from transfusion.data import fashion
from transfusion.data.edits import (
    EDITS_FILE, EditSampler, edit_document, load_edit_folder, recolour_examples, recolour_set,
    write_recolour_folder,
)
from transfusion.data.folder import FolderDatasetError
from transfusion.data.loader import build_loader
from transfusion.data.mixture import MixtureSpec
from transfusion.data.packing import collate
from transfusion.data.sequences import PATCH, Layout, Specials
from transfusion.decoding import GenerationError
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.editing import edit_images, edit_rows
from transfusion.images import patchify, read_uint8
from transfusion.losses import noised_patches, transfusion_loss
from transfusion.model.transfusion import ModelOutput
from transfusion.tokenizer import Tokenizer
from transfusion.train.step import noise_for_rows

from core_helpers import ByteTokenizer, micro_model
from train_helpers import write_micro_config

SP = Specials(pad=0, bos=1, eos=2, boi=3, eoi=4)
MICRO = ["model.preset=micro", "data.use_full_dataset=false", "data.seq_len=96", "data.text_ratio=0",
         "data.dataset=recolour", "train.batch_size=4"]
EDIT_TOML = """
[model]
preset = "micro"
vocab_size = 2048

[data]
dataset = "recolour"
seq_len = 96
text_ratio = 0.0
use_full_dataset = false

[train]
steps = 3
batch_size = 4
lr = 1e-3
warmup_steps = 1
log_every = 1
ckpt_every = 3
sample_n = 0
ema = 0.9

[diffusion]
sample_steps = 2
sampler = "ddim"

[runtime]
threads = 1
"""


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


def _edit_batch(tok: Tokenizer, n_docs: int = 2):
    """A batch of recolour edit documents on the micro model (8x8 images, 16 patches each)."""
    cfg = config.load(None, MICRO)
    loader = build_loader(cfg, tok)
    batch = loader.batch_at(0)
    batch.validate(cfg.model.patch_dim, cfg.model.patches_per_image, cfg.model.vocab_size)
    return cfg, batch


# ------------------------------------------------------------------------------------------ the document


def test_edit_document_layout() -> None:
    n = 4
    doc = edit_document(np.array([11, 12, 13]), 5, 9, n, SP, 1000)
    P = PATCH
    assert doc.tokens.tolist() == [1, 11, 12, 13, 3, P, P, P, P, 4, 3, P, P, P, P, 4, 2]
    assert doc.layout is Layout.EDIT and not doc.splittable
    assert doc.images == (5, 9) and doc.image_starts == (5, 11) and doc.max_ts == (CLEAN, 999)
    twin = edit_document(np.zeros(0, dtype=np.int64), 5, 9, n, SP, 1000)  # instruction dropped, input kept
    assert twin.tokens.tolist() == [1, 3, P, P, P, P, 4, 3, P, P, P, P, 4, 2] and twin.image_starts == (2, 8)


def test_collated_edit_targets_and_clean_input(tok) -> None:
    cfg, batch = _edit_batch(tok)
    n = cfg.model.patches_per_image
    assert batch.num_images % 2 == 0 and batch.image_max_t.tolist() == [CLEAN, 999] * (batch.num_images // 2)
    assert batch.diffused.tolist() == [False, True] * (batch.num_images // 2)
    tokens, ids, tgt = batch.tokens[0], batch.image_ids[0], batch.lm_targets[0]
    boi = (tokens == tok.boi_id) & (ids < 0)
    # no LM loss where the input is BOI (the next position is a patch, paper fn. 8), nor on patches
    assert (tgt[boi] == IGNORE).all() and (tgt[ids >= 0] == IGNORE).all()
    first_in = int((ids == 0).nonzero()[0])
    eoi_in = first_in + n  # EOI after the input image predicts the output's BOI
    assert int(tokens[eoi_in]) == tok.eoi_id and int(tgt[eoi_in]) == tok.boi_id
    assert int(tokens[eoi_in + 1]) == tok.boi_id and int(ids[eoi_in + 2]) == 1  # then the output image


def test_clean_input_is_x0_at_t0_and_no_diffusion_target(tok) -> None:
    cfg, batch = _edit_batch(tok)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    x_t, t, noise, patch_image = noised_patches(batch, schedule, torch.Generator().manual_seed(0))
    clean = ~batch.diffused[patch_image]  # (P,)
    assert torch.equal(x_t[clean], batch.patches[clean]) and (t[clean] == 0).all()
    assert not torch.allclose(x_t[~clean], batch.patches[~clean])  # the output is noised
    t_img, _ = noise_for_rows(batch, schedule, seed=0, step=0, first_row=0)  # the trainer's per-row draw
    assert (t_img[~batch.diffused] == 0).all()

    class Fixed(torch.nn.Module):  # predicts `pred` at the patches, uniform logits
        def __init__(self, pred):
            super().__init__()
            self.pred = pred

        def forward(self, tokens, image_ids, doc_ids, positions, x, t, logits_mask=None, **kw):
            return ModelOutput(torch.zeros(int(logits_mask.sum()), cfg.model.vocab_size), self.pred)

    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    _, _, eps, _ = noised_patches(batch, schedule, g())
    pred = torch.zeros_like(batch.patches)
    base = transfusion_loss(Fixed(pred), batch, schedule, generator=g())
    wild = pred.clone()
    wild[clean] = 1e3  # whatever is predicted at the clean input costs nothing
    assert float(transfusion_loss(Fixed(wild), batch, schedule, generator=g()).diffusion_loss) == float(
        base.diffusion_loss)
    target = schedule.target(batch.patches, eps, t)
    per_image = torch.stack([(target[patch_image == k]).pow(2).mean() for k in range(batch.num_images)])
    expected = per_image[batch.diffused].mean()  # averaged over the diffused images only
    assert float(base.diffusion_loss) == pytest.approx(float(expected), rel=1e-5)


# ------------------------------------------------------------------------------------------ sources


def test_recolour_source_is_exact_and_respects_heldout(tok) -> None:
    edits = recolour_set(tok, "train", 28, use_full_dataset=False)
    idx = np.array([0, 7, 8 * 5 + 3, 8 * 123 + 6])
    k = 4  # patches are the NumPy path of fashion.tint, exactly
    assert torch.allclose(edits.patches(idx, k), patchify(edits.images.render(idx), k).reshape(-1, 3 * k * k))
    rng = np.random.default_rng(0)
    for _ in range(200):
        e = edits.draw(rng)
        assert e.input // 8 == e.output // 8 and e.input != e.output  # same item, another colour
        item = int(edits.labels[e.input // 8])
        assert (item, e.input % 8) not in fashion.HELDOUT and (item, e.output % 8) not in fashion.HELDOUT
        words = tok.decode(e.instruction.tolist()).split()
        assert fashion.COLOUR_NAMES[e.output % 8] in words and fashion.COLOUR_NAMES[e.input % 8] not in words
    ex = recolour_examples("test", n=16, seed=0, size=8, use_full_dataset=False)
    assert (ex.source != ex.target).all() and ex.target.tolist() == [i % 8 for i in range(16)]
    assert ex.instructions[5] == "make it blue" and ex.inputs.shape == ex.targets.shape == (16, 3, 8, 8)


def test_edit_folder_reading_and_skip_counts(tmp_path: Path, tok) -> None:
    root = write_recolour_folder(tmp_path / "edits", n=4, size=8, use_full_dataset=False)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "ok.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    bad = [
        "{not json",
        json.dumps({"input": "ok.png", "instruction": "make it red"}),  # no output
        json.dumps({"input": "ok.png", "instruction": "   ", "output": "ok.png"}),
        json.dumps({"input": "ok.png", "instruction": "red " * 40, "output": "ok.png"}),
        json.dumps({"input": "missing.png", "instruction": "make it red", "output": "ok.png"}),
        json.dumps({"input": "ok.png", "instruction": "make it red", "output": "corrupt.png"}),
    ]
    with open(root / EDITS_FILE, "a") as f:
        f.write("\n".join(bad) + "\n")
    edits, stats = load_edit_folder(root, tok, image_size=8, max_instruction_tokens=16)
    assert stats.used == len(edits) == 4
    assert dict(stats.counts) == {"bad_line": 2, "empty_instruction": 1, "instruction_too_long": 1,
                                  "missing_file": 1, "unreadable_image": 1}
    assert "missing.png" in stats.summary() and "corrupt.png" in stats.summary()
    ex = recolour_examples("test", n=4, seed=0, size=8, use_full_dataset=False)  # what the writer wrote
    assert tok.decode(edits.instructions[1].tolist()) == ex.instructions[1]
    got = edits.patches(np.array([edits.inputs[2], edits.outputs[2]]), 2)
    want = patchify(torch.stack([ex.inputs[2], ex.targets[2]]), 2).reshape(-1, 12)
    assert (got - want).abs().max() <= 1 / 127.5  # the PNG round trip is exact up to uint8 rounding
    (root / EDITS_FILE).write_text("\n".join(bad) + "\n")
    with pytest.raises(FolderDatasetError, match="no usable edit"):
        load_edit_folder(root, tok, 8, 16)
    with pytest.raises(FolderDatasetError, match=EDITS_FILE):
        load_edit_folder(tmp_path, tok, 8, 16)


def test_sampler_drops_instructions_for_cfg(tok) -> None:
    edits = recolour_set(tok, "train", 8, use_full_dataset=False)
    spec = MixtureSpec(text_ratio=0.0, image_first_prob=0.2, caption_dropout=0.5, patches_per_image=16,
                       num_train_steps=1000, noise_limit=500, max_text_tokens=30)
    sampler = EditSampler(np.random.default_rng(0), spec, Specials.of(tok), edits, None)
    docs = [sampler.image() for _ in range(200)]
    dropped = sum(int(d.tokens[1]) == tok.boi_id for d in docs)
    assert 70 < dropped < 130  # ~half; a dropped one keeps both images
    assert all(len(d.images) == 2 and d.max_ts[0] == CLEAN for d in docs)
    batch = collate([docs[:2]], 96, tok.pad_id, edits, 2)
    batch.validate(12, 16, 2048)


def test_loader_checks_the_edit_document_fits(tok) -> None:
    cfg = config.load(None, MICRO[:-1] + ["data.seq_len=40"])  # an edit document needs ~44 positions
    with pytest.raises(config.ConfigError, match="data.seq_len"):
        build_loader(cfg, tok)


# ------------------------------------------------------------------------------------------ decoding


def _inputs(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_cfg_twin_keeps_the_image_and_drops_the_instruction() -> None:
    tk, images = ByteTokenizer(), _inputs(2)
    rows = edit_rows(tk, [[10, 11], [12]], images, guided=True)
    assert len(rows) == 4
    assert rows[0][0] == [tk.bos_id, 10, 11, tk.boi_id] and torch.equal(rows[0][1], images[0])
    assert rows[1][0] == [tk.bos_id, 12, tk.boi_id] and rows[1][2] == [tk.eoi_id, tk.boi_id]
    for twin, image in zip(rows[2:], images):
        assert twin[0] == [tk.bos_id, tk.boi_id] and torch.equal(twin[1], image) and twin[2] == [tk.eoi_id, tk.boi_id]
    # behaviour: at guidance scale 0 only the twin counts, so the instruction cannot matter but the image does
    model, schedule = micro_model(), NoiseSchedule(prediction="v")

    def edit(image: torch.Tensor, text: str, cfg_scale: float = 0.0) -> torch.Tensor:
        return edit_images(model, tk, image[None], [text], schedule, steps=3, cfg_scale=cfg_scale, sampler="ddim",
                           generator=torch.Generator().manual_seed(0), progress=False)

    a, b, c = edit(images[0], "make it red"), edit(images[0], "turn it blue!"), edit(images[1], "make it red")
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)
    assert not torch.allclose(a, edit(images[0], "turn it blue!", 3.0), atol=1e-3)  # guided, the instruction matters


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_batched_equals_one_at_a_time(sampler: str) -> None:
    tk, images = ByteTokenizer(), _inputs(3, seed=1)
    model, schedule = micro_model(), NoiseSchedule(prediction="v")
    texts = ["make it red", "blue", "change the colour to a deep purple"]  # different lengths: left padding
    kw = dict(steps=4, cfg_scale=3.0, sampler=sampler, progress=False)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]  # noqa: E731
    batched = edit_images(model, tk, images, texts, schedule, generator=gens(), **kw)
    alone = torch.cat([edit_images(model, tk, images[i:i + 1], texts[i:i + 1], schedule, generator=[g], **kw)
                       for i, g in enumerate(gens())])
    assert batched.shape == (3, 3, 8, 8)
    assert torch.allclose(batched, alone, atol=1e-4), (batched - alone).abs().max()


def test_edit_request_errors() -> None:
    tk, model, schedule = ByteTokenizer(), micro_model(), NoiseSchedule()
    with pytest.raises(GenerationError, match="empty"):
        edit_images(model, tk, _inputs(1), ["  "], schedule, steps=1, progress=False)
    with pytest.raises(GenerationError, match="context"):
        edit_images(model, tk, _inputs(1), ["x" * 300], schedule, steps=1, progress=False)
    with pytest.raises(GenerationError, match="shape"):
        edit_images(model, tk, torch.zeros(1, 3, 16, 16), ["make it red"], schedule, steps=1, progress=False)
    with pytest.raises(GenerationError, match="instructions"):
        edit_images(model, tk, _inputs(2), ["make it red"], schedule, steps=1, progress=False)


# ------------------------------------------------------------------------------------------ fine-tuning, end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A micro source run (EMA on), and a fine-tune of it on recolour edits through the CLI."""
    tmp = tmp_path_factory.mktemp("edit")
    src_cfg = write_micro_config(tmp / "src.toml", steps=4, ckpt_every=4, extra="ema = 0.9")
    assert main(["train", str(src_cfg), "--out", str(tmp / "src"), "--no-progress"]) == 0
    (tmp / "edit.toml").write_text(EDIT_TOML)
    assert main(["train", str(tmp / "edit.toml"), "--out", str(tmp / "ft"), "--init-from", str(tmp / "src"),
                 "--no-progress"]) == 0
    return {"tmp": tmp, "src": tmp / "src", "ft": tmp / "ft", "edit_toml": tmp / "edit.toml"}


def test_init_from_loads_the_source_weights_and_ema(runs) -> None:
    from transfusion.parallel import process_group as pg
    from transfusion.train.loop import setup_run

    cfg = config.load(runs["edit_toml"], [f"train.init_from={runs['src']}"])
    info = pg.init_distributed("cpu")
    run = setup_run(cfg, runs["tmp"] / "fresh", resume=False, info=info)
    raw, _, _ = load_for_inference(runs["src"], use_ema=False)
    ema, _, _ = load_for_inference(runs["src"], use_ema=True)
    for name, p in run.model.state_dict().items():
        assert torch.equal(p, raw.state_dict()[name]), name
    ema_params = dict(ema.named_parameters())
    assert all(torch.equal(v, ema_params[n].float()) for n, v in run.ema.shadow.items())
    assert run.state.step == 0 and not run.optimizer.state  # fresh optimiser at step 0
    assert run.state.init_from == str(ck.resolve(runs["src"]))


def test_fine_tune_records_its_source(runs) -> None:
    ft = runs["ft"]
    assert config.load(ft / "config.toml").train.init_from == str(runs["src"])
    state = json.loads((ck.resolve(ft) / ck.STATE_JSON).read_text())
    assert state["train_state"]["trainer"]["init_from"] == str(ck.resolve(runs["src"]))
    assert state["step"] == 3 and config.load(ft / "config.toml").data.dataset == "recolour"


def test_init_from_errors_are_one_line(runs, tmp_path: Path, capsys) -> None:
    other = ["--set", "model.dim=32"]
    assert main(["train", str(runs["edit_toml"]), "--out", str(tmp_path / "a"), "--init-from", str(runs["src"]),
                 "--no-progress", *other]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --init-from") and "model.dim" in err and "\n" not in err
    assert main(["train", str(runs["edit_toml"]), "--out", str(tmp_path / "b"), "--init-from",
                 str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["export", str(runs["src"]), "--out", str(tmp_path / "exp")]) == 0
    assert main(["train", str(runs["edit_toml"]), "--out", str(tmp_path / "c"), "--init-from",
                 str(tmp_path / "exp"), "--no-progress"]) == 2
    assert "export" in capsys.readouterr().err


def _png(tmp: Path) -> Path:
    ex = recolour_examples("test", n=1, seed=3, size=8, use_full_dataset=False)
    path = tmp / "in.png"
    Image.fromarray(((ex.inputs[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(path)
    return path


def test_cli_edit_writes_a_png(runs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.png"
    assert main(["edit", "--ckpt", str(runs["ft"]), "--image", str(_png(tmp_path)), "--instruction", "make it red",
                 "--out", str(out), "--steps", "2", "--cfg", "2", "--seed", "1", "--sampler", "ddpm",
                 "--scale", "1"]) == 0
    assert Image.open(out).size == (8, 8) and "wrote" in capsys.readouterr().out
    assert read_uint8(out, 8).shape == (3, 8, 8)


@pytest.mark.parametrize("args,match", [
    (["--image", "MISSING.png", "--instruction", "make it red"], "MISSING.png"),
    (["--image", "IN", "--instruction", "   "], "instruction"),
    (["--image", "IN", "--instruction", "make it red " * 200], "context"),
    (["--image", "IN", "--instruction", "make it red", "--steps", "5000"], "steps"),
])
def test_cli_edit_errors(runs, tmp_path: Path, capsys, args, match) -> None:
    args = [str(_png(tmp_path)) if a == "IN" else a for a in args]
    assert main(["edit", "--ckpt", str(runs["ft"]), "--out", str(tmp_path / "o.png"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and match in err and "\n" not in err
    assert not (tmp_path / "o.png").exists()


def test_eval_suite_edit_end_to_end(runs, tmp_path: Path, monkeypatch, capsys) -> None:
    try:
        fashion.load_fashion_mnist("test")
    except fashion.DatasetMissing:
        pytest.skip("Fashion-MNIST not installed (the item classifier trains on it)")
    from transfusion.evaluate import classifier

    quick = classifier.get_classifier(classifier.ClassifierConfig(epochs=1, n_train=12_000), progress=False)
    monkeypatch.setattr(classifier, "get_classifier", lambda **kw: quick)
    out = tmp_path / "edit.json"
    assert main(["eval", "--ckpt", str(runs["ft"]), "--suite", "edit", "--n", "4", "--steps", "2",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    e = report["edit"]
    assert e["n"] == 4 and set(e) >= {"both", "colour", "item_kept", "item_true", "mse", "psnr", "copy_psnr"}
    assert 0 <= e["both"] <= 1 and e["copy_mse"] > 0
    assert out.with_suffix(".md").is_file() and Path(report["grid"]).is_file()
    assert "right and kept" in capsys.readouterr().out
    # the scorer itself: the exact targets are right and kept, the unedited inputs are not right
    from transfusion.evaluate.edit import score_edits

    ex = recolour_examples("test", n=16, seed=0, size=28)
    perfect = score_edits(ex.targets, ex, quick).summary()
    assert perfect["both"] == 1.0 and perfect["mse"] == 0.0
    assert score_edits(ex.inputs, ex, quick).summary()["colour"] == 0.0


def test_default_eval_suite_points_an_edit_model_to_its_suite(runs, tmp_path: Path, capsys) -> None:
    assert main(["eval", "--ckpt", str(runs["ft"]), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--suite edit" in err and "\n" not in err
