"""Side-by-side pictures of two detectors' predictions (boxes, masks, labels) with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60)]


def draw_detections(image: torch.Tensor, output: dict, names: dict[int, str], score_thresh: float = 0.5,
                    scale: int = 2) -> Image.Image:
    """image (3, H, W) in [0, 1] and one image's detections -> an RGB picture ``scale`` times larger
    with the masks (thresholded at 0.5) tinted, the boxes outlined and labelled."""
    pixels = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.float32)
    keep = output["scores"] >= score_thresh
    labels = output["labels"][keep].tolist()
    if "masks" in output:
        for m, label in zip(output["masks"][keep][:, 0].numpy(), labels):
            colour = np.array(PALETTE[label % len(PALETTE)], dtype=np.float32)
            sel = m > 0.5
            pixels[sel] = 0.45 * pixels[sel] + 0.55 * colour
    picture = Image.fromarray(pixels.round().astype(np.uint8)).resize(
        (image.shape[2] * scale, image.shape[1] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for box, label, score in zip(output["boxes"][keep].tolist(), labels, output["scores"][keep].tolist()):
        colour = PALETTE[label % len(PALETTE)]
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        text = f"{names.get(label, label)} {score:.2f}"
        tw = draw.textlength(text, font=font)
        ty = max(0, y0 - 12)
        draw.rectangle([x0, ty, x0 + tw + 4, ty + 12], fill=colour)
        draw.text((x0 + 2, ty), text, fill=(255, 255, 255), font=font)
    return picture


def save_comparison(path: str | Path, adapter, left: torch.nn.Module, right: torch.nn.Module, n_images: int = 4,
                    titles: tuple[str, str] = ("teacher", "student"), score_thresh: float = 0.5) -> Path:
    """The first ``n_images`` validation images, ``left`` model's predictions | ``right`` model's, one row each."""
    from .coco import load_coco

    label_to_cat = adapter.label_to_category()
    coco = load_coco(adapter.data.val_annotations)
    names = {label: coco.cats[cat]["name"] for label, cat in label_to_cat.items()}
    batch = next(adapter.eval_batches(0, 1, n_images))
    rows = []
    for model in (left, right):
        outputs = adapter.predict(model, batch)
        rows.append([draw_detections(img, o, names, score_thresh) for img, o in zip(batch["images"], outputs)])
    pad, header = 8, 20
    w = max(p.width for p in rows[0])
    h = sum(p.height for p in rows[0]) + pad * (len(rows[0]) - 1)
    canvas = Image.new("RGB", (2 * w + 3 * pad, h + header + 2 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for col, (title, pictures) in enumerate(zip(titles, rows)):
        x = pad + col * (w + pad)
        draw.text((x, 4), title, fill=(0, 0, 0), font=ImageFont.load_default())
        y = header
        for p in pictures:
            canvas.paste(p, (x, y))
            y += p.height + pad
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
