"""Where each sampler stops being useful: the embedded digits model at 1-5 steps against DDIM with 200 steps.

    python benchmarks/few_steps.py [--images 200]

Runs the sample command as a user would (same seed, so the same x_T and labels for every run) and prints, per
sampler and step count, the RMS of the 0-255 pixels against DDIM-200 and the share of saturated pixels (0 or
255; DDIM-200 has 0.3%). The samplers' ``min_steps`` (the CLI's refusal below it) come from this table
(RESULTS.md, "Few steps").
"""

import argparse
import os
import tempfile

import numpy as np

from ddpm_fast import sample as sample_cli


def draw(args: list[str], n: int) -> np.ndarray | None:
    out = tempfile.mkdtemp()
    if sample_cli.main(args + ["--allow-few-steps", "--num-samples", str(n), "--no-progress", "--out", out]):
        return None  # refused or blew up
    with np.load(os.path.join(out, f"samples_{n}x16x16x1.npz")) as f:
        return f["arr_0"].astype(np.float64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200)
    n = p.parse_args().images
    ref = draw(["--sampler", "ddim", "--steps", "200"], n)
    print("| sampler | steps | RMS vs DDIM-200 (of 255) | saturated pixels |")
    print("|---|---|---|---|")
    for sampler in ("ddim", "unipc", "dpm++", "deis", "ipndm", "plms", "heun"):
        for steps in range(1, 6):
            spacing = ["--spacing", "trailing"] if steps == 1 else []
            x = draw(["--sampler", sampler, "--steps", str(steps), *spacing], n)
            if x is None:
                print(f"| {sampler} | {steps} | refused or blew up | |")
                continue
            rms = float(np.sqrt(((x - ref) ** 2).mean()))
            print(f"| {sampler} | {steps} | {rms:.1f} | {float(((x == 0) | (x == 255)).mean()):.1%} |", flush=True)


if __name__ == "__main__":
    main()
