"""Small helpers shared by training and evaluation: batching images of different sizes,
distributed bookkeeping and metric logging."""
import builtins
import datetime
import os
import random
import re
import subprocess
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist

from util.errors import UserInputError

# ----------------------------------------------------------------------------- batching

class NestedTensor:
    """A batch of zero-padded images and the mask of their padding (True = padding)."""

    def __init__(self, tensors, mask):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking=False):
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    def pin_memory(self):
        """Page-locked copies, so that DataLoader(pin_memory=True) can pin batches of images."""
        return NestedTensor(self.tensors.pin_memory(), None if self.mask is None else self.mask.pin_memory())

    def decompose(self):
        return self.tensors, self.mask

    def __repr__(self):
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={tuple(self.mask.shape)})"


def nested_tensor_from_tensor_list(tensor_list):
    """Pad [C,H,W] images at the bottom and right to the largest H and W of the batch."""
    if tensor_list[0].ndim != 3:
        raise ValueError("expected a list of [C,H,W] images")
    channels = tensor_list[0].shape[0]
    max_h = max(img.shape[1] for img in tensor_list)
    max_w = max(img.shape[2] for img in tensor_list)
    first = tensor_list[0]
    tensors = first.new_zeros((len(tensor_list), channels, max_h, max_w))
    mask = torch.ones((len(tensor_list), max_h, max_w), dtype=torch.bool, device=first.device)
    for img, padded, pad_mask in zip(tensor_list, tensors, mask):
        padded[:, :img.shape[1], :img.shape[2]].copy_(img)
        pad_mask[:img.shape[1], :img.shape[2]] = False
    return NestedTensor(tensors, mask)


def collate_fn(batch):
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(list(images)), targets


# ----------------------------------------------------------------------------- distributed

def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def collective_device():
    """Where a tensor for a collective operation lives: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather(data):
    """Gather any picklable object from every rank; returns a list with one entry per rank."""
    if get_world_size() == 1:
        return [data]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, data)
    return gathered


def reduce_dict(input_dict, average=True):
    """All-reduce a dict of scalar tensors (for logging); every rank gets the same values."""
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict.keys())
        values = torch.stack([input_dict[k].detach().float() for k in names])
        dist.all_reduce(values)
        if average:
            values /= world_size
        return dict(zip(names, values))


def setup_for_distributed(is_master):
    """Silence print() on every rank but the first; print(..., force=True) still prints."""
    builtin_print = builtins.print

    def print_on_master(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print_on_master


def first_host(nodelist):
    """The first host of a SLURM node list: 'gpu[003-004,010],cpu1' -> 'gpu003'."""
    prefix, ranges, suffix = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,\[]*)", nodelist).groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "") + suffix


def slurm_rendezvous(environ):
    """(rank, world size, local rank) of a task started by `srun python main.py` without
    torchrun, and MASTER_ADDR / MASTER_PORT set in `environ` where missing: the first node of
    the job and a port derived from the job id (a requeued job keeps its id, so its port)."""
    environ.setdefault("MASTER_ADDR", first_host(environ["SLURM_JOB_NODELIST"]))
    environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))
    return int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0))


def process_placement(world_size_flag, environ):
    """(rank, world size, local rank) of this process, from torchrun's (or submitit's)
    environment, else from SLURM's when --world_size asks for several processes (srun without
    torchrun); None when training is not distributed."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in environ and world_size_flag > 1:
        placement = slurm_rendezvous(environ)
        if placement[1] != world_size_flag:
            raise UserInputError(f"--world_size {world_size_flag}, but SLURM started {placement[1]} tasks "
                                 f"(SLURM_NTASKS); pass --world_size {placement[1]} or srun --ntasks {world_size_flag}")
        return placement
    if world_size_flag > 1:  # else: one process training what was meant for several, silently
        raise UserInputError(f"--world_size {world_size_flag}, but no launcher started the processes: run it under "
                             f"torchrun --nproc_per_node={world_size_flag} (or srun --ntasks {world_size_flag}), "
                             "which sets the world size itself, or drop --world_size")
    return None


