"""Tests of pygen/plot.py: the PNG writer and the density-figure rasteriser (CPU, no kernels).

Every written PNG is decoded back here with zlib alone (chunks, CRCs, IHDR, filter bytes),
independently of the writer, and the pixels are checked.
"""
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from pygen import models, plot


def decode_png(path):
    """-> (H, W, 3) uint8 from an 8-bit RGB non-interlaced PNG whose rows all use filter 0."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind}"
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, ctype, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    assert len(raw) == h * (1 + 3 * w)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all(), "every row must use filter type 0"
    return rows[:, 1:].reshape(h, w, 3).copy()


def is_color(img, color):
    return (img == np.array(color, dtype=np.uint8)).all(-1)


# ---------------------------------------------------------------------------
# write_png
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 2), (64, 33)])
def test_write_png_round_trip(tmp_path, shape):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    assert plot.write_png(path, img) == path
    back = decode_png(path)
    assert back.shape == img.shape
    np.testing.assert_array_equal(back, img)


def test_write_png_accepts_tensor(tmp_path):
    img = torch.arange(2 * 3 * 3, dtype=torch.uint8).reshape(2, 3, 3)
    plot.write_png(tmp_path / "t.png", img)
    np.testing.assert_array_equal(decode_png(tmp_path / "t.png"), img.numpy())


def test_write_png_bad_input(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        plot.write_png(tmp_path / "a.png", np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        plot.write_png(tmp_path / "a.png", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        plot.write_png(tmp_path / "a.png", np.zeros((0, 2, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="numpy array"):
        plot.write_png(tmp_path / "a.png", [[[0, 0, 0]]])


# ---------------------------------------------------------------------------
# font
# ---------------------------------------------------------------------------
def test_font_covers_title_charset():
    for ch in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-+.()=/":
        g = plot._glyph(ch)
        assert g.shape == (7, 5)
        assert ch == " " or g.any(), ch
    # distinct glyphs for distinct characters (catches copy-paste slips)
    keys = sorted(plot._GLYPHS)
    seen = {}
    for k in keys:
        b = plot._GLYPHS[k].tobytes()
        assert b not in seen, (k, seen.get(b))
        seen[b] = k
    # unknown characters are drawn as '?'
    np.testing.assert_array_equal(plot._glyph("\u00e9"), plot._glyph("?"))


def test_render_text_pixels_and_clipping():
    img = np.zeros((9, 40, 3), dtype=np.uint8)
    plot.render_text(img, "I-", 1, 1, color=(255, 0, 0))
    on = is_color(img, (255, 0, 0))
    np.testing.assert_array_equal(on[1:8, 1:6], plot._glyph("I"))
    np.testing.assert_array_equal(on[1:8, 7:12], plot._glyph("-"))
    assert on.sum() == plot._glyph("I").sum() + plot._glyph("-").sum()
    assert plot.text_width("I-") == 11
    # partly or wholly outside: clipped, no error
    plot.render_text(img, "WIDE TEXT THAT DOES NOT FIT", 30, 5)
    plot.render_text(img, "X", -3, -4)
    plot.render_text(img, "X", 100, 100)


# ---------------------------------------------------------------------------
# density_figure
# ---------------------------------------------------------------------------
EXTENT = (-4.0, 4.0, -4.0, 4.0)
SIZE = 64


def _title_h():
    return 7 + 6


def _pixel(x, y, size=SIZE, extent=EXTENT):
    xmin, xmax, ymin, ymax = extent
    return int(math.floor((ymax - y) / (ymax - ymin) * size)), int(math.floor((x - xmin) / (xmax - xmin) * size))


def _mixture():
    return models.GaussianMixture([[-2.0, 0.0], [2.0, 1.0]], [0.5, 0.7], [0.3, 0.7])


def test_density_figure_dots_contours_and_layout(tmp_path):
    m = _mixture()
    # a far-from-the-modes point (density ~0, so no contour or shade there) and a point in a mode
    pts = torch.tensor([[0.1, -3.3], [-2.0, 0.0]], dtype=torch.float32)
    path = tmp_path / "fig.png"
    skipped = plot.density_figure(m, [("two dots", pts), ("empty", pts[:0]), ("none", None)], path, size=SIZE,
                                  extent=EXTENT, columns=2, dot_size=1)
    assert skipped == 0
    img = decode_png(path)
    th, sep = _title_h(), 2
    assert img.shape == (2 * (th + SIZE) + sep, 2 * SIZE + sep, 3)
    # separators
    assert is_color(img[:, SIZE:SIZE + sep], plot.SEPARATOR).all()
    assert is_color(img[th + SIZE:th + SIZE + sep, :], plot.SEPARATOR).all()
    p0 = img[th:th + SIZE, :SIZE]
    p1 = img[th:th + SIZE, SIZE + sep:]
    p2 = img[th + SIZE + sep + th:, :SIZE]
    # the dots are where the samples are, and nowhere else
    dots = is_color(p0, plot.DOT)
    assert dots.sum() == 2
    for x, y in pts.tolist():
        assert dots[_pixel(x, y)], (x, y)
    assert not is_color(p1, plot.DOT).any() and not is_color(p2, plot.DOT).any()
    # the same density background (with contour lines) in every panel
    contour = is_color(p1, plot.CONTOUR)
    assert contour.sum() > 20
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(p0[~dots], p1[~dots])
    # contour lines enclose the modes: along the row of mode 0 they are crossed on both sides of the mean
    r, c = _pixel(-2.0, 0.0)
    assert contour[r, :c].any() and contour[r, c + 1:].any()
    # shading: darker (less bright) near a mode than far from both
    far = p1[_pixel(0.1, -3.8)].astype(int).sum()
    near = p1[_pixel(2.0, 1.0)].astype(int).sum()
    assert far == 3 * 255 and near < far
    # the last (unused) cell is blank
    assert (img[th + SIZE + sep:, SIZE + sep:] == 255).all()
    # titles are drawn in the title bar
    assert is_color(img[:th, :SIZE], plot.TEXT).sum() > 10


def test_contour_pixels_follow_the_level_crossing_rule(tmp_path):
    m = _mixture()
    plot.density_figure(m, [("", None)], tmp_path / "c.png", size=SIZE, extent=EXTENT)
    img = decode_png(tmp_path / "c.png")[_title_h():]
    contour = is_color(img, plot.CONTOUR)
    # recompute the log density on the pixel centres and the rule "a level lies between a pixel and its
    # right or lower neighbour"
    xmin, xmax, ymin, ymax = EXTENT
    xs = xmin + (torch.arange(SIZE, dtype=torch.float64) + 0.5) * (xmax - xmin) / SIZE
    ys = ymax - (torch.arange(SIZE, dtype=torch.float64) + 0.5) * (ymax - ymin) / SIZE
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    logp = m.log_prob(torch.stack([gx, gy], -1).reshape(-1, 2)).reshape(SIZE, SIZE).numpy()
    expect = np.zeros_like(contour)
    for frac in plot.CONTOUR_FRACTIONS:
        above = logp >= logp.max() + math.log(frac)
        expect[:, :-1] |= above[:, :-1] != above[:, 1:]
        expect[:-1, :] |= above[:-1, :] != above[1:, :]
    np.testing.assert_array_equal(contour, expect)


def test_density_figure_clips_and_counts_non_finite(tmp_path):
    m = _mixture()
    nan, inf = float("nan"), float("inf")
    pts = torch.tensor([
        [nan, 0.0], [0.0, nan], [inf, 1.0], [-inf, -inf],  # 4 non-finite: skipped and counted
        [100.0, 0.0], [-4.0 - 1e-9, 0.0], [0.0, 4.0 + 1e-6], [4.0, 0.0], [0.0, 1e30], [-1e30, -1e30],  # outside: not drawn
        [-4.0, -4.0 + 1e-9], [3.999, 3.999],  # corner pixels (inside)
    ], dtype=torch.float64)
    path = tmp_path / "clip.png"
    skipped = plot.density_figure(m, [("clip", pts), ("again", pts[:2])], path, size=SIZE, extent=EXTENT,
                                  dot_size=3)
    assert skipped == 4 + 2
    img = decode_png(path)[_title_h():, :SIZE]
    dots = is_color(img, plot.DOT)
    # corner dots of side 3 centred on the corner pixels, clipped at the panel border
    assert dots[SIZE - 1, 0] and dots[0, SIZE - 1]
    assert dots.sum() == 4 + 4
    assert not is_color(decode_png(path)[_title_h():, SIZE + 2:], plot.DOT).any()


def test_density_figure_default_extent_and_bad_input(tmp_path):
    m = models.clot()
    x = m.sample(200, torch.Generator().manual_seed(0))
    assert plot.density_figure(m, [("clot", x)], tmp_path / "d.png", size=32) == 0
    img = decode_png(tmp_path / "d.png")
    assert img.shape == (_title_h() + 32, 32, 3)
    # every exact sample lies inside the default extent for this many samples
    xmin, xmax, ymin, ymax = plot.default_extent(m)
    assert xmax - xmin == pytest.approx(ymax - ymin)
    assert ((x[:, 0] > xmin) & (x[:, 0] < xmax) & (x[:, 1] > ymin) & (x[:, 1] < ymax)).all()
    with pytest.raises(ValueError, match="panels"):
        plot.density_figure(m, [], tmp_path / "e.png")
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plot.density_figure(m, [("t", torch.zeros(5))], tmp_path / "e.png")
    with pytest.raises(ValueError, match="extent"):
        plot.density_figure(m, [("t", x)], tmp_path / "e.png", extent=(1, 0, 0, 1))
    with pytest.raises(ValueError, match="extent"):
        plot.density_figure(m, [("t", x)], tmp_path / "e.png", extent=(0, 1, 0))
    with pytest.raises(ValueError, match="size"):
        plot.density_figure(m, [("t", x)], tmp_path / "e.png", size=4)
    with pytest.raises(ValueError, match="pair"):
        plot.density_figure(m, [x], tmp_path / "e.png")
    with pytest.raises(ValueError, match="dim >= 2"):
        plot.density_figure(models.GaussianMixture([[0.0]], [1.0]), [("t", x)], tmp_path / "e.png")
    with pytest.raises(TypeError, match="GaussianMixture"):
        plot.density_figure(object(), [("t", x)], tmp_path / "e.png")
