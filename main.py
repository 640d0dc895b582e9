"""Train, fine-tune or evaluate a DETR-family detector on COCO (or a COCO-format dataset), with
DAP-loss as an option (docs/DAP.md).

    python main.py --coco_path /data/coco --finetune https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth \
        --loss dap --matcher dap --output_dir outputs/detr_r50_dap
    torchrun --nproc_per_node=8 main.py ...   # data parallel, one process per GPU

What depends on the detector family (--model) is its recipe, models/<family>.py's FAMILY; this
file only runs it. docs/ARCHITECTURE.md describes the layout and a training step.
"""
import argparse
import contextlib
import datetime
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import util.misc as utils
from datasets import build_data_loaders, build_dataset, category_ids, get_coco_api_from_dataset
from datasets.coco_eval import BACKENDS as EVAL_BACKENDS
from datasets.coco_eval import resolve_backend as resolve_eval_backend
from engine import MixedPrecision, evaluate, train_one_epoch
from models import DEFAULT_FAMILY, FAMILIES, build_model
from models.ema import ModelEMA
from models.family import DetectorFamily
from models.set_criterion import LOSSES
from util import interrupts, preemption
from util.args import (
    OneLineParser,
    SelectFamily,
    add_unsupported_upstream_flags,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability_below_1,
    seed_int,
    set_family_defaults,
    unit_interval,
)
from util.checkpoint import (
    architecture_differences,
    fit_state_dict,
    load_checkpoint,
    model_state_from_checkpoint,
    restore_criterion,
    save_checkpoint,
    shapeless_differences,
)
from util.errors import TrainingDiverged, UserInputError
from util.logs import append_log, drop_log_lines_from, save_coco_eval, write_json
from util.output_dir import prepare_output_dir
from util.preemption import Preempted
from util.tensorboard import installed as tensorboard_installed
from util.tensorboard import training_board