def cuda_device_index(local_rank):
    """The CUDA device of a process: its local rank among the GPUs it sees. A task bound to its
    own GPU (srun --gpus-per-task, GPU binding) sees that one only, as device 0."""
    return local_rank % max(torch.cuda.device_count(), 1)


def init_distributed_mode(args):
    """Set args.distributed/rank/world_size/gpu (see process_placement) and initialise the
    process group: NCCL on GPUs, gloo on CPU."""
    placement = process_placement(args.world_size, os.environ)
    if placement is None:
        print("Not using distributed mode")
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        return
    args.rank, args.world_size, local_rank = placement
    args.gpu = cuda_device_index(local_rank)

    args.distributed = True
    use_cuda = str(args.device).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    args.dist_backend = "nccl" if use_cuda else "gloo"
    print(f"| distributed init (rank {args.rank}): {args.dist_url}, backend {args.dist_backend}",
          flush=True)
    # A process that dies or stops answering makes the others fail after this long instead of
    # waiting forever in their next collective operation.
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url, world_size=args.world_size,
                            rank=args.rank, timeout=datetime.timedelta(minutes=args.dist_timeout))
    dist.barrier()
    setup_for_distributed(args.rank == 0)


# ----------------------------------------------------------------------------- metrics

class SmoothedValue:
    """Track a series of values; report the median/average of a recent window and the
    global average."""

    def __init__(self, window_size=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def state_dict(self):
        return {"count": self.count, "total": self.total, "window": list(self.deque)}

    def load_state_dict(self, state):
        self.count, self.total = state["count"], state["total"]
        self.deque.extend(state["window"])

    def synchronize_between_processes(self):
        """Sum count and total over ranks (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self):
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def max(self):
        return max(self.deque)

    @property
    def value(self):
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    def __init__(self, delimiter="  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(float(value))

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def state_dict(self):
        """Every meter's running sums and recent values (a stopped epoch continues from them)."""
        return {name: meter.state_dict() for name, meter in self.meters.items()}

    def load_state_dict(self, state):
        for name, meter_state in state.items():
            self.meters[name].load_state_dict(meter_state)

    def __getattr__(self, attr):
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable, print_freq, header=""):
        """Yield from iterable, printing progress, ETA, meters, timing and memory every
        print_freq steps and at the last one."""
        total = len(iterable)
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        width = len(str(total))
        start = end = time.time()
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [f"{header} [{i:{width}d}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
                print(self.delimiter.join(parts), flush=True)
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        print(f"{header} Total time: {elapsed} ({(time.time() - start) / max(total, 1):.4f} s / it)")


@torch.no_grad()
def accuracy(output, target, topk=(1,)):
    """Top-k accuracy in percent for each k; 0 when there are no targets."""
    if target.numel() == 0:
        return [torch.zeros([], device=output.device)]
    maxk = max(topk)
    _, pred = output.topk(maxk, dim=1)
    correct = pred.t().eq(target.view(1, -1))
    return [correct[:k].reshape(-1).float().sum() * (100.0 / target.size(0)) for k in topk]


def seed_of(*keys):
    """One 32-bit seed from a tuple of ints (e.g. seed, rank, epoch), well mixed."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_everything(*keys):
    """Seed torch, numpy and random from a tuple of ints (e.g. seed, rank, epoch).

    Seeding at the start of every epoch from (seed, rank, epoch) makes a run resumed from an
    epoch checkpoint draw exactly the random numbers of an uninterrupted one."""
    seed = seed_of(*keys)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def get_rng_state():
    """The state of every generator seed_everything seeds (random, torch, CUDA, numpy), in types a
    weights-only checkpoint holds (numpy's key as a list; never a tensor read back)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, key.tolist(), pos, has_gauss, cached_gaussian)
    return random.getstate(), torch.get_rng_state(), cuda, numpy_state


def set_rng_state(state):
    python, cpu, cuda, *numpy_state = state  # no numpy state in checkpoints written before it was kept
    random.setstate(python)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    if numpy_state:
        name, key, pos, has_gauss, cached_gaussian = numpy_state[0]
        np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, cached_gaussian))


