"""Train, fine-tune or evaluate DETR on COCO (or a COCO-format dataset), with DAP-loss as an option.

    python main.py --coco_path /data/coco --finetune https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth \
        --loss dap --matcher dap --output_dir outputs/detr_r50_dap
    torchrun --nproc_per_node=8 main.py ...   # data parallel, one process per GPU
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

import util.misc as utils
from datasets import build_dataset, get_coco_api_from_dataset
from engine import MixedPrecision, evaluate, train_one_epoch
from models import MODEL_DEFAULTS, build_model
from models.ema import ModelEMA
from models.rtdetr import add_rtdetr_args, rtdetr_param_groups
from util.checkpoint import fit_state_dict, load_checkpoint, model_state_from_checkpoint
from util.errors import UserInputError


def get_args_parser():
    """The command line of every script. Defaults are DETR's; with --model X, the flags listed in
    models.MODEL_DEFAULTS[X] take that detector's upstream default (see parse_args)."""
    parser = argparse.ArgumentParser("Set transformer detector", add_help=False)
    parser.add_argument("--model", default="detr", choices=sorted(MODEL_DEFAULTS),
                        help="detector family; changes the defaults of the flags marked [model]")
    parser.add_argument("--lr", default=1e-4, type=float, help="[model]")
    parser.add_argument("--lr_backbone", default=1e-5, type=float,
                        help="[model] backbone learning rate; 0 freezes the backbone")
    parser.add_argument("--lr_backbone_names", default=["backbone.0"], type=str, nargs="+",
                        help="parameters whose name contains one of these get --lr_backbone")
    parser.add_argument("--lr_linear_proj_names", default=["reference_points", "sampling_offsets"], type=str,
                        nargs="+", help="Deformable DETR: parameters at lr * --lr_linear_proj_mult")
    parser.add_argument("--lr_linear_proj_mult", default=0.1, type=float)
    parser.add_argument("--batch_size", default=2, type=int, help="images per process (per GPU) and micro-batch")
    parser.add_argument("--accum_iter", default=1, type=int, help="micro-batches accumulated per optimizer step")
    parser.add_argument("--total_batch_size", default=0, type=int,
                        help="images per optimizer step over all processes; when set, --batch_size is derived from it")
    parser.add_argument("--weight_decay", default=1e-4, type=float)
    parser.add_argument("--epochs", default=300, type=int, help="[model]")
    parser.add_argument("--lr_drop", default=200, type=int, help="[model] StepLR step (epochs), gamma 0.1")
    parser.add_argument("--lr_drop_epochs", default=None, type=int, nargs="+", help="unused (upstream flag)")
    parser.add_argument("--sgd", action="store_true", help="Deformable DETR: SGD (momentum 0.9) instead of AdamW")
    parser.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm; 0 disables")

    # Model parameters
    parser.add_argument("--frozen_weights", type=str, default=None,
                        help="path to a pretrained model; only the mask head would be trained (segmentation: not supported)")
    # * Backbone
    parser.add_argument("--backbone", default="resnet50", type=str, help="torchvision ResNet name")
    parser.add_argument("--dilation", action="store_true",
                        help="replace the stride of the last block by a dilation (DC5)")
    parser.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned", "v2", "v3"),
                        help="positional embedding on the image features")
    parser.add_argument("--position_embedding_scale", default=2 * 3.141592653589793, type=float,
                        help="unused (upstream Deformable DETR flag)")
    parser.add_argument("--num_feature_levels", default=4, type=int, help="Deformable DETR: feature levels")
    parser.add_argument("--backbone_norm", default="frozen", choices=("frozen", "batch"),
                        help="frozen: FrozenBatchNorm2d (upstream; for ImageNet weights); batch: BatchNorm2d with "
                             "batch statistics, for a backbone trained from scratch")
    parser.add_argument("--no_pretrained_backbone", dest="pretrained_backbone", action="store_false",
                        help="do not fetch ImageNet backbone weights (implied by --finetune/--resume)")
    # * Transformer
    parser.add_argument("--enc_layers", default=6, type=int)
    parser.add_argument("--dec_layers", default=6, type=int)
    parser.add_argument("--dim_feedforward", default=2048, type=int, help="[model]")
    parser.add_argument("--hidden_dim", default=256, type=int, help="embedding size of the transformer")
    parser.add_argument("--dropout", default=0.1, type=float)
    parser.add_argument("--nheads", default=8, type=int)
    parser.add_argument("--num_queries", default=100, type=int, help="[model]")
    parser.add_argument("--pre_norm", action="store_true")
    parser.add_argument("--dec_n_points", default=4, type=int, help="Deformable DETR: sampling points per decoder head")
    parser.add_argument("--enc_n_points", default=4, type=int, help="Deformable DETR: sampling points per encoder head")
    parser.add_argument("--with_box_refine", action="store_true", help="Deformable DETR: iterative box refinement")
    parser.add_argument("--two_stage", action="store_true", help="Deformable DETR: two-stage proposals")
    parser.add_argument("--num_classes", default=None, type=int,
                        help="max category id + 1 (default: 91 for COCO)")
    # * Segmentation (upstream flag; not supported here)
    parser.add_argument("--masks", action="store_true", help="segmentation head (not supported)")

    # Loss
    parser.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                        help="disable the losses on intermediate decoder layers")
    # * Matcher
    parser.add_argument("--set_cost_class", default=1, type=float, help="[model] class weight in the matching cost")
    parser.add_argument("--set_cost_bbox", default=5, type=float, help="L1 box weight in the matching cost")
    parser.add_argument("--set_cost_giou", default=2, type=float, help="GIoU weight in the matching cost")
    # * Loss coefficients
    parser.add_argument("--mask_loss_coef", default=1, type=float)
    parser.add_argument("--dice_loss_coef", default=1, type=float)
    parser.add_argument("--cls_loss_coef", default=1, type=float, help="[model] weight of loss_ce")
    parser.add_argument("--bbox_loss_coef", default=5, type=float)
    parser.add_argument("--giou_loss_coef", default=2, type=float)
    parser.add_argument("--eos_coef", default=0.1, type=float, help="relative weight of the no-object class")
    parser.add_argument("--focal_alpha", default=0.25, type=float, help="Deformable DETR: focal loss alpha")
    # * DAP-loss (../docs: README "DAP-loss")
    parser.add_argument("--loss", default="raw", choices=("raw", "dap", "raw+dap"),
                        help="upstream losses, DAP-loss only, or both summed")
    parser.add_argument("--matcher", default="hungarian", choices=("hungarian", "dap"),
                        help="upstream matching cost, or the AP cost of Eq. 11")
    parser.add_argument("--dap_cost_mode", default="constant", choices=("constant", "momentum"),
                        help="precision table of the AP-cost matcher: constant 1/N or a moving average")
    parser.add_argument("--dap_momentum", default=0.9, type=float, help="m of the momentum matcher")
    parser.add_argument("--dap_bins", default=32, type=int, help="N, the number of score thresholds")
    parser.add_argument("--dap_sigma", default=0.05, type=float, help="sigma of the Gaussian score smoothing")
    parser.add_argument("--dap_num_gt", default=256, type=int,
                        help="G, the DAP normaliser; 0 = the true number of boxes in the global batch")
    parser.add_argument("--dap_neg_topk", default=100, type=int,
                        help="negatives kept per image for sigmoid models; 0 = all")
    parser.add_argument("--dap_loss_coef", default=1.0, type=float, help="weight of loss_dap and its auxiliary copies")

    # Dataset parameters
    parser.add_argument("--dataset_file", default="coco")
    parser.add_argument("--coco_path", type=str, help="folder with train2017/ val2017/ annotations/")
    parser.add_argument("--coco_panoptic_path", type=str)
    parser.add_argument("--remove_difficult", action="store_true")
    parser.add_argument("--cache_mode", action="store_true", help="unused (upstream Deformable DETR flag)")
    parser.add_argument("--input_scale", default=1.0, type=float,
                        help="multiply every image size of the transforms (0.25 makes CPU runs practical)")
    parser.add_argument("--no_train_augmentation", dest="train_augmentation", action="store_false",
                        help="train with the evaluation transforms (deterministic inputs, e.g. for exact comparisons)")

    parser.add_argument("--output_dir", default="", help="where to save checkpoints and logs; empty = no saving")
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--amp", action="store_true",
                        help="mixed-precision training: float16 autocast and a GradScaler on CUDA, bfloat16 "
                             "autocast on the CPU; losses and evaluation stay in float32")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--resume", default="", help="resume training from a checkpoint (path or URL)")
    parser.add_argument("--finetune", default="", metavar="PATH_OR_URL",
                        help="load model weights only (not optimizer, scheduler or epoch), e.g. a released checkpoint")
    parser.add_argument("--finetune_drop_class_head", action="store_true",
                        help="with --finetune: re-initialise the class head (another --num_classes)")
    parser.add_argument("--checkpoint_period", default=100, type=int,
                        help="[model] keep checkpointNNNN.pth every this many epochs (and before each lr drop)")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N")
    parser.add_argument("--eval", action="store_true", help="only evaluate")
    parser.add_argument("--num_workers", default=2, type=int)
    parser.add_argument("--print_freq", default=10, type=int, help="iterations between progress lines")
    parser.add_argument("--log_iterations", action="store_true",
                        help="also write iterations.jsonl to --output_dir: the logged values of every optimisation step")

    # distributed training parameters
    parser.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    add_rtdetr_args(parser)
    return parser


