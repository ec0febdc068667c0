"""Transfusion on VAE latents (data.vae, paper §2.3): the data path serves cached latents, the trainer records the
autoencoder's fingerprint, and every inference command decodes through the VAE (codec.py). A tiny KL-VAE on
16x16 colour fashion (configs/vae/fashion_tiny.toml, a few steps) stands in for a real one: these tests check the
plumbing, not the quality (docs/latents.md has the measured emoji runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from transfusion import config as config_mod
from transfusion.autoencoder import config as ae_config
from transfusion.autoencoder.codec import image_codec
from transfusion.autoencoder.train import train_vae
from transfusion.cli import main
from transfusion.codec import LatentCodec, PixelCodec
from transfusion.data.latent_images import LatentImageSet
from transfusion.data.loader import build_loader
from transfusion.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TINY_VAE = ROOT / "configs" / "vae" / "fashion_tiny.toml"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae") / "kl"
    cfg = ae_config.load(TINY_VAE, ["train.steps=4", "train.ckpt_every=4", "runtime.threads=1"])
    train_vae(cfg, out, progress=False)
    return out


def latent_cfg(vae: Path, *extra: str) -> config_mod.Config:
    # 16x16 pixels / f=4 -> 4x4x4 latents in 2x2 patches: 4 image positions
    return config_mod.load(None, [
        'model.preset="micro"', "model.image_channels=4", "model.image_size=4", "model.patch_size=2",
        f'data.vae="{vae}"', "data.use_full_dataset=false", "data.seq_len=64", "train.batch_size=4",
        "train.steps=2", "train.log_every=1", "train.ckpt_every=2", "train.sample_n=2", "runtime.threads=1",
        "diffusion.sample_steps=2", "diffusion.sampler=ddim", *extra])


def test_loader_serves_cached_latents_of_the_vae(vae_dir: Path) -> None:
    cfg = latent_cfg(vae_dir)
    tok = Tokenizer.load()
    loader = build_loader(cfg, tok)
    images = loader.sources.images
    assert isinstance(images, LatentImageSet) and images.channels == 4 and images.image_size == 4
    codec = image_codec(cfg)
    assert isinstance(codec, LatentCodec) and codec.pixel_size == 16 and codec.clip_x0 is None
    # the cached latents are what the codec makes of the dataset's 16x16 pixels
    from transfusion.data.registry import get_dataset

    pixels, _ = get_dataset(cfg.data).image_set(tok, "train", 16, 3)
    idx = [0, 5, 17]
    torch.testing.assert_close(images.render(idx), codec.encode(pixels.render(idx)), atol=1e-4, rtol=1e-4)
    batch = loader.batch_at(0)
    assert batch.patches.shape[-1] == 4 * 2 * 2  # C * k * k latent values per patch


def test_train_records_the_fingerprint_and_commands_decode_through_the_vae(vae_dir: Path, tmp_path: Path) -> None:
    from transfusion.train import train

    run = tmp_path / "run"
    cfg = latent_cfg(vae_dir)
    train(cfg, run, progress=False)
    saved = config_mod.load(run / "config.toml", saved=True)
    assert saved.data.vae_fingerprint == image_codec(cfg).fingerprint
    out = tmp_path / "s.png"
    assert main(["sample", "--ckpt", str(run), "--prompt", "a red sneaker", "--n", "2", "--out", str(out),
                 "--scale", "1", "--steps", "2"]) == 0
    with Image.open(out) as im:
        assert im.size[1] == 16 + 2 * 2  # decoded 16 px images in a grid with 2 px padding (latents: 4 px)
    img = tmp_path / "in.png"
    Image.new("RGB", (20, 20), (200, 10, 10)).save(img)
    assert main(["caption", "--ckpt", str(run), "--image", str(img), "--max-new-tokens", "3"]) == 0


def test_a_model_is_never_decoded_by_another_vae(vae_dir: Path, tmp_path: Path) -> None:
    cfg = latent_cfg(vae_dir, 'data.vae_fingerprint="0123456789abcdef"')
    with pytest.raises(config_mod.ConfigError, match="not the one this model was trained with"):
        image_codec(cfg)
    with pytest.raises(config_mod.ConfigError, match="model.image_channels"):
        image_codec(latent_cfg(vae_dir, "model.image_channels=3"))
    with pytest.raises(config_mod.ConfigError, match="train-vae"):
        image_codec(latent_cfg(tmp_path / "missing"))


def test_latents_are_not_clipped_but_pixels_are(vae_dir: Path, monkeypatch) -> None:
    """x0 clipping to [-1, 1] is a pixel-space rule (issue 14): a latent model's sampler must not clip."""
    from transfusion import decoding
    from transfusion.diffusion import build_schedule
    from transfusion.model.build import build_model

    seen = []
    real = decoding.build_sampler
    monkeypatch.setattr(decoding, "build_sampler", lambda *a, **kw: seen.append(kw["clip_x0"]) or real(*a, **kw))
    cfg = latent_cfg(vae_dir)
    tok = Tokenizer.load()
    model = build_model(cfg.model).eval()
    codec = image_codec(cfg)
    x = decoding.generate_images(model, tok, ["a red bag"], build_schedule(cfg.diffusion), steps=2,
                                 progress=False, codec=codec)
    assert x.shape == (1, 3, 16, 16) and seen[-1] is None
    pixel = PixelCodec(channels=4, pixel_size=4)
    decoding.generate_images(model, tok, ["a red bag"], build_schedule(cfg.diffusion), steps=2, progress=False,
                             codec=pixel)
    assert seen[-1] == 1.0


