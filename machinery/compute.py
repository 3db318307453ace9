"""Where and in which precision to compute, and several processes under torchrun.

The training loops use `compute.autocast` around the forward passes, `compute.scaler` on the loss (fp16's loss
scaling; it does nothing in bf16 or fp32), and under torchrun `compute.rank`, `compute.world_size` and
`compute.all_reduce_sum` (the sum of a metric over the processes).
"""
import contextlib
import ctypes
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from machinery import UserError


@dataclass
class Compute:
    """What a training step needs to know about the hardware and, under torchrun, the other processes:
    `with init_compute(args) as compute:` leaves the process group at the end."""
    device: str                      # "cpu", "cuda", "cuda:1"
    dtype: str                       # "float32", "bfloat16" or "float16": the precision of the matmuls
    autocast: object                 # the context the forward passes run in
    scaler: torch.amp.GradScaler     # loss scaling, enabled for float16 only
    rank: int = 0                    # this process's number under torchrun; 0 without it
    world_size: int = 1              # processes training together; 1 without torchrun
    timeout: float = 600.0           # seconds a collective may wait for the other processes

    @property
    def master(self):
        """The one process that writes the log and the checkpoints (and prints)."""
        return self.rank == 0

    def all_reduce_sum(self, value):
        """value summed over the processes: a float or a list of floats (returned as float64 numbers), or a
        tensor (in place, on this device). Without torchrun, value itself."""
        if self.world_size == 1:
            return value
        tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64,
                                                                             device=self.device)
        self._collective(dist.all_reduce, tensor, what="the sum of a metric")
        return value if isinstance(value, torch.Tensor) else tensor.tolist()

    def any(self, flag):
        """True on every process if flag is true on any: one process stopping stops them all."""
        if self.world_size == 1:
            return bool(flag)
        tensor = torch.tensor(int(bool(flag)), device=self.device)
        self._collective(dist.all_reduce, tensor, op=dist.ReduceOp.MAX, what="the other processes' state")
        return bool(tensor.item())

    def _collective(self, collective, tensor, what, **kwargs):
        """A collective that fails (a process stopped, froze or died: its peers time out after --dist_timeout
        or see the connection close) becomes one line naming this process and what it waited for."""
        try:
            collective(tensor, **kwargs)
        except Exception as e:  # gloo and nccl raise RuntimeError subclasses with multi-line messages
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"process {self.rank} of {self.world_size} waited for {what} and got none within "
                            f"--dist_timeout {self.timeout:g} s or lost its connection ({first[:160]}); another "
                            "process has stopped: see its output") from None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if self.world_size > 1 and dist.is_initialized():
            if exc_type is None:  # a clean end: leave together, so no process tears gloo down under another's
                try:              # last collective (seen once on CI: "terminate called", SIGABRT, at exit)
                    dist.barrier()
                except Exception:
                    pass  # a peer that failed meanwhile has said so itself
            dist.destroy_process_group()


def init_compute(args):
    """Device, precision, autocast and GradScaler for a run; args.device and args.dtype become the
    resolved choices (so the checkpoint records what was used, not "auto"). Under torchrun, which sets
    RANK and WORLD_SIZE, the process also joins the others: one GPU each (nccl), or gloo on CPUs."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    timeout = getattr(args, "dist_timeout", 600.0)
    args.device = pick_device(args.device)
    if world_size > 1:
        if args.grad_accum % world_size:
            raise UserError(f"--grad_accum {args.grad_accum} is the step's micro-batches in all, so it must be a "
                            f"multiple of the {world_size} processes (each does grad_accum / {world_size})")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
        if rank != 0:
            sys.stdout = open(os.devnull, "w")  # one process speaks for all; errors still reach stderr
    args.dtype = pick_dtype(args.dtype, args.device)
    device_type = args.device.split(":")[0]
    if device_type == "cpu":
        keep_freed_memory()
    if device_type == "cuda":
        # TF32 matmuls on Ampere and newer: ~8x the fp32 throughput, a 10-bit mantissa, harmless for training
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.dtype == "float32":
        autocast = contextlib.nullcontext()
    else:  # mixed precision: matmuls in bf16/fp16, weights and optimizer state stay fp32
        autocast = torch.autocast(device_type=device_type, dtype=getattr(torch, args.dtype))
    # fp16 overflows without loss scaling; bf16 has fp32's exponent range and needs none
    scaler = torch.amp.GradScaler(device_type, enabled=args.dtype == "float16")
    return Compute(args.device, args.dtype, autocast, scaler, rank, world_size, timeout)


def keep_freed_memory():
    """On Linux's C library (glibc), a CPU tensor of over 32 MB is mapped fresh from the operating system when it
    is made and handed back when it is freed, so every step pays page faults for its largest tensors (the
    output layer's logits) again. Raising glibc's two thresholds keeps freed memory in the process for the next
    step: on the toy task a step takes about a third less time, for more resident memory (docs/performance.md).
    The numbers computed do not change. Elsewhere (macOS, musl) there is nothing to tune."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: allocations under 1 GiB come from the heap, not fresh mappings
    libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: and the heap keeps what is freed, for reuse


def pick_device(device):
    """"auto", "cpu", "cuda", "cuda:N" or "mps", refused in one line when this machine has no such device."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device mps asked for, but this machine has no Apple GPU; use --device cpu")
        return device
    kind, _, index = device.partition(":")
    if kind != "cuda" or not (index == "" or index.isdigit()):
        raise UserError(f"--device {device} is not a device: use auto, cpu, cuda, cuda:N or mps")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but this machine has no CUDA GPU; use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def pick_dtype(dtype, device):
    """Training precision: bf16 where the GPU supports it, else fp16 (with a GradScaler); fp32 on CPU."""
    if dtype == "auto":
        if not device.startswith("cuda"):
            return "float32"
        # emulated bf16 (pre-Ampere GPUs) is slow: those get fp16 and a GradScaler
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {dtype} is not one of auto, float32, bfloat16, float16")
    return dtype