def get_args_parser():
    """The command line of every script. Flags whose default differs between the detector
    families take the default of the family chosen with --model (DETR's without it), also in a
    child parser built with parents=[get_args_parser()]; --help lists every family's value."""
    parser = argparse.ArgumentParser("Set transformer detector", add_help=False)
    family = parser.add_argument("--model", action=SelectFamily, default=DEFAULT_FAMILY, choices=sorted(FAMILIES),
                                 help="detector family; sets the defaults that differ between families")
    parser.add_argument("--lr", default=1e-4, type=non_negative_float)
    parser.add_argument("--lr_backbone", default=1e-5, type=non_negative_float,
                        help="backbone learning rate; 0 freezes it")
    parser.add_argument("--lr_backbone_names", default=["backbone"], type=str, nargs="+",
                        help="parameters whose name contains one of these get --lr_backbone")
    parser.add_argument("--batch_size", default=2, type=positive_int,
                        help="images per process (per GPU) and micro-batch")
    parser.add_argument("--accum_iter", default=1, type=positive_int,
                        help="micro-batches accumulated per optimizer step")
    parser.add_argument("--total_batch_size", default=0, type=non_negative_int,
                        help="images per optimizer step over all processes; when set, --batch_size is derived from it")
    parser.add_argument("--weight_decay", default=1e-4, type=non_negative_float)
    parser.add_argument("--epochs", default=300, type=positive_int)
    parser.add_argument("--lr_drop", default=200, type=positive_int, help="StepLR step (epochs), gamma 0.1")
    parser.add_argument("--sgd", action="store_true", help="SGD (momentum 0.9) instead of AdamW")
    parser.add_argument("--clip_max_norm", default=0.1, type=non_negative_float,
                        help="gradient clipping max norm; 0 disables")
    parser.add_argument("--ema", dest="ema", action="store_true", default=False,
                        help="evaluate and save an exponential moving average of the weights")
    parser.add_argument("--no_ema", dest="ema", action="store_false")
    parser.add_argument("--ema_decay", default=0.9999, type=probability_below_1)
    parser.add_argument("--ema_warmups", default=2000, type=positive_int,
                        help="updates over which the EMA decay ramps up: decay * (1 - exp(-updates / warmups))")

    # Model parameters
    # * Backbone
    parser.add_argument("--backbone", default="resnet50", type=str,
                        help="torchvision ResNet name (RT-DETR: presnet18vd/34vd/50vd/101vd)")
    parser.add_argument("--dilation", action="store_true",
                        help="replace the stride of the last block by a dilation (DC5)")
    parser.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned", "v2", "v3"),
                        help="positional embedding on the image features")
    parser.add_argument("--backbone_norm", default="frozen", choices=("frozen", "batch"),
                        help="frozen: FrozenBatchNorm2d (upstream; for ImageNet weights); batch: BatchNorm2d with "
                             "batch statistics, for a backbone trained from scratch")
    parser.add_argument("--no_pretrained_backbone", dest="pretrained_backbone", action="store_false",
                        help="do not fetch ImageNet backbone weights (implied by --finetune/--resume)")
    # * Transformer
    parser.add_argument("--enc_layers", default=6, type=non_negative_int)
    parser.add_argument("--dec_layers", default=6, type=positive_int)
    parser.add_argument("--dim_feedforward", default=2048, type=positive_int)
    parser.add_argument("--hidden_dim", default=256, type=positive_int, help="embedding size of the transformer")
    parser.add_argument("--dropout", default=0.1, type=probability_below_1)
    parser.add_argument("--nheads", default=8, type=positive_int)
    parser.add_argument("--num_queries", default=100, type=positive_int)
    parser.add_argument("--pre_norm", action="store_true")
    parser.add_argument("--dec_n_points", default=4, type=positive_int,
                        help="Deformable DETR and RT-DETR: sampling points per decoder head")
    parser.add_argument("--num_classes", default=None, type=positive_int,
                        help="max category id + 1 (default: 91 for COCO)")

    # Loss
    parser.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                        help="disable the losses on intermediate decoder layers")
    # * Matcher
    parser.add_argument("--set_cost_class", default=1, type=non_negative_float,
                        help="class weight in the matching cost")
    parser.add_argument("--set_cost_bbox", default=5, type=non_negative_float,
                        help="L1 box weight in the matching cost")
    parser.add_argument("--set_cost_giou", default=2, type=non_negative_float, help="GIoU weight in the matching cost")
    # * Loss coefficients
    parser.add_argument("--cls_loss_coef", default=1, type=non_negative_float, help="weight of the classification loss")
    parser.add_argument("--bbox_loss_coef", default=5, type=non_negative_float)
    parser.add_argument("--giou_loss_coef", default=2, type=non_negative_float)
    parser.add_argument("--eos_coef", default=0.1, type=unit_interval, help="relative weight of the no-object class")
    # * DAP-loss (docs/DAP.md)
    parser.add_argument("--loss", default="raw", choices=tuple(LOSSES),
                        help="upstream losses, DAP-loss only, or both summed; or a ranking loss (docs/LOSSES.md): "
                             "ap = AP-Loss instead of the classification loss, beside the upstream box losses; "
                             "alrp = aLRP Loss instead of both, with its self-balanced localisation component; "
                             "rs = Rank & Sort Loss instead of the classification loss, with its self-balanced GIoU "
                             "loss. Every ranking loss ranks the log-odds of the same positives and negatives as DAP "
                             "(--dap_neg_topk) over the step's whole batch")
    parser.add_argument("--matcher", default="hungarian", choices=("hungarian", "dap"),
                        help="upstream matching cost, or the AP cost of Eq. 11")
    parser.add_argument("--dap_cost_mode", default="constant", choices=("constant", "momentum"),
                        help="precision table of the AP-cost matcher: constant 1/N or a moving average")
    parser.add_argument("--dap_momentum", default=0.9, type=probability_below_1, help="m of the momentum matcher")
    parser.add_argument("--dap_bins", default=32, type=positive_int, help="N, the number of score thresholds")
    parser.add_argument("--dap_sigma", default=0.05, type=positive_float, help="sigma of the Gaussian score smoothing")
    parser.add_argument("--dap_num_gt", default=256, type=non_negative_int,
                        help="G, the DAP normaliser; 0 = the true number of boxes in the global batch")
    parser.add_argument("--dap_neg_topk", default=100, type=non_negative_int,
                        help="negatives kept per image for sigmoid models; 0 = all")
    parser.add_argument("--dap_loss_coef", default=1.0, type=non_negative_float,
                        help="weight of loss_dap and its auxiliary copies")
    # * the ranking losses (docs/LOSSES.md)
    parser.add_argument("--rank_delta", default=None, type=positive_float,
                        help="delta, the width of the smoothed step in log-odds; default: the loss's paper "
                             "(AP-Loss 1.0, aLRP 1.0, RS 0.5)")
    parser.add_argument("--rank_loss_coef", default=1.0, type=non_negative_float,
                        help="weight of the ranking loss's terms and their auxiliary copies")

    # Dataset parameters
    parser.add_argument("--dataset_file", default="coco", choices=("coco",), help="COCO-format data (upstream flag)")
    parser.add_argument("--coco_path", type=str, help="folder with train2017/ val2017/ annotations/")
    parser.add_argument("--input_scale", default=1.0, type=positive_float,
                        help="multiply every image size of the transforms (0.25 makes CPU runs practical)")
    parser.add_argument("--no_train_augmentation", dest="train_augmentation", action="store_false",
                        help="train with the evaluation transforms (deterministic inputs, e.g. for exact comparisons)")

    parser.add_argument("--output_dir", default="", help="where to save checkpoints and logs; empty = no saving")
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--amp", action="store_true",
                        help="mixed-precision training: float16 autocast and a GradScaler on CUDA, bfloat16 "
                             "autocast on the CPU; losses and evaluation stay in float32")
    parser.add_argument("--seed", default=42, type=seed_int)
    parser.add_argument("--resume", default="", help="resume training from a checkpoint (path or URL)")
    parser.add_argument("--finetune", default="", metavar="PATH_OR_URL",
                        help="load model weights only (not optimizer, scheduler or epoch), e.g. a released checkpoint")
    parser.add_argument("--finetune_drop_class_head", action="store_true",
                        help="with --finetune: re-initialise the class head (another --num_classes)")
    parser.add_argument("--checkpoint_period", default=100, type=positive_int,
                        help="keep checkpointNNNN.pth every this many epochs (and before each lr drop)")
    parser.add_argument("--start_epoch", default=0, type=non_negative_int, metavar="N")
    parser.add_argument("--eval", action="store_true", help="only evaluate")
    parser.add_argument("--eval_backend", default="auto", choices=("auto", *EVAL_BACKENDS),
                        help="the COCO evaluation library; all give pycocotools' numbers bit for bit. auto: the "
                             "fastest installed (hotcoco, a requirement, ~100x pycocotools at COCO val's size)")
    parser.add_argument("--overwrite", action="store_true",
                        help="train into an --output_dir that holds another run, removing its logs and checkpoints "
                             "(without it such a folder is refused; --resume continues the run instead)")
    parser.add_argument("--num_workers", default=2, type=non_negative_int)
    parser.add_argument("--print_freq", default=10, type=positive_int, help="iterations between progress lines")
    parser.add_argument("--log_iterations", action="store_true",
                        help="also write iterations.jsonl to --output_dir: the logged values of each optimisation step")
    parser.add_argument("--tensorboard", dest="tensorboard", action="store_true", default=None,
                        help="write TensorBoard logs to --output_dir/tb (default: when the tensorboard package is "
                             "installed)")
    parser.add_argument("--no_tensorboard", dest="tensorboard", action="store_false")

    # distributed training parameters
    parser.add_argument("--world_size", default=1, type=positive_int, help="number of distributed processes")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    parser.add_argument("--dist_timeout", default=30, type=positive_float,
                        help="minutes a process waits for the others in a collective operation before it stops "
                             "with an error naming itself (a process that died, hung or was stopped)")

    for detector in FAMILIES.values():
        if detector.add_args is not None:
            detector.add_args(parser)
    add_unsupported_upstream_flags(parser)
    set_family_defaults(parser, family, {name: detector.defaults for name, detector in FAMILIES.items()})
    return parser


