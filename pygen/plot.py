"""Dependency-free figures for ``pygen demo``: a PNG writer and a tiny rasteriser (no matplotlib).

Plain Python + numpy + torch on the CPU; no kernels, no pygen ops.

- ``write_png(path, rgb)``: an (H, W, 3) uint8 image as an 8-bit RGB PNG
  (IHDR, one zlib-compressed IDAT, IEND; CRC-32 per chunk; filter type 0 on
  every row).
- ``density_figure(mixture, panels, path, *, size, extent, ...)``: one panel
  per ``(title, samples)``, side by side (wrapping after ``columns`` panels),
  each showing the target density of a 2-D ``pygen.models.GaussianMixture``
  (``mixture.log_prob`` on the pixel grid) as a light shaded background plus
  iso-density contour lines, and the samples as small dark dots. Titles are
  drawn with a built-in 5x7 bitmap font (upper case, digits and
  `` _-+.()=/:,%<>?``; lower case is drawn in upper case, other characters as
  ``?``). Samples outside the extent are not drawn; non-finite samples are
  skipped and counted (the return value), never silently dropped.
"""
import math
import struct
import zlib

import numpy as np
import torch

__all__ = ["write_png", "density_figure", "render_text", "text_width", "default_extent",
           "BACKGROUND", "DOT", "CONTOUR", "SEPARATOR", "TEXT"]

# colours (RGB)
BACKGROUND = (255, 255, 255)  # zero density
SHADE = (198, 214, 240)  # the density maximum (background is white -> SHADE by density)
CONTOUR = (70, 100, 170)
DOT = (150, 20, 20)
SEPARATOR = (90, 90, 90)
TEXT = (20, 20, 20)
TITLE_BG = (255, 255, 255)

# contour levels as fractions of the maximum density on the grid
CONTOUR_FRACTIONS = (0.7, 0.4, 0.15, 0.04, 0.008)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------
def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _as_rgb(rgb):
    if isinstance(rgb, torch.Tensor):
        rgb = rgb.detach().cpu().numpy()
    if not isinstance(rgb, np.ndarray):
        raise TypeError(f"rgb must be a numpy array or a tensor, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8:
        raise TypeError(f"rgb must have dtype uint8, got {rgb.dtype}")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"rgb must have shape (H, W, 3) with H, W >= 1, got {rgb.shape}")
    return np.ascontiguousarray(rgb)


def png_bytes(rgb):
    """The bytes of an 8-bit RGB PNG of ``rgb`` (H, W, 3) uint8."""
    rgb = _as_rgb(rgb)
    h, w, _ = rgb.shape
    # filter type 0 (None): a zero byte before each scanline
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), rgb.reshape(h, w * 3)], axis=1)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB), no interlace
    return (_PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + _chunk(b"IEND", b""))


def write_png(path, rgb):
    """Write ``rgb`` ((H, W, 3) uint8 numpy array or tensor) to ``path`` as a PNG; returns ``path``."""
    data = png_bytes(rgb)
    with open(path, "wb") as f:
        f.write(data)
    return path


# ---------------------------------------------------------------------------
# 5x7 bitmap font: each glyph is 7 rows of 5 bits (most significant = left)
# ---------------------------------------------------------------------------
_GLYPHS_SRC = {
    "A": "01110 10001 10001 11111 10001 10001 10001",
    "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110",
    "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111",
    "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111",
    "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110",
    "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001",
    "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001",
    "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110",
    "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110",
    "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110",
    "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010",
    "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 10001 01010 00100 00100 00100",
    "Z": "11111 00001 00010 00100 01000 10000 11111",
    "0": "01110 10001 10011 10101 11001 10001 01110",
    "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111",
    "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010",
    "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110",
    "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110",
    "9": "01110 10001 10001 01111 00001 00010 01100",
    " ": "00000 00000 00000 00000 00000 00000 00000",
    "_": "00000 00000 00000 00000 00000 00000 11111",
    "-": "00000 00000 00000 11111 00000 00000 00000",
    "+": "00000 00100 00100 11111 00100 00100 00000",
    ".": "00000 00000 00000 00000 00000 01100 01100",
    ",": "00000 00000 00000 00000 01100 00100 01000",
    ":": "00000 01100 01100 00000 01100 01100 00000",
    "(": "00010 00100 01000 01000 01000 00100 00010",
    ")": "01000 00100 00010 00010 00010 00100 01000",
    "=": "00000 00000 11111 00000 11111 00000 00000",
    "/": "00000 00001 00010 00100 01000 10000 00000",
    "%": "11000 11001 00010 00100 01000 10011 00011",
    "<": "00010 00100 01000 10000 01000 00100 00010",
    ">": "01000 00100 00010 00001 00010 00100 01000",
    "?": "01110 10001 00001 00010 00100 00000 00100",
}
GLYPH_W, GLYPH_H = 5, 7


