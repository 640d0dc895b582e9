"""Model factory: picks the detector family from --model."""
from util.errors import UserInputError

from .deformable_detr import build as build_deformable_detr
from .detr import build as build_detr
from .rtdetr import build as build_rtdetr

# Flags whose upstream default depends on the detector (main.py's defaults are DETR's).
MODEL_DEFAULTS = {
    'detr': {},
    'deformable_detr': dict(lr=2e-4, lr_backbone=2e-5, epochs=50, lr_drop=40, dim_feedforward=1024,
                            num_queries=300, set_cost_class=2, cls_loss_coef=2, checkpoint_period=5),
    # RT-DETR R50 (rtdetr_r50vd_6x_coco): 72 epochs, batch 4 per GPU (x4), AdamW, MultiStepLR at
    # epoch 1000 (never), every epoch's checkpoint kept, EMA; the post-processor keeps 300 pairs,
    # hence 300 DAP negatives per image.
    'rtdetr': dict(lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, epochs=72, lr_drop=1000, clip_max_norm=0.1,
                   batch_size=4, backbone='presnet50vd', enc_layers=1, dec_layers=6, hidden_dim=256,
                   dim_feedforward=1024, dropout=0.0, nheads=8, num_queries=300, dec_n_points=4,
                   set_cost_class=2, set_cost_bbox=5, set_cost_giou=2, cls_loss_coef=1, bbox_loss_coef=5,
                   giou_loss_coef=2, lr_backbone_names=['backbone'], checkpoint_period=1, ema=True,
                   dap_neg_topk=300),
}


def build_model(args):
    """Returns (model, criterion, postprocessors) for args.model (default 'detr')."""
    model = getattr(args, 'model', 'detr')
    builders = {'detr': build_detr, 'deformable_detr': build_deformable_detr, 'rtdetr': build_rtdetr}
    if model not in builders:
        raise UserInputError(f"unknown --model {model!r}; use one of {', '.join(builders)}")
    return builders[model](args)
