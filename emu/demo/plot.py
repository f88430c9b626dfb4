"""Line charts for the demo's reports, drawn with PIL (the miniature installs no plotting library).

A :class:`Panel` holds :class:`Series` (points with optional interval bars); :func:`chart` stacks panels into one
image over one shared x axis.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float]
    low: list[float] | None = None  # interval bars
    high: list[float] | None = None
    dashed: bool = False


@dataclass
class Panel:
    title: str
    ylabel: str = ""
    series: list[Series] = field(default_factory=list)
    hline: float | None = None  # a reference level (e.g. 50%), drawn dotted
    percent: bool = False  # y values are fractions, labelled as percentages


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float, step: float, percent: bool) -> str:
    """A tick label with as many decimals as the tick spacing ``step`` needs."""
    if percent:
        v, step = 100 * v, 100 * step
    decimals = 0
    while decimals < 6 and abs(round(step, decimals) - step) > 1e-9 * max(1.0, abs(step)):
        decimals += 1
    return f"{v:.{decimals}f}" + ("%" if percent else "")


def _dashed(draw: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float], color, dash: float = 5) -> None:
    length = math.dist(a, b)
    for i in range(0, int(length / dash), 2):
        t0, t1 = i * dash / length, min(1.0, (i + 1) * dash / length)
        draw.line([(a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t) for t in (t0, t1)], fill=color, width=2)


def _panel(panel: Panel, xlabel: str, size: tuple[int, int], font, xrange: tuple[float, float]) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 70, 20, 30, 45
    xs = [x for s in panel.series for x in s.x]
    ys = [v for s in panel.series for v in (s.y + (s.low or []) + (s.high or [])) if v is not None and v == v]
    ys += [panel.hline] if panel.hline is not None else []
    d.text((left, 8), f"{panel.title} ({panel.ylabel})" if panel.ylabel else panel.title, fill="black", font=font)
    if not xs or not ys:
        d.text((left, h // 2), "no data", fill="gray", font=font)
        return img
    x0, x1 = xrange
    y0, y1 = min(ys), max(ys)
    pad = 0.08 * (y1 - y0) or 0.05 * (abs(y0) or 1)
    y0, y1 = y0 - pad, y1 + pad
    px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
    py = lambda y: top + (y1 - y) / (y1 - y0) * (h - top - bottom)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    ticks = _ticks(y0, y1)
    for t in ticks:
        d.line([(left - 4, py(t)), (left, py(t))], fill="black")
        d.line([(left + 1, py(t)), (w - right - 1, py(t))], fill=(235, 235, 235))
        d.text((4, py(t) - 6), _fmt(t, ticks[1] - ticks[0] if len(ticks) > 1 else 1.0, panel.percent), fill="black",
               font=font)  # fmt: skip
    ticks = _ticks(x0, x1)
    for t in ticks:
        d.line([(px(t), h - bottom), (px(t), h - bottom + 4)], fill="black")
        label = _fmt(t, ticks[1] - ticks[0] if len(ticks) > 1 else 1.0, False)
        d.text((px(t) - 3 * len(label), h - bottom + 6), label, fill="black", font=font)
    d.text(((w - len(xlabel) * 6) // 2, h - 18), xlabel, fill="black", font=font)
    if panel.hline is not None:
        _dashed(d, (left, py(panel.hline)), (w - right, py(panel.hline)), (120, 120, 120), dash=3)
    legend_y = top + 6
    d.rectangle([w - right - 195, top + 2, w - right - 2, top + 8 + 16 * len(panel.series)], fill="white")
    for i, s in enumerate(panel.series):
        color = COLORS[i % len(COLORS)]
        pts = sorted((x, y, lo, hi) for x, y, lo, hi in zip(s.x, s.y, s.low or [None] * len(s.x),
                                                             s.high or [None] * len(s.x)) if y == y)  # fmt: skip
        for a, b in itertools.pairwise(pts):
            if s.dashed:
                _dashed(d, (px(a[0]), py(a[1])), (px(b[0]), py(b[1])), color)
            else:
                d.line([(px(a[0]), py(a[1])), (px(b[0]), py(b[1]))], fill=color, width=2)
        for x, y, lo, hi in pts:
            if lo is not None and hi is not None:
                d.line([(px(x), py(lo)), (px(x), py(hi))], fill=color, width=1)
                for v in (lo, hi):
                    d.line([(px(x) - 4, py(v)), (px(x) + 4, py(v))], fill=color, width=1)
            d.ellipse([px(x) - 3, py(y) - 3, px(x) + 3, py(y) + 3], fill=color)
        d.line([(w - right - 190, legend_y + 6), (w - right - 170, legend_y + 6)], fill=color, width=3)
        d.text((w - right - 165, legend_y), s.label, fill="black", font=font)
        legend_y += 16
    return img


def chart(panels: list[Panel], xlabel: str, width: int = 720, panel_height: int = 300) -> Image.Image:
    """The panels stacked top to bottom, each with its own y axis over the same ``xlabel``."""
    font = ImageFont.load_default()
    xs = [x for p in panels for s in p.series for x in s.x] or [0.0]
    x0, x1 = min(xs), max(xs)
    xrange = (x0 - 1, x1 + 1) if x0 == x1 else (x0 - 0.04 * (x1 - x0), x1 + 0.04 * (x1 - x0))
    out = Image.new("RGB", (width, panel_height * len(panels)), "white")
    for i, panel in enumerate(panels):
        out.paste(_panel(panel, xlabel, (width, panel_height), font, xrange), (0, i * panel_height))
    return out
