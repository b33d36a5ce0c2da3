"""Charts as inline SVG, drawn on the server: no script, nothing fetched from elsewhere."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from ..admin import Throughput

__all__ = ["throughput_svg"]

_WIDTH = 720
_HEIGHT = 160
_TOP = 18  # room for the scale's label
_BOTTOM = 18  # and for the time axis'


def throughput_svg(points: Sequence[Throughput]) -> str:
    """Succeeded (below) and failed (stacked on top) jobs per minute, one bar a minute."""
    peak = max((p.succeeded + p.failed for p in points), default=0)
    scale = max(peak, 1)
    plot = _HEIGHT - _TOP - _BOTTOM
    step = _WIDTH / max(len(points), 1)
    bars = []
    for i, point in enumerate(points):
        x = i * step
        ok = plot * point.succeeded / scale
        bad = plot * point.failed / scale
        base = _TOP + plot
        label = escape(
            f"{point.minute:%H:%M} UTC: {point.succeeded} succeeded, {point.failed} failed"
        )
        bars.append(
            f"<g><title>{label}</title>"
            f'<rect class="ok" x="{x:.1f}" y="{base - ok:.1f}" width="{step - 1:.1f}" '
            f'height="{ok:.1f}"/>'
            f'<rect class="bad" x="{x:.1f}" y="{base - ok - bad:.1f}" width="{step - 1:.1f}" '
            f'height="{bad:.1f}"/></g>'
        )
    first = f"{points[0].minute:%H:%M}" if points else ""
    last = f"{points[-1].minute:%H:%M} UTC" if points else ""
    return (
        f'<svg class="chart" viewBox="0 0 {_WIDTH} {_HEIGHT}" width="{_WIDTH}" '
        f'height="{_HEIGHT}" role="img" aria-label="jobs per minute, last hour">'
        f'<text x="0" y="12">{peak} jobs/min</text>'
        f'<line x1="0" y1="{_TOP + plot}" x2="{_WIDTH}" y2="{_TOP + plot}"/>'
        + "".join(bars)
        + f'<text x="0" y="{_HEIGHT - 4}">{first}</text>'
        f'<text x="{_WIDTH}" y="{_HEIGHT - 4}" text-anchor="end">{last}</text>'
        "</svg>"
    )
