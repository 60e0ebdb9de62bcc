"""python -m ddpm_fast.nll: the variational bound (negative log-likelihood, bits/dim) of images under a model.

Writes OUT/bpd.csv (one row per image: index, label, total, prior, decoder bits/dim) and OUT/terms.png (the
mean term against t: where the bits are), and prints mean +- standard error. The full bound takes one model
evaluation per timestep per image, batched over (image, t) pairs; --estimate K evaluates K timesteps per
image (t = 0 and one per stratum of the rest), an unbiased estimate with its standard error. Image k's
bound depends on (--seed, k) alone. torchrun shards the images; rank 0 writes.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys

import torch

from ddpm_fast import ops
from ddpm_fast.base import machine_memory_bytes
from ddpm_fast.cli import DefaultsHelpFormatter, add_run_args, command_exit, in_out_folder, run_main
from ddpm_fast.data import MAX_IMAGE_PIXELS, load_data, to_model_range
from ddpm_fast.fileio import atomic_write, atomic_write_text
from ddpm_fast.likelihood import bits_per_dim, default_variance
from ddpm_fast.loading import load_model
from ddpm_fast.openai import REPOS

DATA_NOTES = "data_notes.txt"  # what loading converted (channels, size, bit depth), when it converted


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.nll", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a model as ddpm_fast.sample takes it (default: the embedded "
                                                      "digits model)")
    p.add_argument("--openai-flags", default=None, help="the checkpoint is an openai .pt (see ddpm_fast.sample)")
    p.add_argument("--openai-repo", default="guided-diffusion", choices=list(REPOS))
    p.add_argument("--data", required=True, help="an image folder, an .npz of images, or 'digits'")
    p.add_argument("--num-images", type=int, default=100, help="the first N images of --data")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="largest image (width x height) an image folder may hold; a larger one is refused before "
                        "anything is decoded")
    p.add_argument("--batch-size", type=int, default=256, help="(image, t) pairs per model call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--estimate", type=int, default=None, metavar="K",
                   help="K timesteps per image instead of all T (stratified; mean and standard error)")
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional models: the bound given each image's label from --data (default: "
                        "the null label, i.e. the unconditional likelihood)")
    p.add_argument("--fp16", action="store_true", help="the fast path (as ddpm_fast.sample --fp16)")
    p.add_argument("--engine", choices=["eager", "graph"], default="eager",
                   help="graph: each batch of (image, t) pairs is a replay of one captured CUDA graph (on a GPU; "
                        "on a CPU the same loop runs eagerly)")
    add_run_args(p, out="nll")
    return p


def _bounded_batch(batch_size: int, config, notes: list[str]) -> int:
    """--batch-size, capped (with a note) at the (image, t) rows whose activations fit in half this machine's
    memory beside the weights (the model's own cost estimate, config.cost)."""
    params, act = config.cost()
    fits = max(1, int((machine_memory_bytes() / 2 - 4 * params) // act))
    if batch_size <= fits:
        return batch_size
    notes.append(f"--batch-size {batch_size}: about {batch_size * act / 2**30:,.1f} GiB of activations, over half of "
                 f"this machine's memory; ran {fits} (image, t) rows per forward")
    return fits


def _images_8bit(data, index: torch.Tensor, notes: list[str]) -> torch.Tensor:
    """uint8 NHWC images (the bound is defined on the 8-bit grid; 16-bit images are rounded to it, with a note)."""
    images = data.get(index)
    if images.dtype == torch.uint16:
        note = "16-bit images are rounded to 8 bits: the bound is defined on the 8-bit grid"
        if note not in notes:
            notes.append(note)
        images = ((images.to(torch.int32) + 128) // 257).clamp(0, 255).to(torch.uint8)
    return images


def _labels(args, model, data, index: torch.Tensor):
    config = model.config
    if not config.num_classes:
        if args.conditional:
            raise ValueError("--conditional needs a class-conditional model; this one is unconditional")
        return None
    if args.conditional or config.null_label is None:
        if data.labels is None:
            why = "--conditional" if args.conditional else "this model has no null label, so it"
            raise ValueError(f"{why} needs each image's label, and {args.data} has none")
        labels = data.labels[index]
        if int(labels.max()) >= config.num_classes:
            raise ValueError(f"{args.data} has labels up to {int(labels.max())}; the model takes "
                             f"{config.num_classes} classes")
        return labels
    return None


def run(args) -> dict | None:
    return in_out_folder(args, _run)


def _run(args, dist_ctx) -> dict | None:
    from tqdm.auto import tqdm

    notes = _check_targets(args) if dist_ctx.rank == 0 else []
    model, schedule = load_model(args.checkpoint, openai_flags=args.openai_flags, openai_repo=args.openai_repo,
                                 device=dist_ctx.device, prog="ddpm_fast.nll")
    batch_size = _bounded_batch(args.batch_size, model.config, notes)
    variance = default_variance(model, schedule)
    if args.fp16:
        dev = dist_ctx.device
        dtype = torch.float16 if dev.type == "cuda" else ops.cpu_half_dtype()
        model = model.to_fast(dtype, copy=False)  # the reference is not needed again: no second copy
    cfg = model.config
    data = load_data(args.data, cfg.sample_size, cfg.in_channels, args.max_image_pixels)
    converted = list(getattr(data, "notes", ()))  # what loading changed to fit the model: said, and kept beside
    notes.extend(converted)
    n = min(args.num_images, len(data))
    mine = torch.arange(n)[dist_ctx.rank::dist_ctx.world]
    labels_all = _labels(args, model, data, torch.arange(n))  # what the model is given (None: no/null label)
    data_labels = None if data.labels is None else data.labels[:n]  # what the csv reports
    big_t = len(schedule)
    per_image = args.estimate or big_t
    rows, term_sum, term_count = [], torch.zeros(big_t, dtype=torch.float64), torch.zeros(big_t, dtype=torch.float64)
    chunk = max(1, batch_size // per_image) if per_image <= batch_size else 1
    bar = tqdm(total=len(mine), unit="img", desc="bound", disable=args.no_progress or dist_ctx.rank != 0,
               dynamic_ncols=True)
    running = []
    for part in mine.split(chunk) if len(mine) else ():
        x0 = to_model_range(_images_8bit(data, part, notes), dist_ctx.device)
        labels = None if labels_all is None else labels_all[part]
        bound = bits_per_dim(model, schedule, x0, seed=args.seed, class_labels=labels, variance=variance,
                             image_index=part, batch_size=batch_size, estimate=args.estimate,
                             engine=args.engine)
        if not bool(torch.isfinite(bound.total_bpd).all()):
            k = int(part[~torch.isfinite(bound.total_bpd)][0])
            raise ValueError(f"the bound of image {k} is not finite; check the checkpoint's weights; nothing was "
                             "written")
        for i, k in enumerate(part.tolist()):
            rows.append((k, None if data_labels is None else int(data_labels[k]), float(bound.total_bpd[i]),
                         float(bound.prior_bpd[i]), float(bound.decoder_bpd[i]), float(bound.stderr[i])))
        term_sum.index_add_(0, bound.timesteps.reshape(-1), bound.vb.reshape(-1).double())
        term_count.index_add_(0, bound.timesteps.reshape(-1), torch.ones(bound.vb.numel(), dtype=torch.float64))
        running += bound.total_bpd.tolist()
        bar.update(len(part))
        bar.set_postfix(bpd=f"{sum(running) / len(running):.4f}")
    bar.close()
    rows, term_sum, term_count = _gather(dist_ctx, rows, term_sum, term_count)
    dist_ctx.close()
    if dist_ctx.rank != 0:
        return None
    for note in notes:
        print(f"ddpm_fast.nll: note: {note}", file=sys.stderr)
    return _write(args, rows, term_sum, term_count, variance, converted)


def _targets(out: str) -> dict[str, str]:
    return {name: os.path.join(out, name) for name in ("bpd.csv", "terms.png", DATA_NOTES)}


def _check_targets(args) -> list[str]:
    """Before any work: what the run writes must be files (not folders); returns notes on files it replaces."""
    replaced = []
    for path in _targets(args.out).values():
        if os.path.exists(path) and not os.path.isfile(path):
            raise OSError(f"{path}: exists and is not a file; the run writes it (move it away or pick another --out)")
        if os.path.isfile(path) and not path.endswith(DATA_NOTES):
            replaced.append(path)
    return [f"replacing {', '.join(replaced)} from an earlier run"] if replaced else []


def _gather(dist_ctx, rows, term_sum, term_count):
    if dist_ctx.world == 1:
        return rows, term_sum, term_count
    import torch.distributed as dist

    gathered = [None] * dist_ctx.world if dist_ctx.rank == 0 else None
    dist.gather_object((rows, term_sum, term_count), gathered, dst=0)
    if dist_ctx.rank != 0:
        return rows, term_sum, term_count
    rows = sorted(r for g in gathered for r in g[0])
    return rows, sum(g[1] for g in gathered), sum(g[2] for g in gathered)


def _write(args, rows, term_sum, term_count, variance: str, converted: list[str]) -> dict:
    totals = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    n = len(rows)
    mean = float(totals.mean())
    sem = float(totals.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    prior = sum(r[3] for r in rows) / n
    decoder = [r[4] for r in rows if math.isfinite(r[4])]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "label", "total_bpd", "prior_bpd", "decoder_bpd"] + (["stderr"] if args.estimate else []))
    for k, label, total, pri, dec, err in rows:
        writer.writerow([k, "" if label is None else label, f"{total:.6f}", f"{pri:.6g}", f"{dec:.6f}"]
                        + ([f"{err:.6f}"] if args.estimate else []))
    targets = _targets(args.out)
    csv_path, png_path, notes_path = targets["bpd.csv"], targets["terms.png"], targets[DATA_NOTES]
    _plot_terms(term_sum / term_count.clamp(min=1), term_count > 0, png_path)
    if converted:  # the bound is of the converted images: the record says so beside the numbers
        atomic_write_text(notes_path, "".join(f"{note}\n" for note in converted))
    elif os.path.isfile(notes_path):
        os.unlink(notes_path)  # an earlier run's: not this bound's
    atomic_write_text(csv_path, buf.getvalue())
    how = f"estimate from {args.estimate} timesteps per image" if args.estimate else "full bound"
    decoder_text = f"{sum(decoder) / len(decoder):.4f}" if decoder else "n/a"
    spread = f" +- {sem:.4f}" if n > 1 else ""
    on = f"; on converted data, see {notes_path}" if converted else ""
    print(f"{n} images: {mean:.4f}{spread} bits/dim ({how}, variance {variance}{on}); prior {prior:.2e}, "
          f"decoder (t=0) {decoder_text} -> {csv_path}, {png_path}")
    return {"mean": mean, "sem": sem, "csv": csv_path, "png": png_path}


def _plot_terms(mean_terms: torch.Tensor, seen: torch.Tensor, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t = torch.nonzero(seen).flatten()
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(t.tolist(), mean_terms[t].tolist(), color="tab:blue", linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("mean term (bits/dim)")
    ax.set_title("the variational bound's terms (t = 0: the decoder)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1 or args.max_image_pixels < 1:
        parser.error("--num-images, --batch-size and --max-image-pixels must be positive")
    if args.estimate is not None and args.estimate < 2:
        parser.error("--estimate K needs K >= 2 (t = 0 and at least one stratum)")
    if args.openai_flags is not None and args.checkpoint is None:
        parser.error("--openai-flags describes an openai .pt: give it with --checkpoint")
    return run_main("ddpm_fast.nll", parser, args, run)


if __name__ == "__main__":
    command_exit(main())