def check_family_flags(args):
    """A flag of another family's own group (Deformable DETR's --two_stage, RT-DETR's
    --num_denoising, ...) set to something else than its default does nothing under --model:
    most likely --model was forgotten."""
    for family in FAMILIES.values():
        if family.name == args.model or family.add_args is None:
            continue
        probe = argparse.ArgumentParser(add_help=False)
        family.add_args(probe)
        for action in probe._actions:
            default = FAMILIES[args.model].defaults.get(action.dest, action.default)
            if getattr(args, action.dest, default) != default:
                raise UserInputError(f"{action.option_strings[0]} is a flag of --model {family.name}; with --model "
                                     f"{args.model} it does nothing: add --model {family.name}, or drop it")


def check_args(args, cuda_available=None):
    """Refuse flag combinations that cannot work, before anything is loaded or built (the
    parser has checked each value's range). cuda_available: whether the machine that will run
    has CUDA (default: this one; run_with_submitit checks a job for a GPU node from a login node)."""
    if args.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", args.device):
        raise UserInputError(f"--device {args.device} is not supported; use cuda, cuda:N or cpu")
    here = cuda_available is None
    if here:
        cuda_available = torch.cuda.is_available()
    if args.device.startswith("cuda") and not cuda_available:
        raise UserInputError(f"--device {args.device} was requested but CUDA is not available; pass --device cpu")
    index = torch.device(args.device).index
    if here and index is not None and index >= torch.cuda.device_count():
        raise UserInputError(f"--device {args.device}, but this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}; pick one of them")
    if args.hidden_dim % args.nheads:
        raise UserInputError(f"--hidden_dim {args.hidden_dim} is not divisible by --nheads {args.nheads}; "
                             "change one of them")
    if round(800 * args.input_scale) < 32:
        raise UserInputError(f"--input_scale {args.input_scale} makes the images smaller than the backbone's "
                             "stride (32 px at 800 px times the scale); use at least 0.04")
    if not (args.set_cost_class or args.set_cost_bbox or args.set_cost_giou) and args.matcher == "hungarian":
        raise UserInputError("--set_cost_class, --set_cost_bbox and --set_cost_giou are all 0: the Hungarian "
                             "matcher has no cost; give one of them a weight")
    if args.matcher == "dap" and args.dap_cost_mode == "momentum" and LOSSES[args.loss].batch_loss != "dap":
        raise UserInputError(f"--dap_cost_mode momentum averages the precision of DAP-loss, which --loss {args.loss} "
                             f"does not compute: use --loss dap or raw+dap, or --dap_cost_mode constant")
    check_family_flags(args)
    FAMILIES[args.model].check_args(args)
    resolve_eval_backend(args.eval_backend)  # refuses a backend that is not installed
    if args.tensorboard and not tensorboard_installed():
        raise UserInputError("--tensorboard needs the tensorboard package: pip install tensorboard, or leave out "
                             "--tensorboard")
    if args.finetune and args.resume:
        raise UserInputError("--finetune and --resume are exclusive: --resume restores a whole training state")
    if args.finetune_drop_class_head and not args.finetune:
        raise UserInputError("--finetune_drop_class_head needs --finetune")
    if args.eval and not (args.resume or args.finetune):
        raise UserInputError("--eval evaluates the weights of a checkpoint: give it with --resume (or --finetune)")