def check_args(args):
    """Refuse flag combinations that cannot work, before anything is built."""
    if args.masks or args.frozen_weights:
        raise UserInputError("--masks/--frozen_weights (segmentation) are not supported by dap-detr")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"--device {args.device} was requested but CUDA is not available; pass --device cpu")
    if args.finetune and args.resume:
        raise UserInputError("--finetune and --resume are exclusive: --resume restores a whole training state")
    if args.finetune_drop_class_head and not args.finetune:
        raise UserInputError("--finetune_drop_class_head needs --finetune")
    if args.finetune or args.resume:
        # The checkpoint overwrites the backbone: fetching ImageNet weights would be wasted (and fail offline).
        args.pretrained_backbone = False


def set_batch_size(args):
    """Derive the per-process micro-batch from --total_batch_size (after the world size is known)."""
    if args.accum_iter < 1:
        raise UserInputError(f"--accum_iter must be at least 1, got {args.accum_iter}")
    if args.total_batch_size > 0:
        shares = args.world_size * args.accum_iter
        if args.total_batch_size % shares:
            raise UserInputError(
                f"--total_batch_size {args.total_batch_size} is not divisible by {args.world_size} processes x "
                f"--accum_iter {args.accum_iter}; change one of them")
        args.batch_size = args.total_batch_size // shares
    print(f"Batch: {args.batch_size} images per process x {args.world_size} processes x "
          f"{args.accum_iter} accumulation steps = {args.batch_size * args.world_size * args.accum_iter} per step")


