import torch

from transfusion.train.ema import EMA


def test_ema_decay_warms_up_with_the_step():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, 0.995)
    assert ema.decay_at(None) == 0.995
    assert abs(ema.decay_at(0) - 0.1) < 1e-12 and ema.decay_at(10**6) == 0.995
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.shadow["weight"].clone()
    ema.update(model, step=0)  # decay 0.1: the shadow moves 90% of the way to the new weights
    torch.testing.assert_close(ema.shadow["weight"], before + 0.9)
