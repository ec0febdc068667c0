import torch

from core_helpers import micro_model, one_image_batch, random_batch
from transfusion.batch import IGNORE, make_lm_targets
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.losses import transfusion_loss


def test_lm_targets_skip_boi_inputs_patches_and_doc_boundaries():
    BOI, EOI = 3, 4
    tokens = torch.tensor([[1, 10, 11, BOI, 0, 0, 0, 0, EOI, 12, 2, 1, 13, 2]])
    image_ids = torch.tensor([[-1, -1, -1, -1, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1]])
    docs = torch.tensor([[0] * 11 + [1] * 3])
    tg = make_lm_targets(tokens, image_ids, docs)[0].tolist()
    assert tg[:3] == [10, 11, BOI]  # text predicts text and BOI
    assert tg[3] == IGNORE  # input BOI: no loss (fn. 8)
    assert tg[4:8] == [IGNORE] * 4  # no LM loss on patches (incl. the last patch -> EOI)
    assert tg[8:10] == [12, 2]  # EOI predicts the text after the image
    assert tg[10] == IGNORE  # no target across the document boundary
    assert tg[11:13] == [13, 2] and tg[13] == IGNORE


def test_diffusion_loss_is_per_image_mean_then_mean_over_images():
    model = micro_model()
    b = random_batch(model.cfg, B=2, L=64, seed=4)
    assert b.num_images >= 2
    g = torch.Generator().manual_seed(0)
    out = transfusion_loss(model, b, NoiseSchedule(), generator=g)
    # recompute by hand with the same draws
    g = torch.Generator().manual_seed(0)
    from transfusion.losses import noised_patches

    x_t, t, noise, img = noised_patches(b, NoiseSchedule(), g)
    with torch.no_grad():
        eps = model(b.tokens, b.image_ids, b.doc_ids, b.positions, x_t, t).diffusion
    per_image = [((eps[img == k] - noise[img == k]) ** 2).mean() for k in range(b.num_images)]
    assert torch.allclose(out.diffusion_loss, torch.stack(per_image).mean(), atol=1e-6)
    assert torch.allclose(out.loss, out.lm_loss + 5 * out.diffusion_loss)


def test_text_only_batch_has_zero_diffusion_loss_and_still_backprops():
    model = micro_model()
    b = random_batch(model.cfg, B=2, L=32, seed=0, max_images=0)
    out = transfusion_loss(model, b, NoiseSchedule())
    assert b.num_images == 0 and float(out.diffusion_loss) == 0.0
    out.loss.backward()
    assert model.patch.proj_in.weight.grad is not None  # patch encoder ran on zero patches (SPMD)


def test_tiny_model_overfits_a_fixed_mixed_batch():
    """Both losses fall >= 10x on one fixed batch with fixed noise and timesteps."""
    model = micro_model(seed=0).train()
    b = random_batch(model.cfg, B=2, L=48, seed=7, max_docs=1)
    assert b.num_images >= 1
    sched = NoiseSchedule()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for step in range(40):
        out = transfusion_loss(model, b, sched, generator=torch.Generator().manual_seed(0))
        if first is None:
            first = (float(out.lm_loss), float(out.diffusion_loss))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = (float(out.lm_loss), float(out.diffusion_loss))
    assert last[0] < first[0] / 10, (first, last)
    assert last[1] < first[1] / 10, (first, last)


def test_bf16_autocast_tracks_fp32_over_a_short_run():
    """bf16 autocast (the CPU fast path) follows the fp32 loss curve: every step within 3% relative."""
    curves = {}
    for bf16 in (False, True):
        model = micro_model(seed=0).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        losses = []
        for step in range(15):
            b = random_batch(model.cfg, B=2, L=48, seed=step, max_docs=2)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = transfusion_loss(model, b, NoiseSchedule(), generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss))
        curves[bf16] = torch.tensor(losses)
    rel = ((curves[True] - curves[False]).abs() / curves[False]).max()
    assert rel < 0.03, rel
    assert curves[True][-1] < curves[True][0] * 0.95  # and it is actually training (random tokens: LM floor)


def test_v_prediction_loss_regresses_v_with_the_same_draws():
    """diffusion.prediction = "v": the diffusion loss is the MSE to v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    from transfusion.losses import noised_patches

    model = micro_model()
    b = random_batch(model.cfg, B=2, L=64, seed=4)
    schedule = NoiseSchedule(prediction="v")
    out = transfusion_loss(model, b, schedule, generator=torch.Generator().manual_seed(0))
    x_t, t, noise, img = noised_patches(b, schedule, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = model(b.tokens, b.image_ids, b.doc_ids, b.positions, x_t, t).diffusion
    a = schedule.abar(t, noise)[:, None]
    v = a.sqrt() * noise - (1 - a).sqrt() * b.patches
    per_image = [((pred[img == k] - v[img == k]) ** 2).mean() for k in range(b.num_images)]
    assert torch.allclose(out.diffusion_loss, torch.stack(per_image).mean(), atol=1e-6)
    eps_out = transfusion_loss(model, b, NoiseSchedule(), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out.diffusion_loss, eps_out.diffusion_loss)


def test_min_snr_weighting_weights_each_image_by_its_timestep():
    """diffusion.loss_weighting = "min_snr": each image's mean squared error times min(SNR, 5) / SNR."""
    from transfusion.losses import noised_patches

    model = micro_model()
    b = random_batch(model.cfg, B=2, L=64, seed=4)
    schedule = NoiseSchedule(weighting="min_snr", min_snr_gamma=5.0)
    out = transfusion_loss(model, b, schedule, generator=torch.Generator().manual_seed(0))
    x_t, t, noise, img = noised_patches(b, schedule, torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = model(b.tokens, b.image_ids, b.doc_ids, b.positions, x_t, t).diffusion
    w = schedule.loss_weight(t)
    per_image = [w[img == k][0] * ((eps[img == k] - noise[img == k]) ** 2).mean() for k in range(b.num_images)]
    assert torch.allclose(out.diffusion_loss, torch.stack(per_image).mean(), atol=1e-6)
    plain = transfusion_loss(model, b, NoiseSchedule(), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out.diffusion_loss, plain.diffusion_loss)


def test_v_prediction_model_overfits_a_fixed_batch():
    model = micro_model(seed=0).train()
    b = random_batch(model.cfg, B=2, L=48, seed=7, max_docs=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        out = transfusion_loss(model, b, NoiseSchedule(prediction="v"), generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.diffusion_loss))
    assert losses[-1] < losses[0] / 10, losses
