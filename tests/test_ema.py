"""The exponential moving average of the weights (--ema): update arithmetic and checkpointing."""
import io
import math

import pytest
import torch

from models.ema import ModelEMA


def test_ema_update_arithmetic():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9, warmups=2)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    model.train()
    model(torch.randn(4, 2))  # moves the BN statistics and its counter
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 2))
    assert ema.current_decay() == pytest.approx(d)
    for k, v in ema.module.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, d * start[k] + (1 - d) * model.state_dict()[k])
    assert ema.module[1].num_batches_tracked.item() == 0  # integer buffers are not averaged
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    previous = ema.module[0].weight.clone()
    ema.update(model)
    d2 = 0.9 * (1 - math.exp(-2 / 2))
    torch.testing.assert_close(ema.module[0].weight, d2 * previous + (1 - d2) * model[0].weight)
    assert ema.updates == 2


def test_ema_checkpoint_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(0.5)
        ema.update(model)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert checkpoint["ema"]["updates"] == 3 and checkpoint["ema"]["warmups"] == 2000

    restored = ModelEMA(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)))
    restored.load_state_dict(checkpoint["ema"])
    assert restored.updates == 3 and restored.current_decay() == ema.current_decay()
    for k, v in ema.module.state_dict().items():
        assert torch.equal(restored.module.state_dict()[k], v)
    assert not torch.equal(restored.module[0].weight, model[0].weight)
