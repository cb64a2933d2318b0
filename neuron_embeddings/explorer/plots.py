"""Inline SVG plots for the explorer: histograms and a dendrogram with its threshold line.

Plain SVG strings (no plotting library, no JavaScript): they render instantly, scale, and carry
their numbers in `<title>` elements that a browser shows on hover.
"""
from __future__ import annotations

import colorsys
from functools import lru_cache
from html import escape

import numpy as np
from scipy.cluster import hierarchy

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22")  # the first clusters' colours: matplotlib's tab10 without its grey
ABOVE = "#b0b0b0"  # links above the threshold


def cluster_colour(label: int) -> str:
    """The colour of cluster `label` everywhere on a page (its section, its dendrogram links and
    leaves); grey (ABOVE) for -1. Distinct for the first 1,006 labels, then repeating."""
    if label < 0:
        return ABOVE
    colours = _colours()
    return colours[label % len(colours)]


def _lab(rgb_N3: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours in [0, 1]: distances in it track perceived differences."""
    lin = np.where(rgb_N3 <= 0.04045, rgb_N3 / 12.92, ((rgb_N3 + 0.055) / 1.055) ** 2.4)
    xyz = lin @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    f = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(f > 216 / 24389, np.cbrt(f), (24389 / 27 * f + 16) / 116)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(255 * x)):02x}" for x in rgb)


@lru_cache(maxsize=1)
def _colours() -> tuple[str, ...]:
    """PALETTE, then colours chosen greedily from a grid of hues x saturations x lightnesses (no
    pale or greyish ones), each the farthest in CIELAB from those before it, from ABOVE and from
    the white page. Deterministic, so a label's colour never depends on how many clusters there
    are; the first 50 lie at least 22 CIELAB units apart (tests/apps/test_explorer.py)."""
    grid = np.array([colorsys.hls_to_rgb(h / 360, lig, sat) for h in range(0, 360, 5)
                     for sat in (0.5, 0.7, 0.9) for lig in (0.25, 0.35, 0.45, 0.55, 0.65, 0.75)])
    lab = _lab(grid)
    keep = (lab[:, 0] < 80) & (np.hypot(lab[:, 1], lab[:, 2]) > 30)
    grid, lab = grid[keep], lab[keep]
    fixed = _lab(np.array([[int(h[i:i + 2], 16) / 255 for i in (1, 3, 5)] for h in (*PALETTE, ABOVE, "#ffffff")]))
    dist = np.min(np.linalg.norm(lab[:, None, :] - fixed[None, :, :], axis=2), axis=1)
    out = list(PALETTE)
    for _ in range(len(grid)):
        i = int(np.argmax(dist))
        out.append(_hex(grid[i]))
        dist = np.minimum(dist, np.linalg.norm(lab - lab[i], axis=1))
        dist[i] = -1.0
    return tuple(out)


def histogram_svg(values: np.ndarray, edges: np.ndarray, title: str, fmt: str = "{:.2f}",
                  width: int = 260, height: int = 96, colour: str = "#4c72b0") -> str:
    """Bars of the counts of `values` in the bins `edges` (finite values only), with the bin range
    and count of each bar on hover, and the axis range under it."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    counts, _ = np.histogram(v, bins=edges)
    pad_b, pad_t = 16, 14
    h = height - pad_b - pad_t
    top = max(int(counts.max()) if counts.size else 0, 1)
    bw = width / len(counts)
    bars = []
    for i, c in enumerate(counts):
        bh = h * c / top
        label = f"{fmt.format(edges[i])} to {fmt.format(edges[i + 1])}: {c}"
        bars.append(f'<rect x="{i * bw:.1f}" y="{pad_t + h - bh:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                    f'height="{bh:.1f}" fill="{colour}"><title>{escape(label)}</title></rect>')
    return (f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{escape(title)}"><text x="0" y="10" class="svgtitle">{escape(title)} (n={v.size}, '
            f'max bar {top})</text>{"".join(bars)}'
            f'<line x1="0" y1="{pad_t + h}" x2="{width}" y2="{pad_t + h}" stroke="#555"/>'
            f'<text x="0" y="{height - 3}" class="svgaxis">{fmt.format(edges[0])}</text>'
            f'<text x="{width}" y="{height - 3}" text-anchor="end" class="svgaxis">{fmt.format(edges[-1])}</text>'
            '</svg>')


def distribution_svg(hist_H: np.ndarray, max_act: float, intervals: list[tuple[float, float]], topk_min: float,
                     width: int = 420, height: int = 120) -> str:
    """A unit's activation histogram over (0, max] (bar heights on a log scale: most tokens sit
    near zero), the strata's bounds as dashed lines, the top-k's range shaded; counts on hover."""
    hist = np.asarray(hist_H, dtype=np.int64)
    H = len(hist)
    pad_b, pad_t, left = 18, 16, 4
    h, w = height - pad_b - pad_t, width - 2 * left
    top = np.log1p(max(int(hist.max()) if H else 0, 1))
    bw = w / max(H, 1)
    parts = []
    if np.isfinite(topk_min) and max_act > 0:
        x0 = left + w * max(topk_min, 0) / max_act
        parts.append(f'<rect class="topk" x="{x0:.1f}" y="{pad_t}" width="{max(left + w - x0, 1.5):.1f}" height="{h}" '
                     f'fill="#ff8c00" fill-opacity="0.18"><title>the top-k: activations {topk_min:.3g} to '
                     f'{max_act:.3g}</title></rect>')
    for i, c in enumerate(hist):
        bh = h * np.log1p(c) / top
        label = f"{i / H * max_act:.3g} to {(i + 1) / H * max_act:.3g}: {c} tokens"
        parts.append(f'<rect class="bar" x="{left + i * bw:.1f}" y="{pad_t + h - bh:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                     f'height="{bh:.1f}" fill="#4c72b0"><title>{escape(label)}</title></rect>')
    for i, (lo, _) in enumerate(intervals):
        x = left + w * lo
        parts.append(f'<line class="stratum" x1="{x:.1f}" y1="{pad_t - 2}" x2="{x:.1f}" y2="{pad_t + h}" stroke="#d62728" '
                     f'stroke-dasharray="4,3"><title>stratum {i + 1} starts at {lo:g} x max</title></line>'
                     f'<text x="{x + 2:.1f}" y="{pad_t + 8}" class="svgaxis" fill="#d62728">S{i + 1}</text>')
    return (f'<svg class="distribution" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="activation histogram"><text x="0" y="10" class="svgtitle">activations &gt; 0 '
            f'({int(hist.sum())} tokens; bar height: log count)</text>{"".join(parts)}'
            f'<line x1="{left}" y1="{pad_t + h}" x2="{left + w}" y2="{pad_t + h}" stroke="#555"/>'
            f'<text x="{left}" y="{height - 4}" class="svgaxis">0</text>'
            f'<text x="{left + w}" y="{height - 4}" text-anchor="end" class="svgaxis">max {max_act:.3g}</text></svg>')


def node_labels(Z_M4: np.ndarray, leaf_labels_N: np.ndarray, threshold: float) -> np.ndarray:
    """Cluster label of each node of a linkage (leaves 0..n-1, merges n..2n-2) when all its leaves
    lie in one cluster and it merges at or below the threshold; -1 otherwise."""
    n = len(leaf_labels_N)
    lab = np.concatenate([np.asarray(leaf_labels_N, dtype=np.int64), np.full(max(n - 1, 0), -1)])
    for i, (a, b, d, _) in enumerate(Z_M4):
        la, lb = lab[int(a)], lab[int(b)]
        lab[n + i] = la if (la == lb and la >= 0 and d <= threshold) else -1
    return lab


def dendrogram_svg(Z_M4: np.ndarray, leaf_labels_N: np.ndarray, threshold: float,
                   leaf_names: list[str], width: int = 900, height: int = 260) -> str:
    """The hierarchy of a neuron's clustered examples: links coloured by the cluster they lie in
    (grey above the threshold), the threshold as a dashed red line, each leaf's max token and
    cluster on hover."""
    n = len(leaf_labels_N)
    if n < 2:
        return '<p class="muted">fewer than 2 clustered examples: no hierarchy</p>'
    lab = node_labels(Z_M4, leaf_labels_N, threshold)
    d = hierarchy.dendrogram(Z_M4, no_plot=True, link_color_func=lambda k: str(lab[k]))
    left, right, top, bottom = 44, 10, 22, 26
    ymax = max(float(np.max(Z_M4[:, 2])), threshold) * 1.08
    sx = (width - left - right) / (10.0 * n)
    sy = (height - top - bottom) / ymax

    def X(x: float) -> float:
        return left + x * sx

    def Y(y: float) -> float:
        return height - bottom - y * sy

    parts = []
    for xs, ys, c in zip(d["icoord"], d["dcoord"], d["color_list"]):
        pts = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in zip(xs, ys))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{cluster_colour(int(c))}" '
                     f'stroke-width="1.5"><title>merge at distance {ys[1]:.3f}</title></polyline>')
    for i, leaf in enumerate(d["leaves"]):
        x = X(10.0 * i + 5)
        c = int(leaf_labels_N[leaf])
        parts.append(f'<rect x="{x - 3:.1f}" y="{height - bottom + 3}" width="6" height="8" fill="{cluster_colour(c)}">'
                     f'<title>{escape(repr(leaf_names[leaf]))}: cluster {c}</title></rect>')
    ticks = [t for t in np.linspace(0, ymax, 5)]
    for t in ticks:
        parts.append(f'<line x1="{left - 4}" y1="{Y(t):.1f}" x2="{left}" y2="{Y(t):.1f}" stroke="#555"/>'
                     f'<text x="{left - 6}" y="{Y(t) + 3:.1f}" text-anchor="end" class="svgaxis">{t:.2f}</text>')
    yt = Y(threshold)
    parts.append(f'<line class="threshold" x1="{left}" y1="{yt:.1f}" x2="{width - right}" y2="{yt:.1f}" '
                 f'stroke="#d62728" stroke-dasharray="6,4" stroke-width="1.5"><title>threshold {threshold}</title></line>'
                 f'<text x="{width - right}" y="{yt - 4:.1f}" text-anchor="end" class="svgaxis" fill="#d62728">'
                 f'threshold {threshold}</text>')
    return (f'<svg class="dendrogram" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="dendrogram"><line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#555"/>'
            f'<text x="4" y="10" class="svgaxis">cosine distance</text>{"".join(parts)}</svg>')