def build_optimizer(model_without_ddp, args):
    """AdamW (or SGD) and StepLR with the upstream parameter groups of each detector.

    DETR: parameters named '*backbone*' at lr_backbone (a learned position embedding,
    backbone.1, included), the rest at lr. Deformable DETR: a third group, the sampling
    offsets and reference points, at lr * lr_linear_proj_mult.
    """
    params = [(n, p) for n, p in model_without_ddp.named_parameters() if p.requires_grad]
    if args.model == "rtdetr":
        param_dicts = rtdetr_param_groups(model_without_ddp, args)
    elif args.model == "detr":
        param_dicts = [
            {"params": [p for n, p in params if "backbone" not in n]},
            {"params": [p for n, p in params if "backbone" in n], "lr": args.lr_backbone},
        ]
    else:
        def matches(name, keywords):
            return any(k in name for k in keywords)
        param_dicts = [
            {"params": [p for n, p in params if not matches(n, args.lr_backbone_names)
                        and not matches(n, args.lr_linear_proj_names)]},
            {"params": [p for n, p in params if matches(n, args.lr_backbone_names)], "lr": args.lr_backbone},
            {"params": [p for n, p in params if matches(n, args.lr_linear_proj_names)],
             "lr": args.lr * args.lr_linear_proj_mult},
        ]
    if args.sgd:
        optimizer = torch.optim.SGD(param_dicts, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    return optimizer, lr_scheduler


def build_loaders(dataset_train, dataset_val, args):
    if args.distributed:
        sampler_train = DistributedSampler(dataset_train)
        sampler_val = DistributedSampler(dataset_val, shuffle=False)
    else:
        sampler_train = RandomSampler(dataset_train)
        sampler_val = SequentialSampler(dataset_val)
    batch_sampler_train = BatchSampler(sampler_train, args.batch_size, drop_last=True)
    if len(batch_sampler_train) == 0:
        raise UserInputError(f"the training set has {len(dataset_train)} images, fewer than one batch of "
                             f"{args.batch_size} per process")
    data_loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler_train,
                                   collate_fn=utils.collate_fn, num_workers=args.num_workers)
    data_loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                                 collate_fn=utils.collate_fn, num_workers=args.num_workers)
    return sampler_train, data_loader_train, data_loader_val


