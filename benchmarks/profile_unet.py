"""Where one fast U-Net forward spends its time: kernels per forward and the top kernels by device time.

    python benchmarks/profile_unet.py [--preset cifar10] [--batch 256] [--dtype fp16] [--graph] [--compile]

torch.profiler over a few forwards of ``model.to_fast`` (after warm-up), grouped by kernel name; the
benchmarks say how fast, this says what limits it. --graph profiles one CUDA-graph replay of the forward
instead (what the graph engine runs: launch gaps removed). --compile profiles ``compile_model`` of it
(Inductor's generated kernels by name). On a CPU (the auto backend: the extension's C++ kernels; bf16 as
``sample --fp16`` runs it there) it groups operators and generated kernels by their own (self) CPU time.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from ddpm_fast import UNet, UNetConfig, compile_model, ops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="fp16 on a CPU: what sample --fp16 runs there (bf16 where native, else fp32)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--graph", action="store_true", help="profile a CUDA-graph replay of the forward")
    p.add_argument("--compile", action="store_true", help="profile the torch.compile'd fast model")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cfg = UNetConfig.from_name(args.preset, dropout=0.0)
    torch.manual_seed(0)
    model = UNet(cfg).eval().to(device)
    with torch.no_grad():
        for q in model.parameters():
            q.normal_(0.0, 0.02)
    if not cuda and dtype == torch.float16:  # CPUs have no fast fp16 arithmetic: what sample --fp16 runs there
        dtype = ops.cpu_half_dtype()
    fast = model.to_fast(dtype)
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # generated CPU kernels show in the profile by name
        fast = compile_model(fast)
    x = torch.randn(args.batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    labels = torch.randint(0, cfg.num_classes, (args.batch,), device=device) if cfg.num_classes else None

    def forward():
        return fast(x, t, labels)

    with torch.no_grad(), ops.use_backend("auto"):
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
    if cuda:
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:  # kernels only
                per_name[ev.name][0] += 1
                per_name[ev.name][1] += ev.device_time
    else:  # each operator's and generated kernel's own time, so nested calls are not counted twice
        for avg in prof.key_averages():
            if avg.self_cpu_time_total > 0:
                per_name[avg.key] = [avg.count, avg.self_cpu_time_total]
    total_us = sum(v[1] for v in per_name.values()) / args.iters
    launches = sum(v[0] for v in per_name.values()) / args.iters
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    mode = "graph replay" if args.graph else "compiled" if args.compile else "eager"
    print(f"# {args.preset} batch {args.batch} {str(dtype).replace('torch.', '')} {mode} on {name}")
    print(f"{'kernels' if cuda else 'operators'} per forward: {launches:.0f}; "
          f"summed {'kernel' if cuda else 'operator self'} time per forward: {total_us / 1e3:.3f} ms")
    print(f"{'share':>6} {'ms/fwd':>8} {'count':>6}  name")
    for kname, (count, us) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{us / args.iters / max(total_us, 1e-9):6.1%} {us / args.iters / 1e3:8.3f} "
              f"{count / args.iters:6.0f}  {kname[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
