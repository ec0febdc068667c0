import torch

from core_helpers import ByteTokenizer, micro_model
from transfusion.config import ModelConfig
from transfusion.diffusion.samplers import DiffusionSampler, cfg_combine
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.decoding import Decoder, caption_images, generate, generate_images, sample_next

TK = ByteTokenizer()


def _model():
    return micro_model(vocab_size=TK.vocab_size)


def test_batched_cfg_equals_two_separate_passes():
    model, sched = _model(), NoiseSchedule()
    prompt = "a red sneaker"
    batched = generate_images(model, TK, [prompt], sched, steps=8, cfg_scale=3.0, sampler="ddim",
                              generator=torch.Generator().manual_seed(0), progress=False)
    # reference: conditional and unconditional contexts in separate decoders, combined by hand
    cond, uncond = Decoder(model, 1, TK.pad_id), Decoder(model, 1, TK.pad_id)
    cond.prefill([[[TK.bos_id] + TK.encode(prompt) + [TK.boi_id]]])
    uncond.prefill([[[TK.bos_id, TK.boi_id]]])
    smp = DiffusionSampler(sched, 8, "ddim", clip_x0=1.0)
    n, D = model.cfg.patches_per_image, model.cfg.patch_dim
    x = torch.randn((1, n, D), generator=torch.Generator().manual_seed(0))
    tokens, image_ids, docs, pos = cond._image_slots()
    for i, t in enumerate(smp.timesteps):
        eps = []
        for dec in (cond, uncond):
            tk, im, dc, ps = dec._image_slots()
            dec._run(tk, im, dc, ps, x.reshape(n, D), t.expand(n), commit=False, logits=False)
            eps.append(dec.last_out.view(1, n, D))
        x = smp.step(x, cfg_combine(eps[0], eps[1], 3.0), i)
    c = model.cfg
    ref = x.view(1, c.image_size // c.patch_size, c.image_size // c.patch_size, c.image_channels, c.patch_size,
                 c.patch_size).permute(0, 3, 1, 4, 2, 5).reshape(1, c.image_channels, c.image_size, c.image_size)
    assert (batched - ref).abs().max() < 1e-5


def test_left_padded_batch_equals_single_prompt():
    model, sched = _model(), NoiseSchedule()
    kw = dict(steps=5, cfg_scale=3.0, sampler="ddim", progress=False)
    both = generate_images(model, TK, ["a red dress", "a photo of a blue bag on black"], sched,
                           generator=torch.Generator().manual_seed(3), **kw)
    one = generate_images(model, TK, ["a red dress"], sched, generator=torch.Generator().manual_seed(3), **kw)
    assert both.shape == (2, 3, 8, 8)
    assert (both[0] - one[0]).abs().max() < 1e-5


def test_greedy_text_decoding_cached_equals_uncached_argmax():
    model = _model()
    prompt = [TK.bos_id] + TK.encode("to be or")
    dec = Decoder(model, 1, TK.pad_id)
    logits = dec.prefill([[prompt]])
    seq = list(prompt)
    for _ in range(6):
        nxt = int(logits.argmax(-1))
        L = len(seq)
        with torch.no_grad():
            full = model(torch.tensor([seq]), torch.full((1, L), -1), torch.zeros(1, L, dtype=torch.long),
                         torch.arange(L)[None], torch.zeros(0, model.cfg.patch_dim), torch.zeros(0, dtype=torch.long))
        assert (full.logits[0, -1] - logits[0]).abs().max() < 1e-5
        seq.append(nxt)
        logits = dec.append_tokens(torch.tensor([nxt]))


def test_caption_and_free_generation_run_end_to_end():
    model, sched = _model(), NoiseSchedule()
    imgs = torch.rand(2, 3, 8, 8) * 2 - 1
    caps = caption_images(model, TK, imgs, max_new_tokens=5)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    pieces = generate(model, TK, "once upon <boi>", sched, max_new_tokens=4, steps=3, progress=False)
    assert isinstance(pieces[0], torch.Tensor) and pieces[0].shape == (3, 8, 8)


def test_sample_next_greedy_and_top_p():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert sample_next(logits).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits[:1], 1.0, top_p=0.5, generator=g)) for _ in range(50)}
    assert draws == {1}  # nucleus keeps only the dominant token


def test_bf16_autocast_sampling_tracks_fp32():
    """The bf16 fast path of sampling (benchmarks' `--dtype bf16`) draws nearly the same DDIM image as fp32
    from the same noise: bf16 rounding does not compound into a different picture over the steps."""
    model, sched = _model(), NoiseSchedule()
    images = []
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            images.append(generate_images(model, TK, ["a red sneaker", "a blue bag"], sched, steps=20,
                                          cfg_scale=3.0, sampler="ddim", generator=torch.Generator().manual_seed(0),
                                          progress=False))
    diff = (images[0] - images[1]).abs()
    assert diff.mean() < 0.005 and diff.max() < 0.05, (diff.mean(), diff.max())  # measured 3e-5 and 6e-3
