"""Pictures of label maps: a fixed palette, palette PNGs and overlays with a legend.

The palette depends only on the class index, so class 3 has the same colour in every label PNG,
overlay and run; label PNGs store the class index itself (viewers show the colour, tools read the
index), which keeps them lossless and machine-readable.
"""

from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Kelly's colours of maximum contrast (white and black left out): the first 20 classes, which are
# the ones most images show, get colours people tell apart at a glance.
_KELLY = [
    0xF3C300, 0x875692, 0xF38400, 0xA1CAF1, 0xBE0032, 0xC2B280, 0x848482, 0x008856, 0xE68FAC, 0x0067A5,
    0xF99379, 0x604E97, 0xF6A600, 0xB3446C, 0xDCD300, 0x882D17, 0x8DB600, 0x654522, 0xE25822, 0x2B3D26,
]
_GOLDEN = 0.618033988749895


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours; entry i is the same for every n.

    After Kelly's 20 colours, hues step by the golden ratio (never repeating) while saturation and
    brightness cycle through three levels each, so neighbouring indices stay far apart.
    """
    if n < 0:
        raise ValueError(f"palette size must be non-negative, got {n}")
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        if i < len(_KELLY):
            c = _KELLY[i]
            out[i] = ((c >> 16) & 255, (c >> 8) & 255, c & 255)
        else:
            j = i - len(_KELLY)
            h = (0.05 + j * _GOLDEN) % 1.0
            s = (0.9, 0.6, 0.75)[j % 3]
            v = (0.95, 0.72, 0.5)[(j // 3) % 3]
            out[i] = [round(255 * x) for x in colorsys.hsv_to_rgb(h, s, v)]
    return out


def _to_numpy(labels) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"expected a label map of shape (H, W), got {arr.shape}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"label maps hold class indices >= 0, got {int(arr.min())}")
    return arr


def label_png(labels) -> Image.Image:
    """A label map (H, W) as a palette ('P') image whose pixel values are the class indices.

    More than 256 classes do not fit a palette image: the map is then a 16-bit greyscale image
    (values are still the indices, without colours).
    """
    arr = _to_numpy(labels)
    top = int(arr.max()) if arr.size else 0
    if top < 256:
        img = Image.fromarray(arr.astype(np.uint8))  # "L"; putpalette turns it into "P"
        img.putpalette(palette(256).tobytes())
        return img
    if top < 65536:
        return Image.fromarray(arr.astype(np.uint16))
    raise ValueError(f"label value {top} does not fit a 16-bit PNG")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _legend_name(class_names: Sequence[str], i: int) -> str:
    name = class_names[i] if i < len(class_names) else f"class {i}"
    return name[:37] + "..." if len(name) > 40 else name


def _legend_entries(labels: np.ndarray, class_names: Sequence[str]) -> list[tuple[int, str]]:
    return [(i, _legend_name(class_names, i)) for i in np.unique(labels).tolist()]


def _draw_legend(entries, font, colours, max_extent: int, below: bool) -> Image.Image:
    """A white panel with a grid of swatch + name entries, in class order.

    `entries` are (class index, name); index None draws the hatched "ignored" swatch. `below`: as
    many columns as fit in `max_extent` pixels of width, filled row by row; otherwise as many rows as
    fit in `max_extent` pixels of height, filled column by column.
    """
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 3)
    line = ascent + descent
    swatch = line
    pad, gap = max(4, line // 3), max(8, line // 2)
    col_w = max(swatch + pad + int(np.ceil(font.getlength(name))) for _, name in entries)
    step_x, step_y = col_w + gap, line + pad
    n = len(entries)
    if below:
        ncols = max(1, min(n, (max_extent - 2 * pad + gap) // step_x))
        nrows = -(-n // ncols)
        cells = [(k // ncols, k % ncols) for k in range(n)]
    else:
        nrows = max(1, min(n, (max_extent - 2 * pad + pad) // step_y))
        ncols = -(-n // nrows)
        cells = [(k % nrows, k // nrows) for k in range(n)]
    width = 2 * pad + ncols * step_x - gap
    height = 2 * pad + nrows * step_y - pad
    panel = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(panel)
    for (row, col), (i, name) in zip(cells, entries):
        x, y = pad + col * step_x, pad + row * step_y
        if i is None:
            panel.paste(Image.fromarray(_ignored_fill(swatch, swatch)), (x, y))
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], outline=(0, 0, 0))
        else:
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(int(c) for c in colours[i]),
                           outline=(0, 0, 0))
        draw.text((x + swatch + pad, y), name, fill=(0, 0, 0), font=font)
    return panel


def _boundaries(labels: np.ndarray) -> np.ndarray:
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edge


def overlay(image_uint8, labels, class_names: Sequence[str], alpha: float = 0.5, boundaries: bool = True,
            banner: str | None = None) -> Image.Image:
    """The image with class colours blended in (`alpha` = colour weight) and a legend beside it.

    `image_uint8` is (H, W, 3) uint8 (a PIL RGB image works too); `labels` (H, W) indexes
    `class_names`. The legend lists only the classes present, in class order; it goes below or to
    the right of the picture (whichever gives the smaller canvas), never over it. `boundaries` draws
    the region borders in white so that touching regions of similar colour stay apart. `banner`
    (e.g. the random-weights warning) is written in a red strip above everything.
    """
    img = np.asarray(image_uint8)
    lab = _to_numpy(labels)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    if img.shape[:2] != lab.shape:
        raise ValueError(f"image {img.shape[:2]} and labels {lab.shape} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = palette(int(lab.max()) + 1 if lab.size else 1)
    blend = (1.0 - alpha) * img.astype(np.float32) + alpha * colours[lab].astype(np.float32)
    out = np.clip(blend + 0.5, 0, 255).astype(np.uint8)
    if boundaries:
        out[_boundaries(lab)] = 255
    picture = Image.fromarray(out)
    entries = _legend_entries(lab, class_names)
    h, w = lab.shape
    font = _font(max(14, min(64, round(max(h, w) / 32))))
    if not entries:
        return with_banner(picture, banner, font)
    below_panel = _draw_legend(entries, font, colours, w, below=True)
    right_panel = _draw_legend(entries, font, colours, h, below=False)
    below_size = (max(w, below_panel.width), h + below_panel.height)
    right_size = (w + right_panel.width, max(h, right_panel.height))
    # the placement that wastes less space; a tie goes below a landscape image, beside a portrait one
    below_area, right_area = below_size[0] * below_size[1], right_size[0] * right_size[1]
    if below_area < right_area or (below_area == right_area and w >= h):
        canvas = Image.new("RGB", below_size, "white")
        canvas.paste(picture, (0, 0))
        canvas.paste(below_panel, (0, h))
    else:
        canvas = Image.new("RGB", right_size, "white")
        canvas.paste(picture, (0, 0))
        canvas.paste(right_panel, (w, 0))
    return with_banner(canvas, banner, font)


# ---------------------------------------------------------------- example pictures (ovseg bench --save-examples)
IGNORED_NAME = "ignored (not scored)"
#: written on every picture made with random weights
RANDOM_WEIGHTS_BANNER = "RANDOM WEIGHTS: a smoke test, not a result"
_IGNORED_FILL, _IGNORED_STRIPE = (200, 200, 200), (120, 120, 120)
_OUTLINE = (25, 25, 25)
_BANNER = (170, 20, 40)


def _ignored_fill(h: int, w: int) -> np.ndarray:
    """Neutral grey with diagonal stripes: unlike any class colour, including the palette's grey."""
    y, x = np.mgrid[:h, :w]
    out = np.empty((h, w, 3), np.uint8)
    out[:] = _IGNORED_FILL
    out[(x + y) % 8 < 2] = _IGNORED_STRIPE
    return out


