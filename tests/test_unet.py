"""U-Net patch encoder/decoder (model/patch.py): shapes, per-image independence, the SPMD empty case, training."""

import pytest
import torch

from core_helpers import micro_model, random_batch
from transfusion.config import ModelConfig
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.losses import transfusion_loss
from transfusion.images import patchify
from transfusion.model.transfusion import Transfusion
from transfusion.model.patch import UNetPatch


def _unet(size=28, k=4, channels=3, width=8, blocks=1, seed=0) -> UNetPatch:
    torch.manual_seed(seed)
    enc = UNetPatch(channels, size, k, dim=32, width=width, blocks=blocks)
    enc.init_weights(0.02)
    with torch.no_grad():  # residual branches and the output start at zero; randomise them for the tests
        for m in enc.modules():
            if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
                torch.nn.init.normal_(m.weight, std=0.1)
    return enc


@pytest.mark.parametrize("size,k,levels", [(28, 4, 2), (8, 2, 1), (8, 1, 0)])
def test_shapes_and_levels(size, k, levels):
    enc = _unet(size, k)
    n = (size // k) ** 2
    x, t = torch.randn(3 * n, 3 * k * k), torch.arange(3).repeat_interleave(n) * 300
    h, ctx = enc.encode(x, t)
    assert h.shape == (3 * n, 32) and len(enc.downs) == levels and len(ctx[1]) == levels
    assert enc.decode(torch.randn_like(h), ctx).shape == x.shape


def test_images_are_encoded_and_decoded_independently():
    """Two images in one call == each alone: no mixing across images (the transformer's mask decides that)."""
    enc = _unet().eval()
    n = 49
    x, t = torch.randn(2 * n, 48), torch.tensor([100] * n + [900] * n)
    h_both, ctx_both = enc.encode(x, t)
    hidden = torch.randn(2 * n, 32)
    eps_both = enc.decode(hidden, ctx_both)
    for i in range(2):
        sl = slice(i * n, (i + 1) * n)
        h_one, ctx_one = enc.encode(x[sl], t[sl])
        assert torch.allclose(h_one, h_both[sl], atol=1e-5)
        assert torch.allclose(enc.decode(hidden[sl], ctx_one), eps_both[sl], atol=1e-5)


def test_encoding_follows_reading_order_and_is_local():
    """A change in the top-left pixel moves the top-left patches' encodings most, the bottom-right one only
    through the layer norms' image-wide statistics."""
    enc = _unet().eval()
    img = torch.randn(1, 3, 28, 28)
    bumped = img.clone()
    bumped[0, :, 0, 0] += 5.0
    t = torch.full((49,), 300)
    h0, _ = enc.encode(patchify(img, 4)[0], t)
    h1, _ = enc.encode(patchify(bumped, 4)[0], t)
    change = (h1 - h0).norm(dim=-1)  # (49,) reading order
    assert int(change.argmax()) in (0, 1, 7, 8)  # the 2x2 patches around the pixel (convs cross borders)
    assert float(change[-1]) < 0.1 * float(change.max())


def test_timestep_changes_the_encoding():
    enc = _unet().eval()
    x = torch.randn(49, 48)
    a, _ = enc.encode(x, torch.full((49,), 10))
    b, _ = enc.encode(x, torch.full((49,), 900))
    assert not torch.allclose(a, b)


def test_partial_images_and_odd_patch_sizes_are_errors():
    enc = _unet()
    with pytest.raises(ValueError, match="whole images"):
        enc.encode(torch.randn(50, 48), torch.zeros(50, dtype=torch.long))
    with pytest.raises(ValueError, match="power-of-two"):
        UNetPatch(3, 24, 3, dim=32)


def test_untrained_unet_model_predicts_zero_eps_and_text_only_batches_backprop():
    torch.manual_seed(0)
    model = Transfusion(ModelConfig.from_name("micro", patch_encoder="unet", unet_width=8))
    model.init_weights()
    b = random_batch(model.cfg, B=2, L=48, seed=3)
    with torch.no_grad():
        eps = model(b.tokens, b.image_ids, b.doc_ids, b.positions, b.patches, torch.full((b.patches.shape[0],), 9)).diffusion
    assert eps.abs().max() == 0
    text = random_batch(model.cfg, B=2, L=32, seed=0, max_images=0)
    transfusion_loss(model, text, NoiseSchedule()).loss.backward()
    assert all(p.grad is not None for p in model.patch.parameters())  # every rank calls every module (FSDP)


def test_unet_model_overfits_a_fixed_mixed_batch():
    model = micro_model(seed=0, patch_encoder="unet", unet_width=8).train()
    b = random_batch(model.cfg, B=2, L=48, seed=7, max_docs=1)
    assert b.num_images >= 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        out = transfusion_loss(model, b, NoiseSchedule(), generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.diffusion_loss))
    assert losses[-1] < losses[0] / 10, losses


