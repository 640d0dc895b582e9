"""PResNet-vd, RT-DETR's backbone: a ResNet with a three-convolution stem, the stride of each
bottleneck on its 3x3 convolution, and average pooling before the 1x1 convolution of the
down-sampling shortcuts ("ResNet-D", He et al. 2019). Module names follow RT-DETR's, so its
released checkpoints load unchanged (`conv1.conv1_1`, `res_layers.N.blocks.M.branch2a`, ...)."""
from collections import OrderedDict

import torch.nn.functional as F
from torch import nn

from util.checkpoint import load_checkpoint
from util.errors import UserInputError
from util.misc import is_main_process

from .layers import FrozenBatchNorm2d

# depth -> blocks per stage
STAGE_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
STAGE_WIDTHS = [64, 128, 256, 512]
# The strides of the three feature maps the backbone returns (stages 2-4).
OUT_STRIDES = (8, 16, 32)
PRETRAINED_URLS = {
    depth: f"https://github.com/lyuwenyu/storage/releases/download/v0.1/{name}_pretrained_from_paddle.pth"
    for depth, name in [(18, "ResNet18_vd"), (34, "ResNet34_vd"), (50, "ResNet50_vd_ssld_v2"),
                        (101, "ResNet101_vd_ssld")]
}
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


def activation(name):
    return nn.Identity() if name is None else ACTIVATIONS[name]()


class ConvNormLayer(nn.Module):
    """Convolution without bias, batch norm, optional activation ('same' padding for odd kernels)."""

    def __init__(self, ch_in, ch_out, kernel_size, stride, act=None, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=(kernel_size - 1) // 2, bias=False)
        self.norm = norm_layer(ch_out)
        self.act = activation(act)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


def shortcut(ch_in, ch_out, stride, norm_layer):
    """Projection shortcut. Variant d averages 2x2 pixels instead of skipping 3 of them with a
    strided 1x1 convolution; the extra nesting gives the checkpoint name `short.conv.conv`."""
    if stride == 2:
        return nn.Sequential(OrderedDict([
            ("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)),
            ("conv", ConvNormLayer(ch_in, ch_out, 1, 1, norm_layer=norm_layer)),
        ]))
    return ConvNormLayer(ch_in, ch_out, 1, stride, norm_layer=norm_layer)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, ch_in, width, stride, project, norm_layer):
        super().__init__()
        self.branch2a = ConvNormLayer(ch_in, width, 3, stride, act="relu", norm_layer=norm_layer)
        self.branch2b = ConvNormLayer(width, width, 3, 1, norm_layer=norm_layer)
        if project:
            self.short = shortcut(ch_in, width, stride, norm_layer)

    def forward(self, x):
        short = self.short(x) if hasattr(self, "short") else x
        return F.relu(self.branch2b(self.branch2a(x)) + short)


class BottleNeck(nn.Module):
    expansion = 4

    def __init__(self, ch_in, width, stride, project, norm_layer):
        super().__init__()
        self.branch2a = ConvNormLayer(ch_in, width, 1, 1, act="relu", norm_layer=norm_layer)
        self.branch2b = ConvNormLayer(width, width, 3, stride, act="relu", norm_layer=norm_layer)
        self.branch2c = ConvNormLayer(width, width * self.expansion, 1, 1, norm_layer=norm_layer)
        if project:
            self.short = shortcut(ch_in, width * self.expansion, stride, norm_layer)

    def forward(self, x):
        short = self.short(x) if hasattr(self, "short") else x
        return F.relu(self.branch2c(self.branch2b(self.branch2a(x))) + short)


class Stage(nn.Module):
    """The blocks of one stage; the first one projects its input (and halves the resolution,
    except in the first stage, which follows the stem's max pooling)."""

    def __init__(self, block, ch_in, width, count, stride, norm_layer):
        super().__init__()
        self.blocks = nn.ModuleList(
            block(ch_in if i == 0 else width * block.expansion, width, stride if i == 0 else 1,
                  project=i == 0, norm_layer=norm_layer)
            for i in range(count))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class PResNet(nn.Module):
    """Returns the outputs of stages 3, 4, 5 (strides 8, 16, 32) as a list.

    R50/R101 use frozen batch norm everywhere and keep the stem frozen; R18/R34 train every
    layer with ordinary batch norm (RT-DETR's configurations).
    """

    def __init__(self, depth, train_backbone=True):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"PResNet: depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
        block = BottleNeck if depth >= 50 else BasicBlock
        frozen = depth >= 50
        norm_layer = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
        self.conv1 = nn.Sequential(OrderedDict(
            (name, ConvNormLayer(c_in, c_out, 3, stride, act="relu", norm_layer=norm_layer))
            for name, c_in, c_out, stride in [("conv1_1", 3, 32, 2), ("conv1_2", 32, 32, 1),
                                              ("conv1_3", 32, 64, 1)]))
        ch_in, stages = 64, []
        for i, (width, count) in enumerate(zip(STAGE_WIDTHS, STAGE_BLOCKS[depth])):
            stages.append(Stage(block, ch_in, width, count, 1 if i == 0 else 2, norm_layer))
            ch_in = width * block.expansion
        self.res_layers = nn.ModuleList(stages)
        self.out_channels = [w * block.expansion for w in STAGE_WIDTHS[1:]]
        self.out_strides = list(OUT_STRIDES)

        for name, parameter in self.named_parameters():
            if not train_backbone or (frozen and name.startswith("conv1.")):
                parameter.requires_grad_(False)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        outs = []
        for i, stage in enumerate(self.res_layers):
            x = stage(x)
            if i > 0:
                outs.append(x)
        return outs


BACKBONES = {f"presnet{depth}vd": depth for depth in STAGE_BLOCKS}


def build_presnet(name, train_backbone=True, pretrained=False):
    """PResNet-vd by name (presnet18vd, presnet34vd, presnet50vd, presnet101vd), optionally with
    RT-DETR's ImageNet weights (converted from PaddleClas)."""
    if name not in BACKBONES:
        raise UserInputError(f"unknown --backbone {name!r} for RT-DETR; use one of {', '.join(BACKBONES)}")
    depth = BACKBONES[name]
    model = PResNet(depth, train_backbone=train_backbone)
    # Only the main process downloads; DDP copies rank 0's weights (and buffers) to the others.
    if pretrained and is_main_process():
        url = PRETRAINED_URLS[depth]
        try:
            state = load_checkpoint(url)
        except UserInputError as e:
            raise UserInputError(f"{e}; or pass --no_pretrained_backbone") from None
        model.load_state_dict(state)
    return model