def colour_labels(labels, ignore_index: int | None = None, outlines: bool = True) -> np.ndarray:
    """(H, W, 3) uint8: solid palette colours, ignored pixels hatched grey, region borders dark."""
    lab = _to_numpy(labels).astype(np.int64)
    ignored = lab == ignore_index if ignore_index is not None else np.zeros(lab.shape, bool)
    classes = np.where(ignored, 0, lab)
    out = palette(int(classes.max()) + 1 if classes.size else 1)[classes]
    if ignored.any():
        out[ignored] = _ignored_fill(*lab.shape)[ignored]
    if outlines:
        out[_boundaries(lab)] = _OUTLINE
    return out


def with_banner(picture: Image.Image, text: str | None, font=None) -> Image.Image:
    """`picture` under a red strip saying `text`, wrapped to the picture's width (nothing when None)."""
    if not text:
        return picture
    font = font or _font(max(14, picture.width // 40))
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 3)
    line, pad = ascent + descent, max(4, (ascent + descent) // 3)
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= picture.width - 2 * pad:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    strip = Image.new("RGB", (picture.width, len(lines) * line + 2 * pad), _BANNER)
    draw = ImageDraw.Draw(strip)
    for k, words in enumerate(lines):
        draw.text((pad, pad + k * line), words, fill=(255, 255, 255), font=font)
    canvas = Image.new("RGB", (picture.width, picture.height + strip.height), "white")
    canvas.paste(strip, (0, 0))
    canvas.paste(picture, (0, strip.height))
    return canvas


def _view_size(h: int, w: int, short_min: int = 192, long_max: int = 640) -> tuple[int, int]:
    """Display size of a panel: small images enlarged, large ones reduced, aspect kept."""
    scale = max(short_min / min(h, w), 1.0)
    scale = min(scale, long_max / max(h, w)) if max(h, w) * scale > long_max else scale
    return max(1, round(h * scale)), max(1, round(w * scale))


def example_picture(image_uint8, prediction, truth, class_names: Sequence[str], ignore_index: int | None = 255,
                    title: str | None = None, banner: str | None = None) -> Image.Image:
    """Image | prediction | ground truth, each titled, in solid class colours with outlined regions and
    one legend shared by both label maps (ignored pixels: hatched grey, listed as such).

    Colours are not blended with the image, so a region has exactly its legend swatch's colour.
    `title` goes above the panels; `banner` (the random-weights warning) in a red strip on top.
    """
    img = np.asarray(image_uint8)
    pred, gt = _to_numpy(prediction), _to_numpy(truth)
    if img.shape[:2] != pred.shape or pred.shape != gt.shape:
        raise ValueError(f"image {img.shape[:2]}, prediction {pred.shape} and truth {gt.shape} differ in size")
    h, w = _view_size(*pred.shape)
    near = Image.Resampling.NEAREST

    def resized(labels):
        return np.asarray(Image.fromarray(labels.astype(np.int32)).resize((w, h), near)).astype(np.int64)

    panels = [("Image", Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR)),
              ("Prediction", Image.fromarray(colour_labels(resized(pred), None))),
              ("Ground truth", Image.fromarray(colour_labels(resized(gt), ignore_index)))]
    font = _font(max(14, min(32, round(max(h, w) / 24))))
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 3)
    line, gap = ascent + descent, max(8, (ascent + descent) // 2)
    width = 3 * w + 4 * gap
    top = gap + (line + gap if title else 0)
    canvas = Image.new("RGB", (width, top + line + gap // 2 + h + gap), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, gap), title, fill=(0, 0, 0), font=font)
    for k, (name, panel) in enumerate(panels):
        x = gap + k * (w + gap)
        draw.text((x + (w - font.getlength(name)) / 2, top), name, fill=(0, 0, 0), font=font)
        canvas.paste(panel, (x, top + line + gap // 2))

    present = sorted(set(np.unique(pred).tolist()) | set(np.unique(gt[gt != ignore_index]).tolist()))
    entries = [(i, _legend_name(class_names, i)) for i in present]
    if ignore_index is not None and (gt == ignore_index).any():
        entries.append((None, IGNORED_NAME))
    if entries:
        legend = _draw_legend(entries, font, palette(max(present, default=0) + 1), width, below=True)
        full = Image.new("RGB", (width, canvas.height + legend.height), "white")
        full.paste(canvas, (0, 0))
        full.paste(legend, (0, canvas.height))
        canvas = full
    return with_banner(canvas, banner, font)