def test_batched_generation_decodes_each_image_as_alone(vae_dir: Path) -> None:
    """generate_batch with a codec: every image piece comes back decoded, equal to decoding the latent drawn by
    the same call without a codec (the codec only converts; the context keeps latents)."""
    from transfusion import decoding
    from transfusion.diffusion import build_schedule
    from transfusion.model.build import build_model

    cfg = latent_cfg(vae_dir)
    tok = Tokenizer.load()
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    codec = image_codec(cfg)
    sched = build_schedule(cfg.diffusion)
    kw = dict(max_new_tokens=2, steps=2, progress=False, clip_x0=None)
    raw = decoding.generate(model, tok, "a red bag <boi>", sched, generator=torch.Generator().manual_seed(3), **kw)
    dec = decoding.generate(model, tok, "a red bag <boi>", sched, generator=torch.Generator().manual_seed(3),
                            codec=codec, **kw)
    imgs_raw = [p for p in raw if isinstance(p, torch.Tensor)]
    imgs_dec = [p for p in dec if isinstance(p, torch.Tensor)]
    assert len(imgs_raw) == len(imgs_dec) >= 1 and imgs_dec[0].shape == (3, 16, 16)
    torch.testing.assert_close(imgs_dec[0], codec.decode(imgs_raw[0][None])[0], atol=1e-5, rtol=1e-5)


def test_eval_scores_a_latent_model_in_pixels(vae_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """`transfusion eval` on a latent model: it draws latents, the report scores the decoded 16 px pixels (FID
    reference, image-text scorer and captioning all at the VAE's pixel size)."""

    from test_eval_dataset import _shapes_folder, tiny_eval

    from transfusion.checkpoint.export import save_export
    from transfusion.model.build import build_model

    monkeypatch.setenv("TRANSFUSION_CACHE", str(tmp_path / "cache"))
    (tmp_path / "shapes").mkdir()
    _shapes_folder(tmp_path / "shapes")
    cfg = latent_cfg(vae_dir, "data.dataset=folder", f"data.folder={tmp_path / 'shapes'}")
    torch.manual_seed(0)
    save_export(tmp_path / "run", 0, build_model(cfg.model), cfg, tokenizer=Tokenizer.load())
    on_disk = tiny_eval(tmp_path / "run", tmp_path)
    assert on_disk["clip_score"] is not None and on_disk["n_captions"] == 2
    assert on_disk["ranked_accuracy"] is not None
    with Image.open(on_disk["grids"][0]) as im:
        assert im.size[1] == 2 * 16 + 2 * 2  # decoded 16 px samples at scale 2 (latents would be 4 px)


def test_kv_cached_decoding_equals_an_uncached_pass_on_a_latent_model() -> None:
    """A latent-shaped model (4 channels, 4x4 latents in 2x2 patches): the KV-cached prefill of `BOS BOI <clean
    latent> EOI` and one appended token give the logits of one uncached forward over the same sequence."""
    from core_helpers import ByteTokenizer, micro_model

    from transfusion.decoding import Decoder
    from transfusion.images import patchify

    tk = ByteTokenizer()
    model = micro_model(vocab_size=tk.vocab_size, image_channels=4, image_size=4, patch_size=2)
    img = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(0)) * 2  # latents are not in [-1, 1]
    dec = Decoder(model, 1, tk.pad_id)
    cached = [dec.prefill([[[tk.bos_id, tk.boi_id], img, [tk.eoi_id]]])[0]]
    nxt = int(cached[0].argmax())
    cached.append(dec.append_tokens(torch.tensor([nxt]))[0])
    n = model.cfg.patches_per_image
    tokens = torch.tensor([[tk.bos_id, tk.boi_id] + [tk.pad_id] * n + [tk.eoi_id, nxt]])
    image_ids = torch.tensor([[-1, -1] + [0] * n + [-1, -1]])
    L = tokens.shape[1]
    with torch.no_grad():
        full = model(tokens, image_ids, torch.zeros(1, L, dtype=torch.long), torch.arange(L)[None],
                     patchify(img[None], 2).reshape(n, -1), torch.zeros(n, dtype=torch.long))
    assert (full.logits[0, -2] - cached[0]).abs().max() < 1e-5
    assert (full.logits[0, -1] - cached[1]).abs().max() < 1e-5


def test_a_latent_release_carries_its_vae(vae_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """`transfusion release` of a latent model copies the VAE into DIR/vae and names it relatively, so the release
    samples from any working directory; the fingerprint check still holds."""
    from transfusion.checkpoint.release import make_release
    from transfusion.inference import load
    from transfusion.train import train

    run = tmp_path / "run"
    cfg = latent_cfg(vae_dir)
    train(cfg, run, progress=False)
    out = make_release(run, tmp_path / "release")
    assert (out / "vae").is_dir() and config_mod.load(out / "config.toml", saved=True).data.vae == "vae"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    m = load(out)
    assert m.codec.fingerprint == image_codec(cfg).fingerprint
    assert main(["sample", "--ckpt", str(out), "--prompt", "a red bag", "--out", str(tmp_path / "r.png"),
                 "--steps", "2"]) == 0
