"""The detector families. Each family module owns its recipe, a DetectorFamily named FAMILY
(models/family.py); this registry lists them. A new family is a module and a line here."""
from util.errors import UserInputError

from .deformable_detr import FAMILY as DEFORMABLE_DETR
from .detr import FAMILY as DETR
from .rtdetr import FAMILY as RTDETR

FAMILIES = {family.name: family for family in (DETR, DEFORMABLE_DETR, RTDETR)}
DEFAULT_FAMILY = DETR.name  # the parser's own defaults are DETR's


def build_model(args, category_ids=None):
    """(model, criterion, postprocessors) of the family args.model. category_ids: the dataset's
    sorted category ids (datasets.category_ids); None: no dataset, the family's defaults (COCO)."""
    if args.model not in FAMILIES:
        raise UserInputError(f"unknown --model {args.model!r}; use one of {', '.join(FAMILIES)}")
    family = FAMILIES[args.model]
    family.check_args(args)
    return family.build(args, category_ids)