def _glyph_bitmaps():
    out = {}
    for ch, src in _GLYPHS_SRC.items():
        rows = src.split()
        assert len(rows) == GLYPH_H and all(len(r) == GLYPH_W for r in rows), ch
        out[ch] = np.array([[c == "1" for c in r] for r in rows], dtype=bool)
    return out


_GLYPHS = _glyph_bitmaps()


def _glyph(ch):
    if ch not in _GLYPHS:
        ch = ch.upper()
    return _GLYPHS.get(ch, _GLYPHS["?"])


def text_width(text, scale=1):
    """Width in pixels of ``text`` drawn by ``render_text`` (one font pixel of spacing between glyphs)."""
    n = len(text)
    return 0 if n == 0 else scale * (n * (GLYPH_W + 1) - 1)


def render_text(img, text, x, y, color=TEXT, scale=1):
    """Draw ``text`` into ``img`` (H, W, 3) uint8 with its top-left corner at column x, row y.

    Glyph pixels that fall outside the image are dropped (no error).
    """
    h, w = img.shape[:2]
    for i, ch in enumerate(text):
        bm = _glyph(ch)
        if scale != 1:
            bm = np.kron(bm, np.ones((scale, scale), dtype=bool))
        x0 = x + i * (GLYPH_W + 1) * scale
        rs, cs = np.nonzero(bm)
        rs, cs = rs + y, cs + x0
        keep = (rs >= 0) & (rs < h) & (cs >= 0) & (cs < w)
        img[rs[keep], cs[keep]] = color
    return img


# ---------------------------------------------------------------------------
# density panels
# ---------------------------------------------------------------------------
def default_extent(mixture, n_std=3.5):
    """A square (xmin, xmax, ymin, ymax) holding every component's mean ± ``n_std`` stds."""
    mu = mixture.means.detach().to("cpu", torch.float64)[:, :2]
    sd = mixture.stds.detach().to("cpu", torch.float64)[:, :2]
    lo = (mu - n_std * sd).min(0).values
    hi = (mu + n_std * sd).max(0).values
    c = (lo + hi) / 2
    half = float((hi - lo).max()) / 2
    return (float(c[0]) - half, float(c[0]) + half, float(c[1]) - half, float(c[1]) + half)


def _check_extent(extent):
    try:
        xmin, xmax, ymin, ymax = (float(v) for v in extent)
    except (TypeError, ValueError):
        raise ValueError(f"extent must be (xmin, xmax, ymin, ymax), got {extent!r}") from None
    if not all(math.isfinite(v) for v in (xmin, xmax, ymin, ymax)) or not (xmin < xmax and ymin < ymax):
        raise ValueError(f"extent must be finite with xmin < xmax and ymin < ymax, got {extent!r}")
    return xmin, xmax, ymin, ymax


def _density_layer(mixture, size, extent):
    """(size, size, 3) uint8: the shaded density with contour lines (row 0 = top = ymax)."""
    xmin, xmax, ymin, ymax = extent
    # pixel centres
    xs = xmin + (torch.arange(size, dtype=torch.float64) + 0.5) * ((xmax - xmin) / size)
    ys = ymax - (torch.arange(size, dtype=torch.float64) + 0.5) * ((ymax - ymin) / size)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    if mixture.dim > 2:  # other coordinates at 0 (a slice through the density)
        pts = torch.cat([pts, pts.new_zeros(pts.shape[0], mixture.dim - 2)], dim=1)
    dev = mixture.device if mixture.device.type != "meta" else torch.device("cpu")
    with torch.no_grad():
        logp = mixture.log_prob(pts.to(device=dev, dtype=torch.float64)).to("cpu", torch.float64)
    logp = logp.reshape(size, size).numpy()
    top = np.max(logp)
    rel = np.exp(logp - top)  # density / max in [0, 1]
    t = np.sqrt(rel)[..., None]  # shade: brighter gradient away from the peaks
    img = (np.array(BACKGROUND, dtype=np.float64) * (1 - t) + np.array(SHADE, dtype=np.float64) * t)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    contour = np.zeros((size, size), dtype=bool)
    for frac in CONTOUR_FRACTIONS:
        level = top + math.log(frac)
        above = logp >= level
        # a pixel is on the contour when the level lies between its value and a right or lower neighbour's
        cross_h = above[:, :-1] != above[:, 1:]
        cross_v = above[:-1, :] != above[1:, :]
        contour[:, :-1] |= cross_h
        contour[:-1, :] |= cross_v
    img[contour] = CONTOUR
    return img


