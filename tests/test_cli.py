"""CLI: argument parsing, smoke runs of train/sample/caption/generate on a micro model, and bad input ->
one `error:` line with exit status 2 (no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from transfusion.checkpoint import layout as ck
from transfusion.checkpoint import load_for_inference
from transfusion.cli import build_parser, main

from train_helpers import write_micro_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    cfg = write_micro_config(tmp / "c.toml", steps=6, ckpt_every=3, extra="ema = 0.9")
    assert main(["train", str(cfg), "--out", str(tmp / "run"), "--no-progress", "--set", "train.seed=1"]) == 0
    return tmp / "run"


def test_parser_defaults() -> None:
    p = build_parser()
    a = p.parse_args(["sample", "--ckpt", "R", "--prompt", "a red bag", "--out", "x.png"])
    assert (a.n, a.steps, a.cfg, a.seed, a.sampler, a.no_ema) == (1, 0, None, 0, None, False)
    a = p.parse_args(["train", "c.toml", "--out", "R", "--set", "train.lr=1e-3", "--set", "train.steps=5", "--resume"])
    assert a.set == ["train.lr=1e-3", "train.steps=5"] and a.resume
    with pytest.raises(SystemExit):
        p.parse_args(["sample", "--ckpt", "R", "--prompt", "x", "--out", "y.png", "--sampler", "dpm"])
    a = p.parse_args(["eval", "--ckpt", "R"])  # wired to evaluate.report.add_eval_args / run_eval
    assert a.ckpt == "R" and callable(a.func)


def test_train_outputs(run_dir: Path) -> None:
    for name in ("metrics.jsonl", "config.toml", "loss_curve.png"):
        assert (run_dir / name).is_file()
    latest = ck.resolve(run_dir)
    assert latest.name == "step_00000006"
    # a training checkpoint: DCP shards (any world size can resume it) + JSON state, config, tokenizer
    assert {"dcp", "train_state.json", ck.CONFIG_FILE, ck.TOKENIZER_FILE, ck.MANIFEST_FILE} <= {
        p.name for p in latest.iterdir()}


def test_export_then_sample(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(run_dir), "--out", str(tmp_path / "exp")]) == 0
    step = ck.resolve(tmp_path / "exp")
    assert step.name == "step_00000006" and {ck.MODEL_FILE, ck.EMA_FILE} <= {p.name for p in step.iterdir()}
    a, _, _ = load_for_inference(run_dir)  # the same weights (EMA) from the shards and from the export
    b, _, _ = load_for_inference(step)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    out = tmp_path / "s.png"
    assert main(["sample", "--ckpt", str(tmp_path / "exp"), "--prompt", "a red bag", "--out", str(out),
                 "--steps", "2"]) == 0
    assert out.is_file()
    assert main(["export", str(step), "--out", str(tmp_path / "again")]) == 2  # already an export
    assert "single-file" in capsys.readouterr().err


def test_sample_grid_and_single(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(run_dir), "--prompt", "a red sneaker", "--out", str(out), "--n", "3",
                 "--steps", "3", "--cfg", "2", "--sampler", "ddpm", "--seed", "7"]) == 0
    w, h = Image.open(out).size
    assert (w, h) == (3 * (8 * 4 + 4), 8 * 4 + 4)  # 3 images of 8x8 upscaled x4 with a 2-pixel frame
    one = tmp_path / "one.png"
    assert main(["sample", "--ckpt", str(run_dir), "--prompt", "a red sneaker", "--out", str(one), "--steps", "3",
                 "--scale", "1", "--no-ema"]) == 0
    assert Image.open(one).size == (8, 8)
    assert "wrote" in capsys.readouterr().out


def test_caption_and_generate(run_dir: Path, tmp_path: Path, capsys) -> None:
    img = tmp_path / "in.png"
    Image.new("RGB", (28, 28), (200, 20, 20)).save(img)
    assert main(["caption", "--ckpt", str(run_dir), "--image", str(img), "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "a red bag <boi>", "--max-new-tokens", "3",
                 "--steps", "2", "--out-dir", str(tmp_path / "gen")]) == 0
    single = capsys.readouterr().out
    assert "[image:" in single
    assert (tmp_path / "gen" / "generated_00.png").is_file()
    # several prompts are generated together; prompt i with seed --seed + i, so the first matches the run above
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "a red bag <boi>", "--prompt", "ROMEO:",
                 "--max-new-tokens", "3", "--steps", "2", "--out-dir", str(tmp_path / "gen2")]) == 0
    both = capsys.readouterr().out
    assert "--- prompt 1" in both and "--- prompt 2" in both
    first = Image.open(tmp_path / "gen2" / "generated_00_00.png")
    assert list(first.getdata()) == list(Image.open(tmp_path / "gen" / "generated_00.png").getdata())


def test_bad_inputs_exit_2(run_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = write_micro_config(tmp_path / "c.toml", steps=2)
    assert main(["train", str(cfg), "--out", str(tmp_path / "r"), "--set", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.lrr'" in err and "'lr'" in err
    assert main(["train", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "r")]) == 2
    assert main(["sample", "--ckpt", str(tmp_path / "nothing"), "--prompt", "x", "--out", "y.png"]) == 2
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["caption", "--ckpt", str(run_dir), "--image", str(bad)]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_corrupt_checkpoint_one_line_error(run_dir: Path, tmp_path: Path) -> None:
    """Through a real subprocess: the user sees one `error:` line, no traceback."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ck.resolve(run_dir), broken)
    w = max((broken / "dcp").iterdir(), key=lambda p: p.stat().st_size)  # the shard file
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    res = subprocess.run([sys.executable, "-m", "transfusion.cli", "sample", "--ckpt", str(broken), "--prompt", "x",
                          "--out", str(tmp_path / "y.png")], capture_output=True, text=True)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("error:") and "truncated or corrupt" in res.stderr


