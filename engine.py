"""One training epoch and one COCO evaluation pass; used by main.py."""
import contextlib
import json
import math
import time

import torch

import util.misc as utils
from datasets.coco_eval import CocoEvaluator
from models.set_criterion import StepContext
from util import interrupts, preemption
from util.errors import TrainingDiverged

# The step's last reduction of logged values also carries each process's SIGUSR2 request
# (averaged over the processes: above 0 when any got it). Every process reads the same number,
# so all stop after the same step, without a collective operation of their own.
STOP_REQUESTED = "stop_requested"


def weighted_loss(loss_dict, weight_dict):
    return sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)


def loss_log_values(loss_dict, weight_dict):
    """Reduce the loss terms over ranks for logging: weighted terms as `k`, raw values as
    `k_unscaled`, and everything the criterion reports without a weight (e.g. class_error)."""
    reduced = utils.reduce_dict({k: v.detach() for k, v in loss_dict.items()})
    scaled = {k: v * weight_dict[k] for k, v in reduced.items() if k in weight_dict}
    unscaled = {f"{k}_unscaled": v for k, v in reduced.items() if k in weight_dict}
    unweighted = {k: v for k, v in reduced.items() if k not in weight_dict}
    return sum(scaled.values()), {**scaled, **unscaled, **unweighted}


def read_step_values(logged, grad_norm):
    """The step's logged values as numbers, and its gradient norm, in one device-to-host read:
    each read of a GPU value waits for the GPU, so the step reads once, after its backward
    passes. logged: per micro-batch, (loss, {name: value}) of 0-dim tensors or numbers."""
    rows = [{"loss": loss, **values} for loss, values in logged]
    flat = [torch.as_tensor(v, dtype=torch.float64, device=grad_norm.device) for row in rows for v in row.values()]
    numbers = torch.stack([*flat, grad_norm.detach().double()]).tolist()
    step_values, start = [], 0
    for row in rows:
        step_values.append(dict(zip(row, numbers[start:start + len(row)])))
        start += len(row)
    return step_values, numbers[-1]


class MixedPrecision:
    """--amp: the model's forward under torch.autocast (float16 on CUDA; bfloat16 on the CPU,
    which has no fast float16), the criterion on float32 copies of the outputs (matching costs and
    DAP's soft counts need the range), and on CUDA a GradScaler against float16 gradient
    underflow. Disabled, every method is the identity and the scaler a pass-through."""

    def __init__(self, device, enabled, use_scaler=None):
        self.enabled = enabled
        self.device_type = torch.device(device).type
        self.dtype = torch.float16 if self.device_type == "cuda" else torch.bfloat16
        use_scaler = self.device_type == "cuda" if use_scaler is None else use_scaler
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=enabled and use_scaler)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def float32(self, outputs):
        """outputs with every half-precision tensor, at any depth of dicts and lists, in float32."""
        if not self.enabled:
            return outputs
        if isinstance(outputs, dict):
            return {k: self.float32(v) for k, v in outputs.items()}
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.float32(v) for v in outputs)
        if torch.is_tensor(outputs) and outputs.dtype in (torch.float16, torch.bfloat16):
            return outputs.float()
        return outputs


class AccumulationSteps:
    """The loader's batches grouped by optimisation step: lists of accum_iter micro-batches
    (the last step of an epoch may hold fewer)."""

    def __init__(self, data_loader, accum_iter):
        self.data_loader, self.accum_iter = data_loader, accum_iter

    def __len__(self):
        return math.ceil(len(self.data_loader) / self.accum_iter)

    def __iter__(self):
        step = []
        for batch in self.data_loader:
            step.append(batch)
            if len(step) == self.accum_iter:
                yield step
                step = []
        if step:
            yield step


