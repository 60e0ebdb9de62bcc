"""One process or a torchrun group: rank, world size and this process's device, for both CLIs."""

from __future__ import annotations

import os

import torch


def parse_device(arg: str | None) -> torch.device | None:
    """--device: None (CUDA if there is one), 'cpu', 'cuda' or 'cuda:N'; anything else is a clear error."""
    if arg is None:
        return None
    try:
        dev = torch.device(arg)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {arg!r}: not a device (use cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {arg!r}: only cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {arg}, but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {arg}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return dev


class Dist:
    """torch.distributed when launched by torchrun, else a single process."""

    def __init__(self, device_arg):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        asked = parse_device(device_arg)
        use_cuda = torch.cuda.is_available() if asked is None else asked.type == "cuda"
        self.device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if use_cuda and self.world == 1 and asked is not None and asked.index is not None:
            self.device = asked  # one process: an explicit cuda:N is honoured
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()

    def all_true(self, flag) -> bool:
        """``flag`` (a bool or a 0-d tensor) holds on every rank; one host read."""
        if self.world == 1:
            return bool(flag)
        import torch.distributed as dist

        t = torch.as_tensor(flag, device=self.device).to(torch.int32).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def max_int(self, value: int) -> int:
        """The largest of the ranks' ``value``s (every rank gets it)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())
