"""
The ranking losses of docs/LOSSES.md (AP-Loss, aLRP Loss, Rank & Sort Loss) on a detector's
outputs: the same positives and negatives as DAP-loss (models.detections.gather_detections),
scored by their log-odds, and ranked over the whole step's batch, across processes and
micro-batches. The mathematics is models.rank_losses; models.set_criterion calls RankingLoss on
every layer whose losses name it, as it calls DAPLoss.

A positive's rank depends on every detection of the step, and a detection's update on every
positive ranked below it. So every (process, micro-batch) evaluates the loss of the whole
step: its own detections with their gradients, everyone else's detached (the other processes'
current micro-batch, exchanged here; the step's other micro-batches, from the engine's counting
pass). Its result is the step's loss, and its gradient is exact for its own detections.
"""
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from util import box_ops
from util.misc import get_world_size, is_dist_avail_and_initialized

from .detections import gather_detections
from .rank_losses import alrp_loss_terms, ap_loss, rank_sort_loss_terms

RANKING_LOSSES = ("ap", "alrp", "rs")


class RankRecord(NamedTuple):
    """Detached detections of one layer: of one micro-batch on every process (what the step's
    other micro-batches need), or of several merged."""
    pos_scores: torch.Tensor   # [P] log-odds
    pos_ious: torch.Tensor     # [P]
    pos_giou_loss: torch.Tensor  # [P] 1 - GIoU (RS Loss's box loss)
    neg_scores: torch.Tensor   # [M] log-odds
    neg_weights: torch.Tensor  # [M] 1 for a negative, 0 for an entry to ignore
    indices: list | None = None  # this process's matching, reused by the micro-batch's gradient pass


FIELDS = 5  # the tensors of a RankRecord


def merge_rank_records(records):
    """One RankRecord for several micro-batches: every detection of each."""
    return RankRecord(*(torch.cat(parts) for parts in zip(*(r[:FIELDS] for r in records))))


def gather_ranked(layer, activation, neg_topk):
    """The detections of a layer as the ranking losses see them: gather_detections' positives
    and negatives in log-odds, and each positive's GIoU loss. The tensors of a RankRecord,
    attached to the graph."""
    pairs = layer.pairs
    pos_scores, pos_ious, neg_scores, neg_weights = gather_detections(layer.outputs, pairs, activation, neg_topk,
                                                                      log_odds=True)
    giou = box_ops.paired_generalized_box_iou(
        box_ops.box_cxcywh_to_xyxy(layer.outputs["pred_boxes"][pairs.index].float()),
        box_ops.box_cxcywh_to_xyxy(pairs.boxes.float()))
    return pos_scores, pos_ious, 1 - giou, neg_scores, neg_weights


class RankLayerResult(NamedTuple):
    losses: dict         # this layer's loss terms, keys without the layer's suffix
    record: RankRecord   # every process's detections of this micro-batch, detached
    logged: dict         # logged of the final layer beside the losses (aLRP's weight)
    precision: None = None  # DAP's table; the ranking losses have none


# ---------------------------------------------------------------------- exchange between processes

_host_group = None


def _host_process_group():
    """A gloo group for host integers (the sizes below): exchanging them over NCCL would copy
    them to the GPU and back, a wait on the GPU. Made once, by every process alike."""
    global _host_group
    if _host_group is None:
        _host_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _host_group


def exchange(records):
    """Every process's records: for each process, the list of its records (one per layer, in
    the same order on every process); this process's own are returned as given. Two
    collectives: the sizes (host integers, gloo) and every tensor, padded to the longest, in
    one all-gather. Nothing is read back from the device."""
    world, rank = get_world_size(), dist.get_rank()
    sizes = torch.tensor([[len(r.pos_scores), len(r.neg_scores)] for r in records], dtype=torch.int64)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=_host_process_group())
    lengths = [int((3 * s[:, 0] + 2 * s[:, 1]).sum()) for s in all_sizes]
    flat = torch.cat([t.float() for r in records for t in r[:FIELDS]])
    padded = flat.new_zeros(max(lengths))
    padded[:len(flat)] = flat
    gathered = padded.new_empty(world * len(padded))  # flat: gloo accepts no [world, n] output
    dist.all_gather_into_tensor(gathered, padded)
    gathered = gathered.view(world, -1)
    result = []
    for other in range(world):
        if other == rank:
            result.append(list(records))
            continue
        parts, offset = [], 0
        for p, m in all_sizes[other].tolist():
            parts.append(RankRecord(*gathered[other, offset:offset + 3 * p + 2 * m].split([p, p, p, m, m])))
            offset += 3 * p + 2 * m
        result.append(parts)
    return result


def scaled_gradient(value, shares):
    """value, whose gradient is multiplied by `shares`. Each of the step's `shares` (process,
    micro-batch) pairs evaluates the whole step's loss but back-propagates into its own
    detections only; the engine divides each micro-batch's loss by the number of micro-batches
    and DDP averages over processes, so each pair's gradient must count `shares` times to give
    the gradient of the step's loss."""
    return value * shares - value.detach() * (shares - 1)