def scaled_size(size, input_scale=1.0, stride=32):
    """size * input_scale rounded to a multiple of stride (RT-DETR's coarsest, 32), at least one stride."""
    return max(stride, round(size * input_scale / stride) * stride)


def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def get_sha():
    """The git commit of the code, for the log (or 'N/A' outside a repository)."""
    here = os.path.dirname(os.path.abspath(__file__))

    def run(*cmd):
        return subprocess.check_output(cmd, cwd=here, stderr=subprocess.DEVNULL).decode().strip()

    try:
        sha = run("git", "rev-parse", "HEAD")
        dirty = "has uncommitted changes" if run("git", "status", "--porcelain") else "clean"
        return f"sha: {sha}, status: {dirty}"
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "sha: N/A"


def all_finite(outputs):
    """Whether every floating-point tensor in a nest of dicts and lists is finite (one host sync)."""
    tensors = []

    def collect(value):
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, (list, tuple)):
            for v in value:
                collect(v)
        elif torch.is_tensor(value) and value.is_floating_point():
            tensors.append(torch.isfinite(value).all())

    collect(outputs)
    return not tensors or bool(torch.stack(tensors).all())


def on_main_process(fn, *args):
    """fn(*args) on the main process only (None elsewhere). Under DDP every process learns whether
    it raised a UserInputError there, and raises too, instead of waiting for it at the next
    collective operation."""

    error, result = None, None
    if is_main_process():
        try:
            result = fn(*args)
        except UserInputError as err:
            error = err
    if is_dist_avail_and_initialized():
        failed = torch.tensor([error is not None], dtype=torch.int32, device=collective_device())
        dist.all_reduce(failed)
        if failed.item() and error is None:
            raise UserInputError("the main process (rank 0) refused to start; its message says why")
    if error is not None:
        raise error
    return result


# ----------------------------------------------------------------------------- heartbeats
# Each process records in the process group's key-value store when it last finished a training
# step. When a collective operation times out, the survivors read them to name the process that
# stopped answering.

def _store():
    return dist.distributed_c10d._get_default_store()


_beats = 0


def heartbeat(where):
    """Record that this process is alive at `where` (e.g. 'epoch 3, step 120')."""
    global _beats
    if is_dist_avail_and_initialized():
        _beats += 1
        _store().set(f"dap-detr/heartbeat/{get_rank()}", f"{_beats} {time.time()} {where}")


def least_advanced(seen, me, now):
    """Of the other processes' heartbeats seen = {rank: (beats, stamp, where)}, the one that got
    least far: fewest beats, then the oldest. The caller itself is alive, so it is never named,
    even when its own last beat is the oldest (it may be waiting inside the next step)."""
    others = {rank: beat for rank, beat in seen.items() if rank != me}
    if not others:
        return None
    rank, (_, stamp, where) = min(others.items(), key=lambda item: (item[1][0], item[1][1]))
    return f"rank {rank} last answered {now - stamp:.0f} s ago, at {where}"


def silent_processes(world_size, me):
    """Which other process stopped answering: 'rank R last answered Ns ago, at <where>' (best
    effort; None when the store cannot tell)."""
    try:
        store = _store()
        store.set_timeout(datetime.timedelta(seconds=5))
        seen = {}
        for rank in range(world_size):
            key = f"dap-detr/heartbeat/{rank}"
            if store.check([key]):
                beats, stamp, where = store.get(key).decode().split(" ", 2)
                seen[rank] = (int(beats), float(stamp), where)
        missing = [r for r in range(world_size) if r not in seen and r != me]
        if missing:
            return f"rank(s) {missing} never finished a training step"
        return least_advanced(seen, me, time.time())
    except Exception:  # the error path must not fail; the caller says what it knows
        return None