def resolve_args(args):
    """What the checked flags imply, written into args (which checkpoints and logs record): the
    evaluation backend that --eval_backend auto picks; no ImageNet backbone weights under a
    checkpoint, which overwrites them (fetching them would be wasted, and fail offline)."""
    args.eval_backend = resolve_eval_backend(args.eval_backend)
    if args.finetune or args.resume:
        args.pretrained_backbone = False


def set_batch_size(args):
    """Derive the per-process micro-batch from --total_batch_size (after the world size is known)."""
    if args.total_batch_size > 0:
        shares = args.world_size * args.accum_iter
        if args.total_batch_size % shares:
            raise UserInputError(
                f"--total_batch_size {args.total_batch_size} is not divisible by {args.world_size} processes x "
                f"--accum_iter {args.accum_iter}; change one of them")
        args.batch_size = args.total_batch_size // shares
    print(f"Batch: {args.batch_size} images per process x {args.world_size} processes x "
          f"{args.accum_iter} accumulation steps = {args.batch_size * args.world_size * args.accum_iter} per step")


def build_optimizer(param_groups, args):
    """AdamW (or SGD) over the family's parameter groups, and StepLR (x0.1 every --lr_drop epochs)."""
    if args.sgd:
        optimizer = torch.optim.SGD(param_groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)


def wrap_for_processes(model, family, args):
    """The model as the training loop calls it: under DDP, wrapped (with SyncBatchNorm where the
    family wants the global batch's statistics); otherwise itself."""
    if not args.distributed:
        return model
    on_cuda = torch.device(args.device).type == "cuda"
    if family.sync_batchnorm and on_cuda:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[args.gpu] if on_cuda else None,
        find_unused_parameters=family.find_unused_parameters(args))


