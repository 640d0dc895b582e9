"""A detector family's recipe: everything that main.py, the engine and datasets/ need to know
about a family, in one record. Each family module (models/detr.py, models/deformable_detr.py,
models/rtdetr.py) defines its FAMILY; models/__init__.py lists them."""
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from util.errors import UserInputError

# Upstream's class head for COCO: category ids 1..90, one logit each.
COCO_NUM_CLASSES = 91


def no_unused_parameters(args):
    return False


def no_checks(args):
    pass


@dataclass(frozen=True)
class DetectorFamily:
    """name: the value of --model.
    build(args, category_ids) -> (model, criterion, postprocessors); category_ids: the dataset's
        category ids, sorted, or None when the model is built without a dataset.
    param_groups(model, args) -> the optimizer's parameter groups.
    defaults: this family's default of every flag whose upstream default differs between the
        families (the parser's own defaults are DETR's); --help lists them.
    add_args(parser): adds the family's own flags (None: it has none).
    data_pipeline: the transforms of datasets/ it trains and evaluates with ('detr', 'rtdetr').
    sync_batchnorm: under DDP on CUDA, batch norms use the statistics of the global batch.
    find_unused_parameters(args): whether DDP must look for parameters without a gradient.
    check_args(args): refuses, with a UserInputError, flag combinations the family cannot run;
        called before anything is loaded or built.
    """
    name: str
    build: Callable
    param_groups: Callable
    defaults: Mapping[str, Any] = field(default_factory=dict)
    add_args: Callable | None = None
    data_pipeline: str = "detr"
    sync_batchnorm: bool = False
    find_unused_parameters: Callable = no_unused_parameters
    check_args: Callable = no_checks


def param_groups_by_name(model, args, extra_groups=()):
    """Upstream DETR's and Deformable DETR's groups: parameters whose name contains one of
    --lr_backbone_names at --lr_backbone, then each of extra_groups, (name keywords, lr), and
    the rest at --lr (the first group)."""
    def matches(name, keywords):
        return any(k in name for k in keywords)

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    special = [args.lr_backbone_names] + [keywords for keywords, _ in extra_groups]
    groups = [{"params": [p for n, p in params if not any(matches(n, k) for k in special)]},
              {"params": [p for n, p in params if matches(n, args.lr_backbone_names)], "lr": args.lr_backbone}]
    groups += [{"params": [p for n, p in params if matches(n, keywords)], "lr": lr} for keywords, lr in extra_groups]
    return groups


def num_classes_for(args, category_ids):
    """The head's largest class id + 1: --num_classes, else upstream's 91 for COCO. Refuses a
    dataset (category_ids; None: none given) with a category id the head cannot represent."""
    num_classes = args.num_classes if args.num_classes is not None else COCO_NUM_CLASSES
    if category_ids is not None and max(category_ids) >= num_classes:
        raise UserInputError(f"the dataset has category id {max(category_ids)}, but the class head has "
                             f"{num_classes} ids (0..{num_classes - 1}); pass --num_classes {max(category_ids) + 1}")
    return num_classes