def _to_points(name, samples):
    if not isinstance(samples, torch.Tensor):
        samples = torch.as_tensor(np.asarray(samples))
    if samples.dim() != 2 or samples.shape[1] < 2:
        raise ValueError(f"{name} must have shape (N, 2) (or (N, D >= 2): the first two coordinates are drawn), "
                         f"got {tuple(samples.shape)}")
    return samples.detach()[:, :2].to("cpu", torch.float64)


def _draw_dots(img, pts, extent, dot_size):
    """Dots (squares of side ``dot_size``, the point in the top-left pixel) at the points inside ``extent``."""
    xmin, xmax, ymin, ymax = extent
    h, w = img.shape[:2]
    col = np.floor((pts[:, 0] - xmin) / (xmax - xmin) * w)
    row = np.floor((ymax - pts[:, 1]) / (ymax - ymin) * h)
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)  # False for NaN
    col, row = col[inside].astype(np.int64), row[inside].astype(np.int64)
    lo = -((dot_size - 1) // 2)
    for dr in range(lo, lo + dot_size):
        for dc in range(lo, lo + dot_size):
            r, c = row + dr, col + dc
            keep = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            img[r[keep], c[keep]] = DOT
    return int(inside.sum())


def density_figure(mixture, panels, path, *, size=240, extent=None, columns=4, dot_size=2, title_scale=1):
    """Write a PNG of panels (title, samples) over the density of a 2-D ``GaussianMixture``.

    Args:
        mixture: a ``pygen.models.GaussianMixture`` with dim >= 2 (drawn: the
            first two coordinates; for dim > 2 the slice with the others at 0).
        panels: a sequence of ``(title, samples)``, samples an (N, 2) tensor or
            array (N may be 0; ``None`` draws the density alone).
        path: where to write the PNG.
        size: side of each square panel in pixels (>= 16).
        extent: ``(xmin, xmax, ymin, ymax)`` of every panel; default
            ``default_extent(mixture)``.
        columns: panels per row of the figure (>= 1).
        dot_size: side of the square dots in pixels (>= 1).
        title_scale: font pixel size of the titles (>= 1).

    Returns the number of non-finite samples (NaN/inf in either coordinate)
    skipped, summed over the panels. Finite samples outside the extent are
    not drawn.
    """
    if not (hasattr(mixture, "log_prob") and hasattr(mixture, "dim")):
        raise TypeError(f"mixture must be a pygen.models.GaussianMixture, got {type(mixture).__name__}")
    if mixture.dim < 2:
        raise ValueError(f"mixture must have dim >= 2, got {mixture.dim}")
    for name, v, lo in (("size", size, 16), ("columns", columns, 1), ("dot_size", dot_size, 1),
                        ("title_scale", title_scale, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    panels = list(panels)
    if not panels:
        raise ValueError("panels must hold at least one (title, samples) pair")
    extent = _check_extent(default_extent(mixture) if extent is None else extent)

    base = _density_layer(mixture, size, extent)
    title_h = GLYPH_H * title_scale + 6
    sep = 2
    cols = min(columns, len(panels))
    rows = (len(panels) + cols - 1) // cols
    ph, pw = title_h + size, size
    fig = np.full((rows * ph + (rows - 1) * sep, cols * pw + (cols - 1) * sep, 3), SEPARATOR, dtype=np.uint8)
    skipped = 0
    for k, panel in enumerate(panels):
        try:
            title, samples = panel
        except (TypeError, ValueError):
            raise ValueError(f"panels[{k}] must be a (title, samples) pair") from None
        tile = np.empty((ph, pw, 3), dtype=np.uint8)
        tile[:title_h] = TITLE_BG
        title = str(title)
        max_chars = max(0, (pw - 4) // ((GLYPH_W + 1) * title_scale))
        if len(title) > max_chars:
            title = title[:max_chars]
        render_text(tile, title, max(2, (pw - text_width(title, title_scale)) // 2), 3, TEXT, title_scale)
        body = base.copy()
        if samples is not None:
            pts = _to_points(f"panels[{k}] samples", samples)
            finite = torch.isfinite(pts).all(dim=1)
            skipped += int((~finite).sum())
            _draw_dots(body, pts[finite].numpy(), extent, dot_size)
        tile[title_h:] = body
        r, c = divmod(k, cols)
        y0, x0 = r * (ph + sep), c * (pw + sep)
        fig[y0:y0 + ph, x0:x0 + pw] = tile
    # unused cells of the last row: blank
    for k in range(len(panels), rows * cols):
        r, c = divmod(k, cols)
        y0, x0 = r * (ph + sep), c * (pw + sep)
        fig[y0:y0 + ph, x0:x0 + pw] = BACKGROUND
    write_png(path, fig)
    return skipped