def data_layout(args):
    """What an epoch's batches and the processes' random numbers depend on: a mid-epoch
    checkpoint continues its epoch under the same only."""
    return {"processes": args.world_size, "--device": torch.device(args.device).type, "--batch_size": args.batch_size,
            "--accum_iter": args.accum_iter, "--seed": args.seed}


def check_data_layout(partial_epoch, epoch, args):
    """Refuse to continue the epoch a mid-epoch checkpoint stopped in under another data layout."""
    layout = data_layout(args)
    changed = [name for name in layout if partial_epoch["layout"].get(name) != layout[name]]
    if changed:
        def show(values):
            return ", ".join(f"{name} {values.get(name)}" for name in changed)
        raise UserInputError(f"--resume {args.resume} stopped in the middle of epoch {epoch} with "
                             f"{show(partial_epoch['layout'])}, but this run has {show(layout)}: resume with the "
                             "same to continue that epoch")


# A resumed run continues one training: the optimizer's flags (its state, the learning rates, the
# StepLR period and the parameter groups, is restored, so a changed value would be ignored or, for
# the groups, fail to load) and the loss's and the matcher's (a changed value would train the rest
# of the run with another recipe, and its log mix the two).
RESUMED_FLAGS = (
    "sgd", "lr", "lr_backbone", "weight_decay", "lr_drop", "lr_backbone_names", "lr_linear_proj_names",
    "lr_linear_proj_mult", "loss", "matcher", "aux_loss", "cls_loss_coef", "bbox_loss_coef", "giou_loss_coef",
    "eos_coef", "focal_alpha", "set_cost_class", "set_cost_bbox", "set_cost_giou", "dap_sigma", "dap_bins",
    "dap_num_gt", "dap_neg_topk", "dap_cost_mode", "dap_momentum", "dap_loss_coef", "rank_delta", "rank_loss_coef",
)


def check_resumed_flags(resumed_args, args):
    """Refuse a --resume whose training flags differ from those the checkpoint was trained with."""
    for flag in RESUMED_FLAGS:
        then, now = getattr(resumed_args, flag, None), getattr(args, flag, None)
        if then is not None and now is not None and then != now:
            raise UserInputError(
                f"--resume {args.resume} was trained with {flag}={then}, this run asks for {flag}={now}: a resumed "
                f"run continues the same training; give the checkpoint's value, or start a new run from its "
                "weights with --finetune")


def restore(args, finetune, resume, model, criterion, optimizer, lr_scheduler, amp):
    """Load the --finetune checkpoint (weights only) and the --resume one (the whole training
    state, unless --eval); either may be None. Returns the record of the epoch a mid-epoch
    checkpoint stopped in (save_partial_epoch), else None, and the optimisation steps the resumed
    run had done (None: not resumed, or a checkpoint from before they were kept)."""
    if finetune is not None:
        drop = model.class_head_prefixes if args.finetune_drop_class_head else ()
        fit_state_dict(model, model_state_from_checkpoint(finetune, args.finetune), source=args.finetune,
                       drop_prefixes=drop, trained_with=architecture_differences(finetune, args))
        print(f"Fine-tuning from {args.finetune}" + (" (class head re-initialised)" if drop else ""))
        silent = shapeless_differences(finetune, args)
        if silent:
            print(f"Note: {args.finetune} was trained with {', '.join(silent)}; this run sets them otherwise")
    if resume is None:
        return None, None
    fit_state_dict(model, model_state_from_checkpoint(resume, args.resume), source=args.resume,
                   trained_with=architecture_differences(resume, args))
    silent = shapeless_differences(resume, args)
    if silent:
        raise UserInputError(f"--resume {args.resume} was trained with {', '.join(silent)}, which its weights fit "
                             "either way but compute otherwise: give those flags")
    if args.eval or not all(k in resume for k in ("optimizer", "lr_scheduler", "epoch")):
        return None, None
    check_resumed_flags(resume.get("args"), args)
    partial_epoch = resume.get("partial_epoch")
    if partial_epoch is not None:
        check_data_layout(partial_epoch, resume["epoch"] + 1, args)
    restore_criterion(criterion, resume, args.resume)
    optimizer.load_state_dict(resume["optimizer"])
    lr_scheduler.load_state_dict(resume["lr_scheduler"])
    if amp.scaler.is_enabled() and "scaler" in resume:
        amp.scaler.load_state_dict(resume["scaler"])
    args.start_epoch = resume["epoch"] + 1
    steps_done = partial_epoch["steps_done"] if partial_epoch else 0
    print(f"Resumed from {args.resume}: continuing at epoch {args.start_epoch}"
          + (f", step {steps_done}" if partial_epoch else ""))
    if args.output_dir and utils.is_main_process():
        for log_name in ("log.txt", "iterations.jsonl"):
            drop_log_lines_from(Path(args.output_dir) / log_name, args.start_epoch, steps_done)
    return partial_epoch, resume.get("steps_done")


