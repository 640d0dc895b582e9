"""RT-DETR's PResNet backbone: output channels and strides, freezing."""
import torch

from models.presnet import PResNet


def test_presnet_outputs_and_freezing():
    backbone = PResNet(18)
    outs = backbone(torch.rand(1, 3, 64, 96))
    assert [tuple(o.shape[1:]) for o in outs] == [(128, 8, 12), (256, 4, 6), (512, 2, 3)]
    assert backbone.out_channels == [128, 256, 512] and backbone.out_strides == [8, 16, 32]
    assert all(p.requires_grad for p in backbone.parameters())  # R18: everything trains
    assert not any(p.requires_grad for p in PResNet(18, train_backbone=False).parameters())  # --lr_backbone 0
