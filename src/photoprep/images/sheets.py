"""Contact sheets: rows of thumbnails with captions, saved as PNG, for judging by eye."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from photoprep.core.io import write_with

CAPTION_PX = 14
GAP = 4


def _save_png(sheet: Image.Image, path: str | Path) -> None:
    write_with(path, lambda tmp: sheet.save(tmp, format="PNG", optimize=False))


def contact_sheet(
    rows: list[list[tuple[np.ndarray, str]]],
    titles: list[str],
    path: str | Path,
    title_width: int = 110,
    caption_lines: int = 1,
) -> None:
    """Draw each row's (thumbnail, caption) pairs after its title and save a PNG.

    Thumbnails are uint8 H x W x 3 arrays of one size; a caption holds up to
    `caption_lines` lines (split on newlines). An empty sheet says so instead.
    """
    font = ImageFont.load_default()
    if not rows or not any(rows):
        sheet = Image.new("RGB", (420, 40), "white")
        ImageDraw.Draw(sheet).text((GAP, 12), "nothing to show", fill="black", font=font)
        _save_png(sheet, path)
        return
    th, tw = next(r for r in rows if r)[0][0].shape[:2]
    cell_w, cell_h = tw + GAP, th + CAPTION_PX * caption_lines + GAP
    width = title_width + cell_w * max(len(r) for r in rows) + GAP
    sheet = Image.new("RGB", (width, cell_h * len(rows) + GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (row, title) in enumerate(zip(rows, titles, strict=True)):
        y = GAP + r * cell_h
        draw.text((GAP, y + th // 2), title[:26], fill="black", font=font)
        for c, (pixels, caption) in enumerate(row):
            x = title_width + c * cell_w
            sheet.paste(Image.fromarray(np.ascontiguousarray(pixels)), (x, y))
            for line_no, line in enumerate(caption.split("\n")[:caption_lines]):
                y_text = y + th + 1 + line_no * CAPTION_PX
                draw.text((x, y_text), line[: max(4, tw // 5)], fill="black", font=font)
    _save_png(sheet, path)


THUMB = (96, 96)
MAX_PER_ROW = 10


def member_caption(member: pd.Series) -> str:
    """Three lines under a thumbnail: the role (kept, and the criterion it won on; or the
    distance to the kept copy and the criterion the member lost on), how it matched (crop,
    mirror, rotation) and size, the format, JPEG quality and grey."""
    reason = str(member.get("keep_reason", "") or "")
    if member["dup_of"] == "":
        role, turn = (f"kept ({reason})" if reason else "kept"), ""
    else:
        role = f"d={member['dup_distance']} lost {reason}"
        kind = str(member["dup_reason"])
        turn = kind.removeprefix("near_") + " " if kind.startswith("near_") else ""
        turn = "exact " if kind == "exact" else turn
    size = f"{turn}{int(member['width'])}x{int(member['height'])}"
    quality = int(member.get("quality", 0) or 0)
    detail = str(member.get("format", "") or "") + (f" q{quality}" if quality else "")
    detail += "" if bool(member.get("colour", True)) else " grey"
    return f"{role}\n{size}\n{detail}"


def draw_near_groups(groups: list[pd.DataFrame], thumbs: np.ndarray, path: str | Path) -> None:
    """The largest near-duplicate groups side by side: the kept copy first with the criterion
    it won on, then each member with its distance to it and the criterion it lost on
    (`photoprep.images.dedup.KEEP_REASONS`), its size, format and JPEG quality, so that a
    person can judge `dedup.near_threshold` and the keep rule by eye.

    ``groups`` are :func:`photoprep.images.dedup.near_groups_for_sheet`'s tables (at most
    ``MAX_PER_ROW`` members each); ``thumbs`` holds their pixels in that order, at ``THUMB``.
    """
    if not groups:
        contact_sheet([], [], path)
        return
    rows, titles, start = [], [], 0
    for group in groups:
        cells = []
        for offset, (_, member) in enumerate(group.iterrows()):
            cells.append((thumbs[start + offset], member_caption(member)))
        start += len(group)
        titles.append(f"group {group['group'].iloc[0]}: {len(group)}")
        rows.append(cells)
    contact_sheet(rows, titles, path, caption_lines=3)


def draw_bucket_samples(samples: dict[str, list[int]], pixels: np.ndarray, path: str | Path) -> None:
    """A row of sample images from each kept bucket, at the common output size."""
    rows = [[(pixels[i], "") for i in positions] for positions in samples.values()]
    contact_sheet(rows, list(samples), path)
