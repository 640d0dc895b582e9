"""Model factory: picks the detector family from --model."""
from util.errors import UserInputError

from .detr import build as build_detr


def build_model(args):
    """Returns (model, criterion, postprocessors) for args.model (default 'detr')."""
    model = getattr(args, 'model', 'detr')
    if model == 'detr':
        return build_detr(args)
    raise UserInputError(f"unknown --model {model!r}; use detr")