@dataclass
class Run:
    """What main builds once and every epoch uses."""
    family: DetectorFamily
    device: torch.device
    model: torch.nn.Module  # what the training loop calls: DDP-wrapped under torchrun
    model_without_ddp: torch.nn.Module
    criterion: torch.nn.Module
    postprocessors: dict
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    amp: MixedPrecision
    ema: ModelEMA | None
    partial_epoch: dict | None  # from a mid-epoch --resume checkpoint: where its epoch stopped
    steps_done: int | None  # optimisation steps since the run began; None: not known from --resume

    @property
    def n_parameters(self):
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def eval_model(self):
        return self.ema.module if self.ema is not None else self.model

    def checkpoint_state(self, epoch, args):
        """save_checkpoint's arguments, by name."""
        return dict(model=self.model_without_ddp, criterion=self.criterion, optimizer=self.optimizer,
                    lr_scheduler=self.lr_scheduler, epoch=epoch, args=args, ema=self.ema, scaler=self.amp.scaler,
                    steps_done=self.steps_done)


def setup(args):
    """Check the flags, join the process group, fix the batch, seed. Returns the device."""
    check_args(args)
    resolve_args(args)
    utils.init_distributed_mode(args)
    set_batch_size(args)
    print(utils.get_sha())
    print(args)
    # A different seed per rank, so the processes draw different dropout masks (DDP copies rank 0's
    # initial weights to every process; the augmentations follow the images: datasets/sampling.py).
    utils.seed_everything(args.seed, utils.get_rank())
    return torch.device(args.device)


def build_run(args, device):
    """The family's model, criterion and optimizer, restored from --finetune / --resume."""
    # Checkpoints first, data second: a bad checkpoint fails before anything reads the dataset.
    finetune = load_checkpoint(args.finetune) if args.finetune else None
    resume = load_checkpoint(args.resume) if args.resume else None
    family = FAMILIES[args.model]
    model_without_ddp, criterion, postprocessors = build_model(args, category_ids(args))
    model_without_ddp.to(device)
    model = wrap_for_processes(model_without_ddp, family, args)
    if args.distributed:
        model_without_ddp = model.module
    optimizer, lr_scheduler = build_optimizer(family.param_groups(model_without_ddp, args), args)
    amp = MixedPrecision(device, args.amp)
    partial_epoch, steps_done = restore(args, finetune, resume, model_without_ddp, criterion, optimizer,
                                        lr_scheduler, amp)
    # The average starts from the restored weights (a copy made now), or from the checkpoint's.
    ema = ModelEMA(model_without_ddp, args.ema_decay, args.ema_warmups) if args.ema else None
    if ema is not None and resume is not None and "ema" in resume:
        ema.load_state_dict(resume["ema"])
    if args.eval and ema is None and resume is not None and "ema" in resume:
        # the training's evaluations (log.txt) were of the average: these numbers will differ
        print(f"Note: evaluating the weights of {args.resume} ('model'); its training evaluated their moving "
              "average ('ema'): add --ema to evaluate that")
    run = Run(family, device, model, model_without_ddp, criterion, postprocessors, optimizer, lr_scheduler, amp, ema,
              partial_epoch, steps_done)
    print("number of params:", run.n_parameters)
    return run


def save_epoch(output_dir, epoch, log_stats, coco_evaluator, run, args):
    """log.txt, the evaluation arrays and the checkpoints of one epoch. Log, then checkpoint: a
    job stopped in between redoes this epoch after --resume (which drops the log lines of epochs
    it will redo) instead of never logging it."""
    if utils.is_main_process():
        append_log(output_dir / "log.txt", log_stats)
        (output_dir / "eval").mkdir(exist_ok=True)
        save_coco_eval(coco_evaluator, output_dir / "eval" / "latest.pth")
        if epoch % 50 == 49:
            save_coco_eval(coco_evaluator, output_dir / "eval" / f"{epoch:03}.pth")
    state = run.checkpoint_state(epoch, args)
    # Extra copies before each learning-rate drop and every checkpoint_period epochs, as upstream;
    # written before checkpoint.pth, which a resume reads: stopped in between, the epoch is redone
    # and its copy written again, never skipped.
    if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % args.checkpoint_period == 0:
        save_checkpoint(output_dir / f"checkpoint{epoch:04}.pth", **state)
    save_checkpoint(output_dir / "checkpoint.pth", **state)