def test_patch_pos_emb_with_unet_tells_positions_of_a_flat_image_apart():
    """On a flat image every interior patch gets the same U-Net encoding; the position embedding separates them."""
    x = torch.full((49, 48), -1.0)  # one all-background 28x28 image in 4x4 patches
    t = torch.full((49,), 100)
    for pos, distinct in ((False, False), (True, True)):
        torch.manual_seed(0)
        enc = UNetPatch(3, 28, 4, dim=32, width=8, pos_emb=pos)
        enc.init_weights(0.02)
        h, _ = enc.encode(x, t)  # (49, 32); patches 16 and 24 are interior, away from the zero padding
        assert torch.allclose(h[16], h[24], atol=1e-6) != distinct
    assert ModelConfig.from_name("micro", patch_encoder="unet", patch_pos_emb=True).patch_pos_emb


def test_unet_attention_mixes_positions_within_an_image_only():
    """GridAttention: every position of an image reads every other (a change at one corner reaches the opposite
    one through the attention branch alone), never another image's; and the U-Net wires it in, down and up."""
    from transfusion.model.patch import GridAttention

    torch.manual_seed(0)
    attn = GridAttention(16, head_dim=8)
    torch.nn.init.normal_(attn.proj.weight, std=0.5)
    x = torch.randn(2, 16, 7, 7)
    x2 = x.clone()
    x2[0, :, 0, 0] += 3.0
    delta = attn(x2) - attn(x)
    assert delta[0, :, 6, 6].abs().max() > 1e-3  # the far corner sees it (the residual alone would not change it)
    assert torch.equal(delta[1], torch.zeros_like(delta[1]))  # the other image does not
    enc = UNetPatch(3, 28, 4, dim=32, width=8, attention=True)
    enc.init_weights(0.02)
    xs, t = torch.randn(49, 48), torch.full((49,), 10)
    h0, ctx = enc.encode(xs, t)
    out0 = enc.decode(h0, ctx)
    with torch.no_grad():
        torch.nn.init.normal_(enc.attn_down.proj.weight, std=0.5)
    assert not torch.allclose(enc.encode(xs, t)[0], h0)  # attn_down is on the encoder path
    with torch.no_grad():
        torch.nn.init.normal_(enc.attn_up.proj.weight, std=0.5)
        torch.nn.init.normal_(enc.conv_out.weight, std=0.5)
    out1 = enc.decode(h0, ctx)
    enc.attn_up.proj.weight.data.zero_()
    assert not torch.allclose(enc.decode(h0, ctx), out1)  # attn_up is on the decoder path
    assert out0.shape == out1.shape == (49, 48)


def test_unet_attention_starts_as_identity_and_old_checkpoints_read_without_it(tmp_path):
    from transfusion import config as config_mod

    torch.manual_seed(0)
    a = UNetPatch(3, 28, 4, dim=32, width=8, attention=True)
    b = UNetPatch(3, 28, 4, dim=32, width=8, attention=False)
    a.init_weights(0.02)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("attn_")})
    x, t = torch.randn(49, 48), torch.full((49,), 10)
    assert torch.allclose(a.encode(x, t)[0], b.encode(x, t)[0], atol=1e-6)  # zero-init attention = identity
    saved = tmp_path / "config.toml"
    saved.write_text('[model]\npreset = "micro"\npatch_encoder = "unet"\n')
    assert config_mod.load(saved, saved=True).model.unet_attention is False  # written before the key existed
    assert config_mod.load(saved).model.unet_attention is True  # a user's config gets the paper's default


