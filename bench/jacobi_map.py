"""Which forward pass accepted each token under speculative Jacobi decoding, as a picture.

    python bench/jacobi_map.py --gpt-ckpt results/gpt/000-GPT-tiny/checkpoints/last.pt \
        --vq-ckpt results/vq/000-VQ-tiny/checkpoints/last.pt --labels 0 1 2 3 --out map.png

Per label (two to a row), an image sampled alone (one gpt.generate call, so its passes are its
own), then its token grid with, in each cell, the forward pass that accepted the token (the
prefill is pass 1), shaded from light (early) to dark (late). Equal numbers side by side are
tokens accepted together; numbers that climb by one along a row are corrections travelling one
token per pass (README, speculative Jacobi decoding). Takes sample.py's flags (--cfg-scale,
--top-k, --seed, --jacobi-window: 16 if not given or 0, ...); --out must be a .png.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import data  # noqa: E402
import sample  # noqa: E402

LIGHT, DARK = np.array([255, 244, 196]), np.array([24, 52, 120])  # first and last pass
CELL, CAPTION = 20, 14  # pixels: a token's cell (room for "576"), the caption line above a row


def acceptance_passes(accepted, length):
    """One row's stats["accepted"] (its accepted tokens after each pass past the prefill) ->
    (length,) the pass that accepted each token: the prefill (pass 1) gives token 0, pass j + 2
    the tokens from accepted[j - 1] (1 for j = 0) up to accepted[j] - 1."""
    t = np.arange(length)
    return 1 + (t >= 1) + (np.array(accepted)[:, None] <= t).sum(0)


def token_map(passes, grid, last):
    """(grid * grid,) pass numbers -> a PIL picture of the token grid, one shaded cell each."""
    picture = Image.new("RGB", (grid * CELL, grid * CELL))
    pen = ImageDraw.Draw(picture)
    for i, n in enumerate(passes.tolist()):
        x, y = (i % grid) * CELL, (i // grid) * CELL
        shade = (n - 1) / max(last - 1, 1)  # 0 for the prefill, 1 for the last pass
        pen.rectangle(
            [x, y, x + CELL - 1, y + CELL - 1], tuple((LIGHT + shade * (DARK - LIGHT)).astype(int))
        )
        pen.text(
            (x + CELL / 2, y + CELL / 2), str(n), "white" if shade > 0.5 else "black", anchor="mm"
        )
    return picture


def parse_args(argv=None):
    """sample.py's flags; the window defaults to 16 and --out to jacobi_map.png."""
    args = sample.parse_args(argv)
    args.jacobi_window = args.jacobi_window or 16
    args.out = args.out or "jacobi_map.png"
    if not args.out.endswith(".png") or args.num_samples or args.complete:
        raise common.UserError("jacobi_map.py draws a .png (--out map.png), no .npz, no --complete")
    return args


def main(args):
    models = sample.load_models(args)
    c, device, side = models.gpt.config, models.env.device, models.gpt.config.grid_size * CELL
    if c.model_type != "c2i":
        raise common.UserError("jacobi_map.py needs a class-conditional GPT (--labels)")
    labels = sample.parse_labels(args.labels or ["0", "1", "2", "3"], c.num_classes)
    cols, rows, height = min(2, len(labels)), -(-len(labels) // 2), CAPTION + side + 2
    figure = Image.new("RGB", (cols * (2 * side + 8), rows * height + 2), "white")
    for i, label in enumerate(labels):  # two per row: image, map, image, map
        stats = {}  # one image per call: its passes are its own, not its batch's
        cond = torch.tensor([label], device=device)
        image = sample.draw(args, models, args.seed, cond, stats=stats)  # (1, 3, S, S)
        passes = acceptance_passes([n for (n,) in stats["accepted"]], c.block_size)
        left, top = (i % 2) * (2 * side + 8) + 2, (i // 2) * height + 2
        picture = Image.fromarray(data.to_uint8(image)[0].numpy()).resize((side, side))
        figure.paste(picture, (left, top + CAPTION))
        figure.paste(token_map(passes, c.grid_size, passes.max()), (left + side + 2, top + CAPTION))
        caption = f"class {label}: {passes.max()} passes for {c.block_size} tokens"
        ImageDraw.Draw(figure).text((left, top), caption, "black")
    with common.atomic_write(args.out) as f:
        figure.save(f, "PNG")
    print(f"wrote {args.out}")
    return Path(args.out)


if __name__ == "__main__":
    common.cli(main, parse_args)
