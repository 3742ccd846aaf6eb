"""Charts drawn on the server as inline SVG: nothing loaded, no script, colours as SVG attributes
(so the pages' Content-Security-Policy needs no inline style)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
WIDTH, HEIGHT = 460, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 10, 32

Series = Mapping[str, Sequence[tuple[float, float | None]]]
Scale = Callable[[float], float]


def line_chart(title: str, series: Series, *, x_label: str = "round", dashed: Sequence[str] = ()) -> str:
    """A line per series over ``(x, y)`` points (y None: a gap); ``dashed`` names reference lines."""
    points = [(float(x), v) for line in series.values() for x, y in line if (v := _value(y)) is not None]
    caption = f"<figcaption>{escape(title)}</figcaption>"
    if not points:
        return f'<figure class="chart">{caption}<p class="none">no figures yet</p></figure>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = _span(min(xs), max(xs), 0.5)
    y0, y1 = _span(min(ys), max(ys), max(abs(max(ys)), 1.0) * 0.05)
    pad = (y1 - y0) * 0.08
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * (WIDTH - LEFT - RIGHT)

    def sy(y: float) -> float:
        return TOP + (y1 - y) / (y1 - y0) * (HEIGHT - TOP - BOTTOM)

    parts = [_axes(x0, x1, y0, y1, sx, sy, x_label)]
    legend = []
    for index, (name, line) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        dash = ' stroke-dasharray="5 4"' if name in dashed else ""
        for segment in _segments(line):
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in segment)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
            parts += [
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}">'
                f"<title>{escape(name)}, {escape(x_label)} {x:g}: {y:.6g}</title></circle>"
                for x, y in segment
            ]
        legend.append(f'<li><svg width="14" height="10"><rect width="14" height="10" fill="{colour}"/></svg> ')
        legend[-1] += f"{escape(name)}</li>"
    svg = f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img">{"".join(parts)}</svg>'
    return f'<figure class="chart">{caption}{svg}<ul class="legend">{"".join(legend)}</ul></figure>'


def budget_bar(spent: float | None, ceiling: float | None, width: int = 220, projected: float | None = None) -> str:
    """ε spent against the ceiling: green, amber from 75 %, red at or above the ceiling; with
    ``projected`` (ε after one more cycle) the next cycle's share as a lighter segment."""
    used, limit, after = _value(spent), _value(ceiling), _value(projected)
    if used is None or limit is None or limit <= 0:
        return '<span class="none">unknown</span>'
    share = used / limit
    colour = "#2ca02c" if share < 0.75 else "#ff7f0e" if share < 1 else "#d62728"
    filled = width * min(max(share, 0.0), 1.0)
    label = f"{used:.2f} / {limit:.2f} ({share:.0%})"
    next_cycle = ""
    if after is not None and after > used:
        reach = width * min(max(after / limit, 0.0), 1.0)
        tint = "#f4a6a6" if after > limit else "#b7e4b0"
        next_cycle = f'<rect x="{filled:.1f}" width="{max(reach - filled, 0):.1f}" height="18" fill="{tint}"/>'
        label += f", next cycle → {after:.2f}"
    return (
        f'<svg width="{width}" height="18" role="img"><title>{escape(label)}</title>'
        f'<rect width="{width}" height="18" fill="#e5e7eb"/><rect width="{filled:.1f}" height="18" fill="{colour}"/>'
        f'{next_cycle}<text x="6" y="13" font-size="11" fill="#111">{escape(label)}</text></svg>'
    )


def _axes(x0: float, x1: float, y0: float, y1: float, sx: Scale, sy: Scale, x_label: str) -> str:
    out = [f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}" stroke="#999"/>']
    out.append(f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - BOTTOM}" stroke="#999"/>')
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        out.append(f'<line x1="{LEFT}" y1="{sy(y):.1f}" x2="{WIDTH - RIGHT}" y2="{sy(y):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 6}" y="{sy(y) + 4:.1f}" font-size="11" text-anchor="end">{_tick(y)}</text>')
    step = max(1, math.ceil((math.floor(x1) - math.ceil(x0) + 1) / 10))
    for x in range(math.ceil(x0), math.floor(x1) + 1, step):
        out.append(f'<text x="{sx(x):.1f}" y="{HEIGHT - BOTTOM + 14}" font-size="11" text-anchor="middle">{x}</text>')
    out.append(f'<text x="{(LEFT + WIDTH) / 2:.0f}" y="{HEIGHT - 4}" font-size="11" text-anchor="middle">')
    out[-1] += f"{escape(x_label)}</text>"
    return "".join(out)


def _tick(value: float) -> str:
    # Short enough for the axis: 71.9k rather than 7.19e+04.
    if abs(value) >= 1e4:
        scale, suffix = next((s, x) for s, x in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if abs(value) >= s)
        return f"{value / scale:.4g}{suffix}"
    return f"{value:.4g}"


def _segments(line: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    segments: list[list[tuple[float, float]]] = [[]]
    for x, y in line:
        if (v := _value(y)) is not None:
            segments[-1].append((float(x), v))
        elif segments[-1]:
            segments.append([])
    return [s for s in segments if s]


def _span(low: float, high: float, pad: float) -> tuple[float, float]:
    return (low - pad, high + pad) if high - low < 1e-12 else (low, high)


def _value(value: object) -> float | None:
    """A finite number as a float; None for anything else (a missing figure, a flag, NaN)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
