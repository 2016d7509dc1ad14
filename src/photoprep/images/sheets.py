"""Contact sheets: rows of thumbnails with captions, saved as PNG, for judging by eye."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from photoprep.io import write_with

CAPTION_PX = 14
GAP = 4


def _save_png(sheet: Image.Image, path: str | Path) -> None:
    write_with(path, lambda tmp: sheet.save(tmp, format="PNG", optimize=False))


def contact_sheet(
    rows: list[list[tuple[np.ndarray, str]]],
    titles: list[str],
    path: str | Path,
    title_width: int = 110,
) -> None:
    """Draw each row's (thumbnail, caption) pairs after its title and save a PNG.

    Thumbnails are uint8 H x W x 3 arrays of one size. An empty sheet says so instead.
    """
    font = ImageFont.load_default()
    if not rows or not any(rows):
        sheet = Image.new("RGB", (420, 40), "white")
        ImageDraw.Draw(sheet).text((GAP, 12), "nothing to show", fill="black", font=font)
        _save_png(sheet, path)
        return
    th, tw = next(r for r in rows if r)[0][0].shape[:2]
    cell_w, cell_h = tw + GAP, th + CAPTION_PX + GAP
    width = title_width + cell_w * max(len(r) for r in rows) + GAP
    sheet = Image.new("RGB", (width, cell_h * len(rows) + GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (row, title) in enumerate(zip(rows, titles, strict=True)):
        y = GAP + r * cell_h
        draw.text((GAP, y + th // 2), title[:26], fill="black", font=font)
        for c, (pixels, caption) in enumerate(row):
            x = title_width + c * cell_w
            sheet.paste(Image.fromarray(np.ascontiguousarray(pixels)), (x, y))
            draw.text((x, y + th + 1), caption[: max(4, tw // 6)], fill="black", font=font)
    _save_png(sheet, path)


THUMB = (96, 96)
MAX_PER_ROW = 10


def draw_near_groups(groups: list[pd.DataFrame], thumbs: np.ndarray, path: str | Path) -> None:
    """The largest near-duplicate groups side by side: the kept image, then each member and its
    distance to it, so that a person can judge `dedup.near_threshold` by eye.

    ``groups`` are :func:`photoprep.images.dedup.near_groups_for_sheet`'s tables (at most
    ``MAX_PER_ROW`` members each); ``thumbs`` holds their pixels in that order, at ``THUMB``.
    """
    if not groups:
        contact_sheet([], [], path)
        return
    rows, titles, start = [], [], 0
    for group in groups:
        cells = []
        for offset, member in enumerate(group.itertuples()):
            label = "kept" if member.dup_of == "" else f"{member.dup_reason} d={member.dup_distance}"
            cells.append((thumbs[start + offset], label))
        start += len(group)
        titles.append(f"group {group['group'].iloc[0]}: {len(group)}")
        rows.append(cells)
    contact_sheet(rows, titles, path)


def draw_bucket_samples(samples: dict[str, list[int]], pixels: np.ndarray, path: str | Path) -> None:
    """A row of sample images from each kept bucket, at the common output size."""
    rows = [[(pixels[i], "") for i in positions] for positions in samples.values()]
    contact_sheet(rows, list(samples), path)
