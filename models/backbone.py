"""ResNet backbone with frozen batch norm, and the Joiner that adds positional encodings."""
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from util.errors import UserInputError
from util.misc import NestedTensor, is_main_process

from .layers import FrozenBatchNorm2d
from .position_encoding import build_position_encoding

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


class LayerGetter(nn.ModuleDict):
    """The children of a model up to the last one named in `return_layers`, run in order.

    Being a ModuleDict of the ResNet's own children keeps the state-dict names
    `body.conv1`, `body.layer1`, ... that the DETR checkpoints use.
    """

    def __init__(self, model, return_layers):
        remaining = set(return_layers)
        layers = OrderedDict()
        for name, module in model.named_children():
            if not remaining:
                break
            layers[name] = module
            remaining.discard(name)
        if remaining:
            raise ValueError(f"LayerGetter: {sorted(remaining)} are not children of the model")
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x):
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class BackboneBase(nn.Module):

    def __init__(self, backbone, train_backbone, return_layers, strides, num_channels):
        super().__init__()
        for name, parameter in backbone.named_parameters():
            # The stem and layer1 stay frozen even when the backbone is trained, as upstream.
            if not train_backbone or not name.startswith(("layer2", "layer3", "layer4")):
                parameter.requires_grad_(False)
        self.body = LayerGetter(backbone, return_layers)
        self.strides = strides
        self.num_channels = num_channels

    def forward(self, tensor_list: NestedTensor):
        xs = self.body(tensor_list.tensors)
        out = {}
        for name, x in xs.items():
            mask = F.interpolate(tensor_list.mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out[name] = NestedTensor(x, mask)
        return out


class Backbone(BackboneBase):
    """A torchvision ResNet with frozen batch norm.

    Returns the layer4 feature map as '0' or, with return_interm_layers (Deformable DETR's
    multi-scale input), layer2/3/4 as '0'/'1'/'2' (strides 8/16/32).
    """

    def __init__(self, name, train_backbone, dilation=False, pretrained=False, return_interm_layers=False,
                 norm="frozen"):
        if name not in RESNETS:
            raise UserInputError(f"unknown --backbone {name!r}; use one of {', '.join(RESNETS)}")
        if dilation and name in ("resnet18", "resnet34"):
            raise UserInputError(f"--dilation needs a bottleneck ResNet (resnet50/101), not {name}")
        # Only the main process downloads; the other ranks get rank 0's weights when DDP wraps the model.
        weights = None
        if pretrained and is_main_process():
            weights = torchvision.models.get_model_weights(name)["IMAGENET1K_V1"]
        try:
            backbone = getattr(torchvision.models, name)(
                weights=weights, replace_stride_with_dilation=[False, False, dilation],
                norm_layer=FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d)
        except OSError as e:  # URLError, timeouts, an unwritable cache folder
            raise UserInputError(
                f"could not download the ImageNet weights of {name} from {weights.url} ({e}); "
                "pass --no_pretrained_backbone or pre-seed $TORCH_HOME/hub/checkpoints with that file") from e
        # Output channels of layer2/3/4: basic blocks (resnet18/34) or bottlenecks (x4).
        channels = [128, 256, 512] if name in ("resnet18", "resnet34") else [512, 1024, 2048]
        strides = [8, 16, 32]
        if dilation:
            strides[-1] //= 2
        layers = ["layer2", "layer3", "layer4"] if return_interm_layers else ["layer4"]
        keep = slice(-len(layers), None)
        super().__init__(backbone, train_backbone, {layer: str(i) for i, layer in enumerate(layers)},
                         strides[keep], channels[keep])


class Joiner(nn.Sequential):
    """Backbone followed by the positional encoding of each returned feature map.

    Returns (features, positions): lists ordered by the backbone's output names, i.e. from
    the finest level to the coarsest.
    """

    def __init__(self, backbone, position_embedding):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, tensor_list: NestedTensor):
        xs = self[0](tensor_list)
        out, pos = [], []
        for _, x in sorted(xs.items()):
            out.append(x)
            pos.append(self[1](x).to(x.tensors.dtype))
        return out, pos


def build_backbone(args, return_interm_layers=False, sine_offset=0.0):
    """sine_offset: see PositionEmbeddingSine (DETR 0, Deformable DETR -0.5)."""
    position_embedding = build_position_encoding(args, sine_offset)
    backbone = Backbone(args.backbone, train_backbone=args.lr_backbone > 0, dilation=args.dilation,
                        pretrained=args.pretrained_backbone, return_interm_layers=return_interm_layers,
                        norm=args.backbone_norm)
    return Joiner(backbone, position_embedding)
