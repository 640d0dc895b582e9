"""Writing training checkpoints atomically, reading checkpoints safely and fitting their weights
to a model.

Checkpoints are unpickled with ``weights_only=True``: only tensors, containers of plain Python
values and the few types allowlisted below can come back, so a checkpoint can never run code.
Every failure becomes a ``UserInputError`` whose one-line message names the file and the problem.
"""
import argparse
import os
import pickle
from urllib.error import URLError

import torch

from util.errors import TrainingDiverged, UserInputError
from util.misc import all_finite, is_main_process
from util.output_dir import write_atomically

# DETR's and Deformable DETR's main.py store the command line (an argparse.Namespace) in 'args'.
SAFE_GLOBALS = [argparse.Namespace]


def _is_url(path):
    return str(path).startswith(("http://", "https://"))


def load_checkpoint(path_or_url):
    """Load a checkpoint file (or URL, downloaded into the torch hub cache) onto the CPU."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            if _is_url(path_or_url):
                # check_hash verifies the sha256 prefix in the released file names (e.g. -e632da11).
                return torch.hub.load_state_dict_from_url(
                    path_or_url, map_location="cpu", check_hash=True, weights_only=True)
            if os.path.isdir(path_or_url):
                raise UserInputError(f"checkpoint {path_or_url} is a folder: pass the checkpoint file in it, e.g. "
                                     f"{os.path.join(path_or_url, 'checkpoint.pth')}")
            if not os.path.isfile(path_or_url):
                raise UserInputError(f"checkpoint not found: {path_or_url}")
            return torch.load(path_or_url, map_location="cpu", weights_only=True)
    except UserInputError:
        raise
    except (URLError, OSError) as e:
        if _is_url(path_or_url):
            raise UserInputError(
                f"could not download {path_or_url} ({e}); download it elsewhere and pass the "
                f"local path instead") from None
        raise UserInputError(f"cannot read checkpoint {path_or_url}: {e}") from None
    except Exception as e:  # the unpickler reports corrupt data with many exception types
        detail = _first_line(e)
        if isinstance(e, pickle.UnpicklingError) and "unsupported global" in str(e).lower():
            # weights_only refused a type: say which, never fall back to full unpickling.
            raise UserInputError(
                f"refusing to load {path_or_url}: it holds objects that are not plain weights "
                f"({detail})") from None
        raise UserInputError(
            f"checkpoint {path_or_url} is corrupt or not a PyTorch file ({type(e).__name__}: {detail})") from None


def _first_line(error):
    """The line of a loading error that says what is wrong with the file; not torch's advice to
    load it with weights_only=False (which would run any code the file carries)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    for line in lines:
        if "unsupported global" in line.lower():
            return line
    if lines and lines[0].startswith("Weights only load failed"):
        advice = ("Please file an issue", "Check the documentation")
        reasons = [line for line in lines[1:] if not line.startswith(advice)]
        return reasons[0] if reasons else "not a weights file"
    return lines[0] if lines else "no detail"


def model_state_from_checkpoint(checkpoint, source="checkpoint"):
    """The model's state dict inside a checkpoint of any of the supported layouts:
    {'model': sd} (DETR, Deformable DETR, this project), {'ema': {'module': sd}} (RT-DETR),
    or a bare state dict."""
    if not isinstance(checkpoint, dict):
        raise UserInputError(f"{source} does not contain a state dict (got {type(checkpoint).__name__})")
    if "model" in checkpoint and isinstance(checkpoint["model"], dict):
        return checkpoint["model"]
    ema = checkpoint.get("ema")
    if isinstance(ema, dict) and isinstance(ema.get("module"), dict):
        return ema["module"]
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise UserInputError(
        f"{source} has no model weights: expected a 'model' entry, an 'ema'/'module' entry or a "
        f"bare state dict, found keys {sorted(checkpoint)[:8]}")


def _summarise(keys, limit=6):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


# The flags that shape a model's weights: where a checkpoint of this code does not fit, those it
# was trained with and this run sets otherwise are the likely fix.
ARCHITECTURE_FLAGS = ("model", "backbone", "dilation", "position_embedding", "hidden_dim", "nheads", "enc_layers",
                      "dec_layers", "dim_feedforward", "num_queries", "pre_norm", "num_classes", "backbone_norm",
                      "num_feature_levels", "enc_n_points", "dec_n_points", "with_box_refine", "two_stage")