def learning_rates(optimizer):
    """The learning rate of every parameter group: 'lr' the first's (the head's and the
    transformer's), 'lr_groupI' the others' (each family's param_groups says which is which)."""
    groups = optimizer.param_groups
    return {"lr": groups[0]["lr"], **{f"lr_group{i}": group["lr"] for i, group in enumerate(groups) if i}}


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, max_norm=0, print_freq=10,
                    accum_iter=1, ema=None, iteration_log=None, amp=None, stopped=None, board=None):
    """One epoch; each optimisation step accumulates the gradients of accum_iter batches.
    The criterion normalises every micro-batch by the totals of the whole step, so the step's
    gradient is that of one batch holding all its images (see models/set_criterion.py).

    ema: a ModelEMA updated after every optimisation step. iteration_log: a path; one JSON
    line per optimisation step is appended to it (epoch, step, lr and the logged values,
    averaged over the step's micro-batches, the gradient norm). amp: a MixedPrecision (default:
    disabled). board: a util.tensorboard.TrainingBoard; it gets the same values per step, and the
    step's time.

    Returns (the epoch's averaged statistics and DAP's precision tables, None); or, when the
    processes agreed to stop on SIGUSR2 (util/preemption.py), (None, where the epoch stopped:
    {'steps_done', 'meters', 'final_precision'}). stopped: that record, from a mid-epoch
    checkpoint: the epoch goes on from it (the loader leaves out the batches of its steps done:
    TrainingBatches.set_epoch)."""
    amp = amp or MixedPrecision(device, enabled=False)
    model.train()
    criterion.train()
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    first_step = 0
    if stopped is not None:
        metric_logger.load_state_dict(stopped["meters"])
        first_step = stopped["steps_done"]
        criterion.continue_epoch(stopped.get("final_precision"))  # the epoch may have no step left
    header = f"Epoch: [{epoch}]"

    with open(iteration_log, "a") if iteration_log else contextlib.nullcontext() as log_file:
        steps = metric_logger.log_every(AccumulationSteps(data_loader, accum_iter), print_freq, header)
        step_end = time.perf_counter()
        for step_index, step in enumerate(steps, start=first_step):
            try:
                step_values, grad_norm, stop = train_step(model, criterion, step, optimizer, device, max_norm,
                                                          metric_logger, amp, epoch)
            except TrainingDiverged as err:
                raise TrainingDiverged(f"training diverged at epoch {epoch}, step {step_index}: {err}") from None
            utils.heartbeat(f"epoch {epoch}, step {step_index}")
            interrupts.check()
            if ema is not None:
                ema.update(model)
            averaged = {k: sum(v[k] for v in step_values) / len(step_values) for k in step_values[0]}
            values = {**learning_rates(optimizer), **averaged, "grad_norm": grad_norm}
            if log_file is not None:
                log_file.write(json.dumps({"epoch": epoch, "step": step_index, **values}) + "\n")
            if board is not None:
                # host time from one step's end to the next (data loading included); the step's read
                # of its logged values waits for the device, so this is the device's time too
                step_start, step_end = step_end, time.perf_counter()
                board.log_step({**values, "iter_time": step_end - step_start})
            if stop:
                return None, {"steps_done": step_index + 1, "meters": metric_logger.state_dict(),
                              "final_precision": criterion.final_precision}

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    return {**stats, **criterion.precision_tables()}, None


def counting_pass(model, criterion, step_samples, step_targets, amp):
    """First pass of an accumulated step with DAP-loss: the micro-batches `step_samples` (on the
    device; the first len(step_samples) of the step's step_targets) forward without gradients,
    to give the criterion the soft counts of the whole step (DAP's precision is that of the
    step's batch, as without accumulation). Buffers (batch-norm statistics) are restored
    afterwards. Returns (what criterion.count returned for each micro-batch, the RNG state before
    each micro-batch), so that the gradient pass draws the same dropout, denoising noise and input
    scale, hence gives the same counts. Costs one forward pass per micro-batch counted."""
    buffers = [(b, b.clone()) for b in model.buffers()]
    rng_states, counted = [], []
    with torch.no_grad():
        for i, samples in enumerate(step_samples):
            rng_states.append(utils.get_rng_state())
            with amp.autocast():
                outputs = model(samples, step_targets[i])
            counted.append(criterion.count(amp.float32(outputs), step_targets[i], StepContext(step_targets, i)))
        for buffer, saved in buffers:
            buffer.copy_(saved)
    return counted, rng_states


