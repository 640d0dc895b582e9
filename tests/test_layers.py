"""models/layers.py: the shared blocks; attend's choice of attention path."""
import torch
from torch import nn

from models.layers import MLP, attend, get_clones


def huge_logit_inputs():
    torch.manual_seed(0)
    x = (torch.randn(50, 2, 256) * 1e5).requires_grad_()
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[1, 30:] = True
    return x, mask


def test_attention_gradients_stay_finite_for_huge_logits_on_the_cpu():
    attention = nn.MultiheadAttention(256, 8)
    x, mask = huge_logit_inputs()
    attend(attention, x, x, x, key_padding_mask=mask).sum().backward()
    assert torch.isfinite(x.grad).all()
    # What attend avoids on the CPU: the fused kernel's gradients are not finite there.
    x.grad = None
    attention(x, x, x, key_padding_mask=mask, need_weights=False)[0].sum().backward()
    assert not torch.isfinite(x.grad).all()


def test_attend_equals_the_fused_path_on_ordinary_inputs():
    torch.manual_seed(1)
    attention = nn.MultiheadAttention(32, 4)
    q, k = torch.randn(7, 3, 32), torch.randn(11, 3, 32)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[2, 6:] = True
    fused = attention(q, k, k, key_padding_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(attend(attention, q, k, k, key_padding_mask=mask), fused, rtol=1e-5, atol=1e-6)


def test_mlp_and_clones():
    mlp = MLP(4, 8, 2, num_layers=3)
    assert [tuple(layer.weight.shape) for layer in mlp.layers] == [(8, 4), (8, 8), (2, 8)]
    x = torch.randn(5, 4)
    expected = mlp.layers[2](torch.relu(mlp.layers[1](torch.relu(mlp.layers[0](x)))))
    torch.testing.assert_close(mlp(x), expected)
    clones = get_clones(mlp, 2)
    assert clones[0] is not clones[1] and torch.equal(clones[0].layers[0].weight, mlp.layers[0].weight)