class SelfBalance(nn.Module):
    """aLRP Loss's self-balancing weight of its localisation component (Oksuz et al. 2020): in
    each epoch, (mean L_cls + mean L_loc) / mean L_loc of the previous epoch's steps; 50 in the
    first (the paper's start). The sums are device tensors (nothing is read back) and the state
    is saved with the criterion, so a resumed run, mid-epoch too, goes on with the same weight."""

    def __init__(self, initial=50.0):
        super().__init__()
        self.register_buffer("weight", torch.tensor(initial, dtype=torch.float64))
        self.register_buffer("sums", torch.zeros(2, dtype=torch.float64))  # L_cls, L_loc of this epoch
        self.epoch = None  # the epoch the sums belong to

    @torch.no_grad()
    def start(self, epoch):
        """Before a training step: the first step of an epoch turns the last epoch's sums into
        the weight it trains with."""
        if epoch != self.epoch:
            if self.epoch is not None:
                total, loc = self.sums.sum(), self.sums[1]
                self.weight.copy_(torch.where(loc > 0, total / torch.where(loc > 0, loc, 1.0), self.weight))
            self.sums.zero_()
            self.epoch = epoch

    @torch.no_grad()
    def record(self, classification, localisation):
        """One training step's components (of the step's whole batch)."""
        self.sums += torch.stack([classification.detach(), localisation.detach()]).to(self.sums)

    def get_extra_state(self):
        return {"epoch": self.epoch}

    def set_extra_state(self, state):
        self.epoch = state["epoch"]


class RankingLoss(nn.Module):
    """One of the ranking losses (`name`: 'ap', 'alrp' or 'rs'; docs/LOSSES.md) on every layer
    that has it, over the step's whole batch (see the module docstring).

    ap: loss_ap = AP-Loss (the upstream box losses are trained beside it).
    alrp: loss_alrp = aLRP's classification component, whose update of the scores is the whole
        aLRP update, and loss_alrp_loc = its localisation component times the self-balancing
        weight (SelfBalance, fed by the final layer's components at every training step).
    rs: loss_rs = RS Loss, and loss_rs_giou = lambda * the mean GIoU loss of the step's
        positives, with lambda = loss_rs / that GIoU loss held constant (the RS paper's
        self-balancing: the two terms are equal in value).
    """

    def __init__(self, name, *, activation, neg_topk=100, delta=None):
        super().__init__()
        if name not in RANKING_LOSSES:
            raise ValueError(f"unknown ranking loss {name!r}; expected one of {RANKING_LOSSES}")
        self.name = name
        self.balance = SelfBalance() if name == "alrp" else None
        self.activation = activation
        self.neg_topk = neg_topk
        self.delta = delta

    def forward(self, layers, totals, step):
        """layers: BatchLossLayers (name, outputs, indices, pairs); totals: the step totals
        (set_criterion), of which shares, the number of (process, micro-batch) pairs of the step;
        step: the StepContext, whose counting pass gives the step's other micro-batches.
        Returns {layer name: RankLayerResult}."""
        shares = totals["shares"]
        own = [gather_ranked(layer, self.activation, self.neg_topk) for layer in layers]
        detached = [RankRecord(*(t.detach() for t in parts)) for parts in own]
        training_step = self.training and torch.is_grad_enabled()  # not the counting pass, nor evaluation
        if self.balance is not None and training_step:
            self.balance.start(step.epoch)
        distributed = is_dist_avail_and_initialized()
        everyone = exchange(detached) if distributed else [detached]
        rank = dist.get_rank() if distributed else 0
        results = {}
        for i, layer in enumerate(layers):
            rest = [records[i] for r, records in enumerate(everyone) if r != rank]
            rest += step.other_micro_batches(layer.name) or []
            batch = RankRecord(*(torch.cat([mine, *(r[k] for r in rest)]) for k, mine in enumerate(own[i])))
            record = merge_rank_records([records[i] for records in everyone])._replace(indices=layer.indices)
            losses = self._losses(batch, len(own[i][0]), shares)
            logged = {}
            if self.balance is not None and layer.final:
                logged["alrp_sb_weight"] = self.balance.weight.float()
                if training_step and step.is_last:  # once per step: the step's whole-batch values
                    self.balance.record(losses["loss_alrp"], losses["loss_alrp_loc"] / self.balance.weight)
            results[layer.name] = RankLayerResult(losses, record, logged=logged)
        return results

    def _losses(self, batch, num_own, shares):
        """The layer's terms from the step's detections `batch`, this process's `num_own`
        positives first."""
        kwargs = {} if self.delta is None else {"delta": self.delta}
        if self.name == "ap":
            return {"loss_ap": scaled_gradient(ap_loss(batch.pos_scores, batch.neg_scores, batch.neg_weights,
                                                       **kwargs), shares)}
        if self.name == "alrp":
            terms = alrp_loss_terms(batch.pos_scores, batch.pos_ious, batch.neg_scores, batch.neg_weights, **kwargs)
            return {"loss_alrp": scaled_gradient(terms.classification, shares),
                    "loss_alrp_loc": scaled_gradient(terms.localisation, shares)
                    * self.balance.weight.to(terms.localisation.dtype)}
        terms = rank_sort_loss_terms(batch.pos_scores, batch.pos_ious, batch.neg_scores, batch.neg_weights, **kwargs)
        value = terms.ranking + terms.sorting
        # The GIoU loss averaged over the step's positives, as this process's share (its own
        # positives' terms), weighted to be as large as RS Loss (lambda, a constant).
        mean_giou_loss = batch.pos_giou_loss.detach().mean()
        weight = torch.where(mean_giou_loss > 0, value.detach() / mean_giou_loss.clamp(min=1e-12), 0.0)
        box_share = batch.pos_giou_loss[:num_own].sum() / max(len(batch.pos_giou_loss), 1)
        return {"loss_rs": scaled_gradient(value, shares), "loss_rs_giou": weight * box_share * shares}