def begin_epoch(epoch, partial_epoch, sampler_train, args):
    """Seed the epoch from (seed, rank, epoch) and set its data order. An epoch that a mid-epoch
    checkpoint stopped in (partial_epoch) goes on where it stopped: its batches done are left out
    and each process's random generators are back in their state."""
    utils.seed_everything(args.seed, utils.get_rank(), epoch)
    skip_batches = 0
    if partial_epoch is not None:
        utils.set_rng_state(partial_epoch["rng_states"][utils.get_rank()])
        skip_batches = partial_epoch["steps_done"] * args.accum_iter
    sampler_train.set_epoch(epoch, skip_batches)


def save_partial_epoch(output_dir, epoch, stopped, run, args):
    """checkpoint.pth of a run stopped on SIGUSR2 in `epoch`: the training state, with 'epoch' the
    last epoch finished, and in 'partial_epoch' what continuing this one exactly needs: its steps
    done and meters (`stopped`, from train_one_epoch), every process's random generators, and
    the data layout they hold for."""
    rng_states = utils.all_gather(utils.get_rng_state())  # every process takes part
    if output_dir is not None:
        partial_epoch = {**stopped, "rng_states": rng_states, "layout": data_layout(args)}
        save_checkpoint(output_dir / "checkpoint.pth", **run.checkpoint_state(epoch - 1, args),
                        partial_epoch=partial_epoch)
    if args.distributed:  # none exits before the file is written: torchrun ends the others when one exits
        torch.distributed.barrier()


def train(args, run, sampler_train, data_loader_train, data_loader_val, base_ds, output_dir):
    """Epochs --start_epoch..--epochs: train, evaluate, log, checkpoint. Returns the last log line.

    On SIGUSR2 (util/preemption.py) every process stops at the same step boundary, a mid-epoch
    checkpoint is saved and Preempted raised; a signal that arrives after an epoch's last step
    stops the run once that epoch's checkpoint is written (unless it was the last epoch)."""
    if args.start_epoch >= args.epochs:
        print(f"Nothing to train: epochs {args.start_epoch}..{args.epochs - 1} is empty (--epochs {args.epochs}); "
              "raise --epochs to train on")
    partial_epoch = run.partial_epoch
    print("Start training")
    start_time = time.time()
    n_parameters = run.n_parameters
    log_stats = {}
    steps_per_epoch = math.ceil(sampler_train.batches_per_epoch / args.accum_iter)
    if run.steps_done is None:  # a fresh run, or a checkpoint that did not keep the count
        run.steps_done = args.start_epoch * steps_per_epoch + (partial_epoch["steps_done"] if partial_epoch else 0)
    with training_board(args, output_dir, run.steps_done) as board:
        for epoch in range(args.start_epoch, args.epochs):
            first_step_of_epoch = partial_epoch["steps_done"] if partial_epoch else 0
            begin_epoch(epoch, partial_epoch, sampler_train, args)
            iteration_log = (output_dir / "iterations.jsonl"
                             if args.log_iterations and output_dir and utils.is_main_process() else None)
            try:
                train_stats, stopped = train_one_epoch(
                    run.model, run.criterion, data_loader_train, run.optimizer, run.device, epoch, args.clip_max_norm,
                    print_freq=args.print_freq, accum_iter=args.accum_iter, ema=run.ema, iteration_log=iteration_log,
                    amp=run.amp, stopped=partial_epoch, board=board)
            except TrainingDiverged as err:
                raise TrainingDiverged(f"{err}; {resume_hint(args)} (its weights are finite); lower --lr or clip "
                                       "harder (--clip_max_norm)") from None
            partial_epoch = None
            run.steps_done += (stopped["steps_done"] if stopped is not None else steps_per_epoch) - first_step_of_epoch
            if stopped is not None:
                if board is not None:
                    board.flush()  # the steps the checkpoint keeps are on disk before it
                save_partial_epoch(output_dir, epoch, stopped, run, args)
                raise Preempted(f"stopped on SIGUSR2 in epoch {epoch} after {stopped['steps_done']} of its "
                                f"{steps_per_epoch} steps; {resume_hint(args)}")
            run.lr_scheduler.step()

            test_stats, coco_evaluator = evaluate(run.eval_model, run.criterion, run.postprocessors, data_loader_val,
                                                  base_ds, run.device, print_freq=args.print_freq,
                                                  eval_backend=args.eval_backend)
            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                         **{f"test_{k}": v for k, v in test_stats.items()},
                         "epoch": epoch, "n_parameters": n_parameters}
            if board is not None:  # before the checkpoint: an epoch logged twice is redone and replaced
                board.log_epoch(epoch, log_stats)
            if output_dir is not None:
                save_epoch(output_dir, epoch, log_stats, coco_evaluator, run, args)
            if epoch + 1 < args.epochs and preemption.requested_anywhere():
                raise Preempted(f"stopped on SIGUSR2 after epoch {epoch}; {resume_hint(args)}")
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    return log_stats