def test_unet_enc_norm_normalises_each_image_before_the_projection_and_is_off_by_default():
    assert ModelConfig().unet_enc_norm is False
    torch.manual_seed(0)
    enc = UNetPatch(3, 28, 4, dim=32, width=8, enc_norm=True)
    enc.init_weights(0.02)
    seen = []
    enc.to_dim.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    n = 49
    x = 5.0 * torch.randn(2 * n, 48) + 3.0  # far from unit scale: the norm must undo it
    enc.encode(x, torch.tensor([100, 900]).repeat_interleave(n))
    feats = seen[0].flatten(1)  # (N, c * g * g): one layer norm over each image's features
    assert torch.allclose(feats.mean(1), torch.zeros(2), atol=1e-4)
    assert torch.allclose(feats.std(1, unbiased=False), torch.ones(2), atol=1e-3)
    assert UNetPatch(3, 28, 4, dim=32, width=8).norm_enc is None


def test_unet_without_skips_decodes_from_the_transformer_alone():
    """model.unet_skips=false: the up blocks read only h (and t), so the same h decodes the same for any x_t;
    with skips (the default) the decoder also reads x_t through the skip activations."""
    assert ModelConfig().unet_skips is True
    n, t = 49, torch.full((49,), 300)
    x1, x2, h = torch.randn(n, 48), torch.randn(n, 48), torch.randn(n, 32)
    for skips in (False, True):
        torch.manual_seed(0)
        enc = UNetPatch(3, 28, 4, dim=32, width=8, skips=skips)
        enc.init_weights(0.02)
        with torch.no_grad():
            for m in enc.modules():
                if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
                    torch.nn.init.normal_(m.weight, std=0.1)
        (_, ctx1), (_, ctx2) = enc.encode(x1, t), enc.encode(x2, t)
        same = torch.allclose(enc.decode(h, ctx1), enc.decode(h, ctx2), atol=1e-6)
        assert same is (not skips)
        assert enc.decode(h, ctx1).shape == x1.shape
    model = Transfusion(ModelConfig.from_name("micro", patch_encoder="unet", unet_width=8, unet_skips=False))
    assert all(b[0].skip.__class__ is torch.nn.Identity for b in model.patch.up_blocks)  # no concat: c_in == c_out


def test_unet_out_rms_fixes_the_scale_of_every_image_position():
    """model.unet_out_rms > 0: each position's encoding has zero mean and exactly that rms over the width, however
    large the encoder's features grow; 0 (the default) leaves the projection as it is."""
    assert ModelConfig().unet_out_rms == 0.0
    n, t = 49, torch.tensor([100, 900]).repeat_interleave(49)
    x = 5.0 * torch.randn(2 * n, 48) + 3.0
    torch.manual_seed(0)
    enc = UNetPatch(3, 28, 4, dim=32, width=8, out_rms=0.15)
    enc.init_weights(0.02)
    with torch.no_grad():
        enc.to_dim.weight.mul_(100.0)  # a grown projection
    h, _ = enc.encode(x, t)
    assert torch.allclose(h.mean(-1), torch.zeros(2 * n), atol=1e-5)
    assert torch.allclose(h.pow(2).mean(-1).sqrt(), torch.full((2 * n,), 0.15), atol=1e-3)
    torch.manual_seed(0)
    plain = UNetPatch(3, 28, 4, dim=32, width=8)
    plain.init_weights(0.02)
    with torch.no_grad():
        plain.to_dim.weight.mul_(100.0)
    assert plain.encode(x, t)[0].pow(2).mean().sqrt() > 1.0  # unnormalised: the grown projection's scale
