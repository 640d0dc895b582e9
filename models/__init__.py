"""Model factory: picks the detector family from --model."""
from util.errors import UserInputError

from .deformable_detr import build as build_deformable_detr
from .detr import build as build_detr

# Flags whose upstream default depends on the detector (main.py's defaults are DETR's).
MODEL_DEFAULTS = {
    'detr': {},
    'deformable_detr': dict(lr=2e-4, lr_backbone=2e-5, epochs=50, lr_drop=40, dim_feedforward=1024,
                            num_queries=300, set_cost_class=2, cls_loss_coef=2, checkpoint_period=5),
}


def build_model(args):
    """Returns (model, criterion, postprocessors) for args.model (default 'detr')."""
    model = getattr(args, 'model', 'detr')
    builders = {'detr': build_detr, 'deformable_detr': build_deformable_detr}
    if model not in builders:
        raise UserInputError(f"unknown --model {model!r}; use one of {', '.join(builders)}")
    return builders[model](args)
