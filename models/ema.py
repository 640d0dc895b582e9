"""Exponential moving average of a model's weights (RT-DETR evaluates and releases the average)."""
import copy
import math

import torch


class ModelEMA:
    """Keeps `module`, a copy of the model whose floating-point state (parameters and buffers,
    e.g. batch-norm statistics) follows v <- d * v + (1 - d) * model_v after every optimizer step.

    The decay ramps up as d = decay * (1 - exp(-updates / warmups)), so the first updates track
    the model closely instead of averaging in the random initialisation. Integer buffers
    (num_batches_tracked) keep the value they had when the copy was made, as upstream.
    """

    def __init__(self, model, decay=0.9999, warmups=2000):
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmups = warmups
        self.updates = 0

    def current_decay(self):
        return self.decay * (1 - math.exp(-self.updates / self.warmups))

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = self.current_decay()
        model_state = _unwrap(model).state_dict()
        # state_dict() tensors share storage with the module, so in-place updates reach it.
        names, averages = zip(*[(k, v) for k, v in self.module.state_dict().items() if v.dtype.is_floating_point])
        # One fused kernel per operation for the whole model instead of two per tensor.
        torch._foreach_mul_(averages, d)
        torch._foreach_add_(averages, [model_state[k] for k in names], alpha=1 - d)

    def state_dict(self):
        return {"module": self.module.state_dict(), "updates": self.updates, "warmups": self.warmups}

    def load_state_dict(self, state):
        """Restores the averaged weights and the update count (hence the decay schedule); the
        released RT-DETR checkpoints hold only the weights, and restart the count."""
        self.module.load_state_dict(state["module"])
        self.updates = state.get("updates", 0)


def _unwrap(model):
    """The model inside a DistributedDataParallel wrapper (whose state-dict keys gain 'module.')."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
