"""Where one fast U-Net forward spends its time: kernels per forward and the top kernels by device time.

    python benchmarks/profile_unet.py [--preset cifar10] [--batch 256] [--dtype fp16] [--graph]

torch.profiler over a few forwards of ``model.to_fast`` (after warm-up), grouped by kernel name; the
benchmarks say how fast, this says what limits it. --graph profiles one CUDA-graph replay of the forward
instead (what the graph engine runs: launch gaps removed). On a CPU it profiles the torch reference
ops (operator names, not kernels), which only checks the script.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from ddpm_fast import UNet, UNetConfig, ops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--graph", action="store_true", help="profile a CUDA-graph replay of the forward")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    cfg = UNetConfig.from_name(args.preset, dropout=0.0)
    torch.manual_seed(0)
    model = UNet(cfg).eval().to(device)
    with torch.no_grad():
        for q in model.parameters():
            q.normal_(0.0, 0.02)
    fast = model.to_fast(dtype)
    x = torch.randn(args.batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    labels = torch.randint(0, cfg.num_classes, (args.batch,), device=device) if cfg.num_classes else None

    def forward():
        return fast(x, t, labels)

    with torch.no_grad(), ops.use_backend("auto" if cuda else "torch"):
        for _ in range(3):
            forward()
        run = forward
        if args.graph:
            if not cuda:
                print("--graph needs a GPU", file=sys.stderr)
                return 2
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward()
            run = graph.replay
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(args.iters):
                run()
            if cuda:
                torch.cuda.synchronize()

    per_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        on_device = ev.device_type == torch.autograd.DeviceType.CUDA
        if cuda != on_device or (not cuda and ev.cpu_parent is not None):
            continue  # GPU: kernels only; CPU: top-level operators only
        entry = per_name[ev.name]
        entry[0] += 1
        entry[1] += ev.device_time if cuda else ev.cpu_time
    total_us = sum(v[1] for v in per_name.values()) / args.iters
    launches = sum(v[0] for v in per_name.values()) / args.iters
    name = torch.cuda.get_device_name(device) if cuda else "cpu (reference ops; not a product figure)"
    print(f"# {args.preset} batch {args.batch} {args.dtype} {'graph replay' if args.graph else 'eager'} on {name}")
    print(f"{'kernels' if cuda else 'operators'} per forward: {launches:.0f}; "
          f"summed {'kernel' if cuda else 'operator'} time per forward: {total_us / 1e3:.3f} ms")
    print(f"{'share':>6} {'ms/fwd':>8} {'count':>6}  name")
    for kname, (count, us) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{us / args.iters / max(total_us, 1e-9):6.1%} {us / args.iters / 1e3:8.3f} "
              f"{count / args.iters:6.0f}  {kname[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