def architecture_differences(checkpoint, args):
    """['flag=value', ...]: the architecture flags a checkpoint's 'args' (this code's and
    upstream's checkpoints hold them) sets otherwise than args."""
    then = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    return [f"{flag}={getattr(then, flag)}" for flag in ARCHITECTURE_FLAGS
            if getattr(then, flag, None) is not None and getattr(args, flag, None) is not None
            and getattr(then, flag) != getattr(args, flag)]


# Architecture flags that change no weight's shape: a checkpoint loads strictly into a model built
# otherwise, which then computes something else (DETR-DC5's weights without --dilation).
SHAPELESS_FLAGS = ("dilation", "nheads")


def shapeless_differences(checkpoint, args):
    return [d for d in architecture_differences(checkpoint, args) if d.split("=")[0] in SHAPELESS_FLAGS]


def fit_state_dict(model, state_dict, source="checkpoint", drop_prefixes=(), trained_with=()):
    """Load ``state_dict`` into ``model`` strictly: every key present with the right shape.

    Keys starting with one of ``drop_prefixes`` are not loaded (the model keeps its freshly
    initialised values for them): this is how a released COCO checkpoint fine-tunes on a dataset
    with another number of classes. Any other mismatch is an error naming the keys, and
    trained_with (architecture_differences) where the checkpoint says how it was built.
    """
    def dropped(key):
        return any(key.startswith(p) for p in drop_prefixes)

    own = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if not dropped(k)}
    missing = [k for k in own if k not in state_dict and not dropped(k)]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in state_dict if k in own and state_dict[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatch: {_summarise(wrong_shape, limit=3)}")
    not_finite = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()
                  and not torch.isfinite(v).all()]
    if not_finite:
        problems.append(f"non-finite values (NaN or inf) in {_summarise(not_finite)}")
    if problems:
        hints = []
        if trained_with:
            hints.append(f"it was trained with {', '.join(trained_with)}: give those flags")
        if any("class_embed" in k or "score_head" in k for k in wrong_shape):
            hints.append("the class head has another number of classes: pass the --num_classes it was trained "
                         "with, or fine-tune with --finetune and --finetune_drop_class_head to re-initialise it")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise UserInputError(f"{source} does not fit the model: {'; '.join(problems)}{hint}")
    model.load_state_dict(state_dict, strict=not drop_prefixes)


def save_checkpoint(path, model, criterion, optimizer, lr_scheduler, epoch, args, ema=None, scaler=None,
                    steps_done=None, partial_epoch=None):
    """Write a training checkpoint from the main process, atomically (util.output_dir), so a job
    killed mid-write leaves the last good file. 'epoch' is the last epoch finished; 'matcher'
    holds the matcher's state (the DAP momentum precision table; empty otherwise), 'batch_loss'
    the batch-level loss's where it has one (aLRP's self-balancing weight); 'ema' and
    'scaler' (the GradScaler of --amp on CUDA) are there when in use; 'steps_done', the
    optimisation steps done since the run began (the logs' x axis); and 'partial_epoch' in a
    mid-epoch checkpoint: how far the next epoch got (main.save_partial_epoch)."""
    if not is_main_process():
        return
    if not all_finite([model.state_dict(), ema.state_dict() if ema else {}]):
        when = (f"after step {partial_epoch['steps_done']} of epoch {epoch + 1}" if partial_epoch
                else f"at the end of epoch {epoch}")
        raise TrainingDiverged(f"the weights are not finite {when}: {path} was not written")
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": args,
                  "matcher": criterion.matcher.state_dict(), **({"ema": ema.state_dict()} if ema else {}),
                  **({"batch_loss": criterion.batch_loss.state_dict()}
                     if isinstance(criterion.batch_loss, torch.nn.Module) else {}),
                  **({"scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled() else {}),
                  **({"steps_done": steps_done} if steps_done is not None else {}),
                  **({"partial_epoch": partial_epoch} if partial_epoch else {})}
    write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))


def restore_criterion(criterion, checkpoint, source):
    """The criterion's state from a training checkpoint: its matcher's and its batch-level
    loss's, each when the checkpoint holds one for it."""
    parts = [("matcher", criterion.matcher)]
    if isinstance(criterion.batch_loss, torch.nn.Module):
        parts.append(("batch_loss", criterion.batch_loss))
    for key, module in parts:
        state = checkpoint.get(key, {})
        if set(state) == set(module.state_dict()):
            module.load_state_dict(state)
        else:
            print(f"Note: {source} holds no state for this {key.replace('_', '-')} ({type(module).__name__}); "
                  f"it starts afresh")