def main(args):
    # Training stops at a step boundary on SIGUSR2 (preemption, time limit): util/preemption.py.
    with contextlib.nullcontext() if args.eval else preemption.recorded():
        return train_or_evaluate(args)


def train_or_evaluate(args):
    device = setup(args)
    # The output folder is locked while the run writes it (util/output_dir.py).
    with utils.on_main_process(prepare_output_dir, args) or contextlib.nullcontext():
        run = build_run(args, device)
        dataset_train = build_dataset("train", args, run.family.data_pipeline)
        dataset_val = build_dataset("val", args, run.family.data_pipeline)
        sampler_train, data_loader_train, data_loader_val = build_data_loaders(dataset_train, dataset_val, args)
        base_ds = get_coco_api_from_dataset(dataset_val)
        output_dir = Path(args.output_dir) if args.output_dir else None

        if not args.eval:
            return train(args, run, sampler_train, data_loader_train, data_loader_val, base_ds, output_dir)
        test_stats, coco_evaluator = evaluate(run.eval_model, run.criterion, run.postprocessors, data_loader_val,
                                              base_ds, device, print_freq=args.print_freq,
                                              eval_backend=args.eval_backend)
        if output_dir:
            save_coco_eval(coco_evaluator, output_dir / "eval.pth")
            if utils.is_main_process():
                write_json(output_dir / "eval_stats.json", {f"test_{k}": v for k, v in test_stats.items()})
        return test_stats


def lost_other_processes(args, error):
    """Whether a collective operation failed because another process died, hung or was stopped
    (torch.distributed's errors, and gloo's timeouts, which arrive as plain RuntimeErrors)."""
    if not getattr(args, "distributed", False):
        return False
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        sign in text for sign in ("Timed out", "timed out", "timeout", "Connection closed", "Connection reset"))


def resume_hint(args):
    """Where the run can continue from: its last checkpoint, if it wrote one."""
    checkpoint = Path(args.output_dir) / "checkpoint.pth" if args.output_dir else None
    if checkpoint is None or not checkpoint.is_file():
        return "no checkpoint was written yet"
    return f"the last checkpoint is {checkpoint}: continue with --resume {checkpoint}"


def run_cli(argv=None):
    parser = OneLineParser("DETR training and evaluation script", parents=[get_args_parser()])
    args = parser.parse_args(argv)
    # Ctrl-C and SIGTERM (a scheduler, kill) end the run; writes under way are finished first.
    interrupts.install()
    try:
        main(args)
    except UserInputError as e:
        # stderr, not print(): print is silenced on ranks other than 0
        sys.stderr.write(f"error: {e.one_line()}\n")
        sys.exit(e.exit_status)
    except Preempted as stop:
        sys.stderr.write(f"preempted: {stop}\n")
        sys.exit(stop.exit_status)
    except KeyboardInterrupt:
        sys.stderr.write(f"interrupted: {resume_hint(args)}\n")
        sys.exit(130)
    except RuntimeError as e:
        if not lost_other_processes(args, e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        silent = utils.silent_processes(args.world_size, args.rank) or "see the other processes' logs"
        sys.stderr.write(f"error: rank {args.rank} of {args.world_size} lost the other processes "
                         f"({first[:160]}): {silent}; {resume_hint(args)}\n")
        sys.exit(1)


if __name__ == "__main__":
    run_cli()