def train_step(model, criterion, step, optimizer, device, max_norm, metric_logger, amp, epoch=None):
    """One optimisation step over its micro-batches, the (samples, targets) pairs of `step`;
    returns (each micro-batch's logged values, the gradient norm before clipping, whether any
    process asked to stop after this step: SIGUSR2, util/preemption.py). The criterion is told
    the step (StepContext: its micro-batches' targets, the epoch) and, when it has a batch-level
    loss (DAP, a ranking loss) and the step several micro-batches, the counting pass.

    The counting pass skips the last micro-batch: its gradient pass runs first, when the others
    are counted, and its own counts (criterion.score) serve the others' gradient passes. That
    saves one forward of the step; the random draws are those of the micro-batches in order, and
    batch-norm statistics see the last micro-batch first."""
    # Each micro-batch is copied to the device once, for the counting pass and the gradient pass
    # (asynchronously from the loader's page-locked memory).
    step_samples = [samples.to(device, non_blocking=True) for samples, _ in step]
    step_targets = [[{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
                    for _, targets in step]
    optimizer.zero_grad()
    order, counted, rng_states, rng_after_step = range(len(step)), None, None, None
    if len(step) > 1 and criterion.needs_counting_pass:
        counted, rng_states = counting_pass(model, criterion, step_samples[:-1], step_targets, amp)
        counted.append(None)  # the last micro-batch: counted by its gradient pass
        rng_states.append(utils.get_rng_state())
        order = [len(step) - 1, *range(len(step) - 1)]
    logged = {}
    for position, i in enumerate(order):
        samples, targets = step_samples[i], step_targets[i]
        # Gradients are all-reduced once per step, on its last backward.
        last = position == len(step) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            if rng_states is not None:
                utils.set_rng_state(rng_states[i])
            with amp.autocast():
                outputs = model(samples, targets)
            outputs = amp.float32(outputs)
            context = StepContext(step_targets, i, counted, final_call=last, epoch=epoch)
            try:
                if counted is not None and counted[i] is None:
                    loss_dict, counted[i] = criterion.score(outputs, targets, context)
                else:
                    loss_dict = criterion(outputs, targets, context)
            except ValueError:
                # Non-finite predictions (weights or activations overflowed) stop the matcher
                # with an unrelated message ("invalid numeric entries"). Checked only then: the
                # check reads the device.
                if not utils.all_finite(outputs):
                    raise TrainingDiverged(f"the model's predictions are not finite (micro-batch {i})") from None
                raise
            losses = weighted_loss(loss_dict, criterion.weight_dict)
            amp.scaler.scale(losses / len(step)).backward()
            if position == 0 and rng_states is not None:
                rng_after_step = utils.get_rng_state()  # where drawing in order would have ended
        reduced = dict(loss_dict)
        if last:
            reduced[STOP_REQUESTED] = torch.full((), float(preemption.requested()), device=losses.device)
        logged[i] = loss_log_values(reduced, criterion.weight_dict)
    if rng_after_step is not None:
        utils.set_rng_state(rng_after_step)

    amp.scaler.unscale_(optimizer)  # clip and check the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    step_values, grad_norm = read_step_values([logged[i] for i in range(len(step))], grad_norm)
    stop = step_values[order[-1]].pop(STOP_REQUESTED) > 0
    for i, values in enumerate(step_values):
        if not math.isfinite(values["loss"]):
            terms = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "loss" and not k.endswith("_unscaled"))
            raise TrainingDiverged(f"the loss is {values['loss']} (micro-batch {i}); terms: {terms}")
    # With a GradScaler (float16) an overflow is expected now and then: the scaler skips the step
    # and lowers the scale. Anywhere else a non-finite gradient means training diverged.
    if not amp.scaler.is_enabled() and not math.isfinite(grad_norm):
        raise TrainingDiverged(f"the gradient norm is {grad_norm}; loss {step_values[-1]['loss']:.4g}")
    for values in step_values:
        metric_logger.update(**values)
    amp.scaler.step(optimizer)  # skipped (and the scale lowered) if a gradient overflowed
    amp.scaler.update()
    metric_logger.update(lr=optimizer.param_groups[0]["lr"])
    if math.isfinite(grad_norm):  # a step the GradScaler skipped has no gradient to average in
        metric_logger.update(grad_norm=grad_norm)
    return step_values, grad_norm, stop


@torch.no_grad()
def evaluate(model, criterion, postprocessors, data_loader, base_ds, device, print_freq=10, eval_backend="auto"):
    """Losses and COCO box AP on the whole loader, merged across ranks; eval_backend: see
    datasets/coco_eval.py. Returns (stats, coco_evaluator); stats['coco_eval_bbox'] holds the 12
    COCO numbers."""
    model.eval()
    criterion.eval()
    metric_logger = utils.MetricLogger(delimiter="  ")
    coco_evaluator = CocoEvaluator(base_ds, ("bbox",), backend=eval_backend)

    for batch_index, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, "Test:")):
        utils.heartbeat(f"evaluation, batch {batch_index}")
        interrupts.check()
        samples = samples.to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

        outputs = model(samples)
        loss_dict = criterion(outputs, targets)
        loss_value, log_values = loss_log_values(loss_dict, criterion.weight_dict)
        metric_logger.update(loss=float(loss_value), **log_values)

        orig_target_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
        results = postprocessors["bbox"](outputs, orig_target_sizes)
        coco_evaluator.update({t["image_id"].item(): r for t, r in zip(targets, results)})

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    coco_evaluator.synchronize_between_processes()
    coco_evaluator.accumulate()
    coco_evaluator.summarize()
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats["coco_eval_bbox"] = coco_evaluator.coco_eval["bbox"].stats.tolist()
    return stats, coco_evaluator
