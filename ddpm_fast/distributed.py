"""One process or a torchrun group: rank, world size and this process's device, for both CLIs."""

from __future__ import annotations

import os

import torch


class Dist:
    """torch.distributed when launched by torchrun, else a single process."""

    def __init__(self, device_arg):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
        if use_cuda and not torch.cuda.is_available():
            raise ValueError("--device cuda, but no CUDA device is available")
        self.device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if use_cuda and self.world == 1 and device_arg and ":" in device_arg:
            self.device = torch.device(device_arg)  # one process: an explicit cuda:N is honoured
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