def save_checkpoint(path, model_without_ddp, criterion, optimizer, lr_scheduler, epoch, args, ema=None,
                    scaler=None):
    """Write atomically (temp file + rename) so a job killed mid-write leaves the last good file.
    'matcher' holds the matcher's state (the DAP momentum precision table; empty otherwise);
    'ema' and 'scaler' (the GradScaler of --amp on CUDA) are there when in use."""
    if not utils.is_main_process():
        return
    tmp = path.with_suffix(".pth.tmp")
    torch.save({"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": args,
                "matcher": criterion.matcher.state_dict(), **({"ema": ema.state_dict()} if ema else {}),
                **({"scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled() else {})}, tmp)
    tmp.replace(path)


def restore_matcher(matcher, checkpoint, source):
    state = checkpoint.get("matcher", {})
    if set(state) == set(matcher.state_dict()):
        matcher.load_state_dict(state)
    else:
        print(f"Note: {source} holds no state for this matcher ({type(matcher).__name__}); it starts afresh")


def drop_log_lines_from(log_path, epoch):
    """Remove the lines of epochs >= epoch from a JSON-lines log (they are about to be redone)."""
    if not log_path.exists():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("epoch", -1) < epoch]
    if len(kept) != len(lines):
        log_path.write_text("".join(kept))


def save_coco_eval(coco_evaluator, path):
    """Save the bbox COCOeval arrays (precision, recall, scores) as tensors, readable with weights_only."""
    if coco_evaluator is None or not utils.is_main_process():
        return
    ev = coco_evaluator.coco_eval["bbox"].eval
    torch.save({k: torch.as_tensor(ev[k]) for k in ("precision", "recall", "scores")}, path)


def main(args):
    check_args(args)
    utils.init_distributed_mode(args)
    set_batch_size(args)
    print(utils.get_sha())
    print(args)
    device = torch.device(args.device)

    # A different seed per rank, so the data augmentations differ across processes.
    utils.seed_everything(args.seed, utils.get_rank())

    model, criterion, postprocessors = build_model(args)
    model.to(device)
    model_without_ddp = model
    if args.distributed:
        if args.model == "rtdetr" and device.type == "cuda":
            # RT-DETR trains its encoder/decoder batch norms with statistics of the global batch.
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Without auxiliary losses RT-DETR's intermediate score heads get no gradient.
        unused = args.model == "rtdetr" and not args.aux_loss
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None, find_unused_parameters=unused)
        model_without_ddp = model.module
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("number of params:", n_parameters)

    optimizer, lr_scheduler = build_optimizer(model_without_ddp, args)

    output_dir = Path(args.output_dir) if args.output_dir else None
    if args.finetune:
        checkpoint = load_checkpoint(args.finetune)
        drop = model_without_ddp.class_head_prefixes if args.finetune_drop_class_head else ()
        fit_state_dict(model_without_ddp, model_state_from_checkpoint(checkpoint, args.finetune),
                       source=args.finetune, drop_prefixes=drop)
        print(f"Fine-tuning from {args.finetune}" + (" (class head re-initialised)" if drop else ""))
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        fit_state_dict(model_without_ddp, model_state_from_checkpoint(checkpoint, args.resume), source=args.resume)
        if not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
            restore_matcher(criterion.matcher, checkpoint, args.resume)
            optimizer.load_state_dict(checkpoint["optimizer"])
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            args.start_epoch = checkpoint["epoch"] + 1
            print(f"Resumed from {args.resume}: continuing at epoch {args.start_epoch}")
            if args.output_dir and utils.is_main_process():
                for log_name in ("log.txt", "iterations.jsonl"):
                    drop_log_lines_from(Path(args.output_dir) / log_name, args.start_epoch)
    amp = MixedPrecision(device, args.amp)
    if amp.scaler.is_enabled() and args.resume and "scaler" in checkpoint and not args.eval:
        amp.scaler.load_state_dict(checkpoint["scaler"])
    ema = ModelEMA(model_without_ddp, args.ema_decay, args.ema_warmups) if args.ema else None
    if ema is not None and args.resume and "ema" in checkpoint:
        ema.load_state_dict(checkpoint["ema"])
    eval_model = ema.module if ema is not None else model

    # Checkpoints first, data second: a bad checkpoint path fails before minutes of COCO loading.
    dataset_train = build_dataset(image_set="train", args=args)
    dataset_val = build_dataset(image_set="val", args=args)
    sampler_train, data_loader_train, data_loader_val = build_loaders(dataset_train, dataset_val, args)
    base_ds = get_coco_api_from_dataset(dataset_val)

    if args.eval:
        test_stats, coco_evaluator = evaluate(eval_model, criterion, postprocessors, data_loader_val, base_ds,
                                              device, print_freq=args.print_freq)
        if output_dir:
            save_coco_eval(coco_evaluator, output_dir / "eval.pth")
            if utils.is_main_process():
                with (output_dir / "eval_stats.json").open("w") as f:
                    json.dump({f"test_{k}": v for k, v in test_stats.items()}, f)
        return test_stats

    print("Start training")
    start_time = time.time()
    log_stats = {}
    for epoch in range(args.start_epoch, args.epochs):
        utils.seed_everything(args.seed, utils.get_rank(), epoch)
        if args.distributed:
            sampler_train.set_epoch(epoch)
        iteration_log = (output_dir / "iterations.jsonl"
                         if args.log_iterations and output_dir and utils.is_main_process() else None)
        train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch,
                                      args.clip_max_norm, print_freq=args.print_freq, accum_iter=args.accum_iter,
                                      ema=ema, iteration_log=iteration_log, amp=amp)
        lr_scheduler.step()

        test_stats, coco_evaluator = evaluate(eval_model, criterion, postprocessors, data_loader_val, base_ds,
                                              device, print_freq=args.print_freq)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in test_stats.items()},
                     "epoch": epoch, "n_parameters": n_parameters}
        # Log, then checkpoint: a job stopped in between redoes this epoch after --resume (which
        # drops the log lines of epochs it will redo) instead of never logging it.
        if output_dir and utils.is_main_process():
            with (output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(log_stats) + "\n")
            (output_dir / "eval").mkdir(exist_ok=True)
            save_coco_eval(coco_evaluator, output_dir / "eval" / "latest.pth")
            if epoch % 50 == 49:
                save_coco_eval(coco_evaluator, output_dir / "eval" / f"{epoch:03}.pth")
        if output_dir:
            save_checkpoint(output_dir / "checkpoint.pth", model_without_ddp, criterion, optimizer, lr_scheduler,
                            epoch, args, ema, amp.scaler)
            # Extra copies before each learning-rate drop and every checkpoint_period epochs, as upstream.
            if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % args.checkpoint_period == 0:
                save_checkpoint(output_dir / f"checkpoint{epoch:04}.pth", model_without_ddp, criterion,
                                optimizer, lr_scheduler, epoch, args, ema, amp.scaler)

    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    print(f"Training time {total_time}")
    return log_stats


def parse_args(parser, argv=None):
    """Parse with the per-detector defaults: --model is read first, then the flags marked
    [model] default to that detector's upstream values (models.MODEL_DEFAULTS)."""
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**MODEL_DEFAULTS[known.model])
    return parser.parse_args(argv)


def run_cli(argv=None):
    parser = argparse.ArgumentParser("DETR training and evaluation script", parents=[get_args_parser()])
    args = parse_args(parser, argv)
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    try:
        main(args)
    except UserInputError as e:
        sys.stderr.write(f"error: {e}\n")  # not print(): silenced on ranks other than 0
        sys.exit(2)


if __name__ == "__main__":
    run_cli()