def test_v_prediction_unet_run_trains_and_samples_through_the_cli(tmp_path: Path) -> None:
    """The options travel end to end: the checkpoint's config says v + U-Net, and sampling reads it back."""
    cfg = write_micro_config(tmp_path / "c.toml", steps=2, ckpt_every=2)
    opts = ["--set", "diffusion.prediction=v", "--set", "model.patch_encoder=unet", "--set", "model.unet_width=8"]
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", *opts]) == 0
    model, loaded, _ = load_for_inference(tmp_path / "run")
    assert loaded.diffusion.prediction.value == "v" and type(model.patch).__name__ == "UNetPatch"
    out = tmp_path / "s.png"
    assert main(["sample", "--ckpt", str(tmp_path / "run"), "--prompt", "a red bag", "--out", str(out),
                 "--steps", "3", "--n", "2"]) == 0
    assert out.is_file()


def test_precision_flag_runs_the_network_under_bf16_autocast(run_dir: Path, tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    """--precision bf16 puts every network call of sample / caption / generate under bf16 autocast; fp32 under
    none. (That bf16 sampling tracks fp32 is tests/test_generate.py's test_bf16_autocast_sampling_tracks_fp32.)"""
    from transfusion import cli

    seen: list[bool] = []
    load = cli._load

    def spy_load(*a, **kw):
        m = load(*a, **kw)
        m.model.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        return m

    monkeypatch.setattr(cli, "_load", spy_load)
    img = tmp_path / "in.png"
    Image.new("RGB", (28, 28), (200, 20, 20)).save(img)
    commands = {
        "sample": ["--prompt", "a red sneaker", "--out", str(tmp_path / "s.png"), "--steps", "2"],
        "caption": ["--image", str(img), "--max-new-tokens", "3"],
        "generate": ["--prompt", "a red bag <boi>", "--max-new-tokens", "2", "--steps", "2", "--out-dir",
                     str(tmp_path / "gen")],
    }
    for name, extra in commands.items():
        for prec in ("fp32", "bf16"):
            seen.clear()
            assert main([name, "--ckpt", str(run_dir), *extra, "--precision", prec]) == 0
            assert seen and set(seen) == {prec == "bf16"}, (name, prec)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--ckpt", "R", "--prompt", "x", "--out", "y.png", "--precision", "fp16"])


@pytest.mark.parametrize("args,needle", [
    (["sample", "--prompt", " ".join(["word"] * 5000)], "model's context is 256"),
    (["sample", "--prompt", "a red bag", "--n", "0"], "--n must be at least 1"),
    (["sample", "--prompt", "a red bag", "--steps", "5000"], "5000 denoising steps: expected 1..1000"),
    (["generate", "--prompt", " ".join(["word"] * 5000)], "model's context is 256"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["caption", "--image", "missing.png"], "no such file"),
])
def test_bad_inference_requests_exit_2_with_the_limit(run_dir: Path, tmp_path: Path, args, needle) -> None:
    """Over-long prompts, no images, out-of-range steps, missing files: one `error:` line naming the limit,
    exit 2, no traceback (a real subprocess, as a user runs it)."""
    extra = ["--out", str(tmp_path / "o.png")] if args[0] == "sample" else []
    res = subprocess.run([sys.executable, "-m", "transfusion.cli", args[0], "--ckpt", str(run_dir), *args[1:], *extra],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr


def test_generate_stops_at_the_end_of_the_context(run_dir: Path, tmp_path: Path, capsys) -> None:
    """Text that would run past the model's context stops there instead of overflowing the KV cache."""
    prompt = " ".join(["word"] * 120)
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", prompt, "--max-new-tokens", "500",
                 "--temperature", "1.0", "--steps", "2", "--out-dir", str(tmp_path)]) == 0


def test_min_new_tokens_bans_the_end_of_document(run_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """`generate --min-new-tokens N`: EOS cannot end the text before N tokens, whatever the model prefers."""
    from transfusion import decoding

    real = decoding.sample_next

    def prefers_eos(logits, *a, **kw):  # a model that always wants to stop, unless EOS is banned
        boosted = logits.clone()
        boosted[:, 2] = torch.where(torch.isinf(boosted[:, 2]), boosted[:, 2], boosted.max(-1).values + 10)
        return real(boosted, *a, **kw)

    monkeypatch.setattr(decoding, "sample_next", prefers_eos)
    gen = ["generate", "--ckpt", str(run_dir), "--prompt", "x", "--steps", "2", "--out-dir", str(tmp_path)]
    assert main([*gen, "--max-new-tokens", "20"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "x" and "ended the document after prompt 'x'" in out.err
    assert main([*gen, "--max-new-tokens", "12", "--min-new-tokens", "8"]) == 0
    assert len(capsys.readouterr().out) >= len("x") + 8 + 1  # 8 tokens of at least one character, print's newline
