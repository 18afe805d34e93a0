"""Figures and thumbnails for the trait report, with one consistent palette.

Everything returns either a matplotlib figure or an image array; ``figure_uri``
and ``image_uri`` turn them into ``data:`` URIs so the report needs no files
beside it. The palette is fixed by name, so a method, a region or a trait has
the same colour in every figure of a report:

- methods (models, CAM baselines, references): ``method_colour``;
- regions (part names, ``background``, grid cells): ``region_colours``;
- traits: ``trait_colours`` (evenly spaced hues, in trait order);
- attention maps: ``MAP_CMAP`` (sequential), differences: ``DIFF_CMAP``
  (diverging, centred on zero).

Matplotlib runs on the Agg backend (no display); text drawn into figures goes
through ``mpl_text`` so that a '$' in a species name is not read as maths.
"""

from __future__ import annotations

import base64
import io
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from PIL import Image  # noqa: E402

MAP_CMAP = "inferno"
DIFF_CMAP = "RdBu_r"
THUMB = 96           # longer side of a thumbnail, pixels
FIG_DPI = 80
_BASE = sns.color_palette("colorblind", 10).as_hex()
# Models first, then CAM baselines, then references in greys.
METHOD_COLOURS: dict[str, str] = {
    "prompt_cam": _BASE[0], "intr": _BASE[1], "gradcam": _BASE[2], "layercam": _BASE[3],
    "eigencam": _BASE[4], "rollout": _BASE[5], "linear_probe": _BASE[6],
    "best_fixed_head": _BASE[8], "lowest_ranked_head": _BASE[9],
    "chance": "#7f7f7f", "random": "#9a9a9a", "size_baseline": "#5c5c5c", "mean_attention": "#b0b0b0",
}
BACKGROUND_COLOUR = "#c8c8c8"


def setup() -> None:
    """The report's seaborn theme (called once before drawing)."""
    sns.set_theme(style="whitegrid", context="paper", font_scale=0.9)
    plt.rcParams.update({"figure.dpi": FIG_DPI, "savefig.dpi": FIG_DPI, "axes.titlesize": 9,
                         "axes.labelsize": 8, "legend.fontsize": 7})


def mpl_text(text: object) -> str:
    """``text`` safe for matplotlib: '$' would start mathtext."""
    return str(text).replace("$", r"\$")


def method_colour(method: str) -> str:
    """The fixed colour of a method; unknown names get a stable colour from the base palette."""
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    return _BASE[sum(map(ord, method)) % len(_BASE)]


def region_colours(regions: Sequence[str]) -> dict[str, str]:
    """A colour per region in vocabulary order; ``background`` is always grey."""
    names = [r for r in dict.fromkeys(regions) if r != "background"]
    hues = sns.color_palette("husl", max(len(names), 1)).as_hex()
    out = dict(zip(names, hues))
    out["background"] = BACKGROUND_COLOUR
    return out


def trait_colours(n: int) -> list[str]:
    """``n`` distinguishable colours for trait clusters, in trait order."""
    if n <= 10:
        return sns.color_palette("tab10", n).as_hex()
    return sns.color_palette("husl", n).as_hex()


# --------------------------------------------------------------------------- encoding


def figure_uri(fig: plt.Figure, colours: int = 96) -> str:
    """PNG data URI of a figure (the figure is closed).

    The image is quantised to an adaptive palette of ``colours`` colours: charts
    hold few colours, and this makes them 2-3 times smaller than true-colour PNGs.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=FIG_DPI)
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as im:
        small = im.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def image_uri(array: np.ndarray, quality: int = 78) -> str:
    """JPEG data URI of an (H, W, 3) uint8 image."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- thumbnails


def thumb_size(width: int, height: int, side: int = THUMB) -> tuple[int, int]:
    """(w, h) of a thumbnail whose longer side is ``side``, aspect kept."""
    scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def thumbnail(image: np.ndarray, side: int = THUMB) -> np.ndarray:
    """The image resized so its longer side is ``side`` pixels (RGB uint8)."""
    h, w = image.shape[:2]
    size = thumb_size(w, h, side)
    return np.asarray(Image.fromarray(image).convert("RGB").resize(size, Image.BILINEAR))


def resize_map(attn: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (grid_h, grid_w) map resized to ``size`` = (w, h), each axis on its own (bilinear).

    The networks saw the whole image squashed to a square, so cell (i, j)
    covers the same fraction of the original image along each axis; resizing
    the map to the image's own width and height puts every cell back in place.
    """
    return np.asarray(Image.fromarray(np.asarray(attn, dtype=np.float32), mode="F").resize(size, Image.BILINEAR))


def overlay(image: np.ndarray, attn: np.ndarray, side: int = THUMB, alpha: float = 0.6,
            diverging: bool = False) -> np.ndarray:
    """Thumbnail of ``image`` with ``attn`` drawn over it.

    Args:
        image: (H, W, 3) uint8, the original image.
        attn: (grid_h, grid_w) map over the whole image.
        side: thumbnail's longer side.
        alpha: the map's opacity where it is strongest.
        diverging: a signed map (a difference): ``DIFF_CMAP`` centred on zero,
            opacity by magnitude; else ``MAP_CMAP`` scaled to the map's maximum.
    """
    base = thumbnail(image, side).astype(np.float32)
    h, w = base.shape[:2]
    m = resize_map(attn, (w, h))
    if diverging:
        scale = float(np.abs(m).max()) or 1.0
        signed = m / scale
        colours = colormaps[DIFF_CMAP]((signed + 1) / 2)[..., :3]
        weight = np.sqrt(np.abs(signed))[..., None] * alpha
    else:
        lo, hi = float(m.min()), float(m.max())
        unit = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
        colours = colormaps[MAP_CMAP](unit)[..., :3]
        weight = (0.25 + 0.75 * unit)[..., None] * alpha
    out = base * (1 - weight) + colours * 255.0 * weight
    return np.clip(out, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- charts


def ranked_regions_chart(frame: pd.DataFrame, colours: Mapping[str, str], title: str = "",
                         value: str = "density", max_regions: int = 12) -> plt.Figure:
    """Horizontal bars of regions ranked by ``value`` with their 95 % intervals.

    Args:
        frame: one class's rows of ``regions.parquet`` (region, density,
            density_lo, density_hi, ...).
        colours: ``region_colours``.
        title: figure title.
        value: ``density`` or ``mass``.
        max_regions: the top regions shown.
    """
    rows = frame.sort_values(value, ascending=False).head(max_regions)
    fig, ax = plt.subplots(figsize=(3.3, 0.22 * len(rows) + 0.7))
    y = np.arange(len(rows))
    vals = rows[value].to_numpy(dtype=float)
    lo = rows.get(f"{value}_lo", rows[value]).to_numpy(dtype=float)
    hi = rows.get(f"{value}_hi", rows[value]).to_numpy(dtype=float)
    err = np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
    ax.barh(y, vals, xerr=err, color=[colours.get(r, "#888888") for r in rows["region"]],
            error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#333333"})
    ax.set_yticks(y, [mpl_text(r) for r in rows["region"]])
    ax.invert_yaxis()
    ax.set_xlabel(f"attention {value} (95 % interval)")
    if title:
        ax.set_title(mpl_text(title))
    return fig


def grouped_regions_chart(frames: Mapping[str, pd.DataFrame], title: str = "", value: str = "density",
                          max_regions: int = 10, labels: Mapping[str, str] | None = None) -> plt.Figure:
    """Bars per region, one per method side by side, with intervals (the methods' comparison).

    Args:
        frames: method -> that method's rows of ``regions.parquet`` for one class.
        title: figure title.
        value: ``density`` or ``mass``.
        max_regions: regions shown: the best by the mean over methods.
        labels: display names of the methods (legend).
    """
    joined = pd.concat([f.assign(method=m) for m, f in frames.items()], ignore_index=True)
    order = joined.groupby("region")[value].mean().sort_values(ascending=False).head(max_regions).index
    methods = list(frames)
    fig, ax = plt.subplots(figsize=(3.6, 0.3 * len(order) + 0.8))
    height = 0.8 / max(len(methods), 1)
    for k, method in enumerate(methods):
        rows = frames[method].set_index("region").reindex(order)
        vals = rows[value].to_numpy(dtype=float)
        lo = rows.get(f"{value}_lo", rows[value]).to_numpy(dtype=float)
        hi = rows.get(f"{value}_hi", rows[value]).to_numpy(dtype=float)
        err = np.nan_to_num(np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)]))
        ax.barh(np.arange(len(order)) + k * height, np.nan_to_num(vals), height=height, xerr=err,
                color=method_colour(method), label=mpl_text((labels or {}).get(method, method)),
                error_kw={"elinewidth": 0.7, "capsize": 1.5, "ecolor": "#333333"})
    ax.set_yticks(np.arange(len(order)) + height * (len(methods) - 1) / 2, [mpl_text(r) for r in order])
    ax.invert_yaxis()
    ax.set_xlabel(f"attention {value} (95 % interval)")
    ax.legend(loc="lower right", frameon=True)
    if title:
        ax.set_title(mpl_text(title))
    return fig


def umap_scatter(members: pd.DataFrame, names: Mapping[int, str], colours: Sequence[str],
                 title: str = "", max_points: int = 6000, seed: int = 0) -> plt.Figure:
    """The trait members' UMAP coordinates coloured by trait.

    Args:
        members: ``trait_members.parquet`` rows (umap_x, umap_y, trait).
        names: trait -> its name (legend).
        colours: ``trait_colours`` indexed by the trait's position in ``names``.
        title: figure title.
        max_points: a seeded sample above this many members keeps the figure light.
        seed: seed of that sample.
    """
    if len(members) > max_points:
        members = members.sample(max_points, random_state=seed)
    order = list(names)
    colour_of = {t: colours[i % len(colours)] for i, t in enumerate(order)}
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    ax.scatter(members["umap_x"], members["umap_y"], s=5, linewidths=0, alpha=0.75,
               c=[colour_of.get(t, "#888888") for t in members["trait"]])
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colour_of[t], label=mpl_text(names[t]))
               for t in order[:20]]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
              title="trait" + (" (first 20)" if len(order) > 20 else ""))
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(mpl_text(title))
    return fig


def head_types_heatmap(profiles: np.ndarray, heads: Sequence[int], head_types: Sequence[int],
                       regions: Sequence[str], title: str = "") -> plt.Figure:
    """Heads (rows, sorted by head type) by regions: each head's mean attention mass per region."""
    order = np.lexsort((np.asarray(heads), np.asarray(head_types)))
    data = np.asarray(profiles, dtype=float)[order]
    labels = [f"head {heads[i]} · type {head_types[i]}" for i in order]
    fig, ax = plt.subplots(figsize=(0.38 * len(regions) + 1.8, 0.24 * len(labels) + 1.0))
    sns.heatmap(data, ax=ax, cmap="rocket_r", cbar_kws={"label": "mean mass", "shrink": 0.8},
                xticklabels=[mpl_text(r) for r in regions], yticklabels=labels, vmin=0)
    ax.tick_params(axis="x", rotation=60)
    if title:
        ax.set_title(mpl_text(title))
    return fig


def metric_pointrange(rows: pd.DataFrame, metrics: Sequence[str], title: str = "") -> plt.Figure:
    """Point estimates with 95 % intervals, one panel per metric, one row per method.

    Args:
        rows: evaluation rows (label, method, metric, value, ci_lo, ci_hi); ``label``
            is the row's text, ``method`` picks its colour.
        metrics: the metrics drawn, in panel order.
        title: figure title.
    """
    metrics = [m for m in metrics if (rows["metric"] == m).any()]
    panels = max(len(metrics), 1)
    fig, axes = plt.subplots(1, panels, figsize=(2.9 * panels, 0.25 * rows["label"].nunique() + 0.9),
                             sharey=True, squeeze=False)
    labels = list(dict.fromkeys(rows["label"]))
    for ax, metric in zip(axes[0], metrics):
        part = rows[rows["metric"] == metric].set_index("label").reindex(labels)
        y = np.arange(len(labels))
        for yi, (_, r) in zip(y, part.iterrows()):
            if pd.isna(r["value"]):
                continue
            lo = r["ci_lo"] if pd.notna(r["ci_lo"]) else r["value"]
            hi = r["ci_hi"] if pd.notna(r["ci_hi"]) else r["value"]
            colour = method_colour(str(r["method"]))
            ax.plot([lo, hi], [yi, yi], color=colour, lw=1.5)
            ax.plot([r["value"]], [yi], "o", color=colour, ms=4)
        ax.set_yticks(y, [mpl_text(label) for label in labels])
        ax.set_title(mpl_text(metric))
    axes[0][0].invert_yaxis()  # shared: first label on top in every panel
    if title:
        fig.suptitle(mpl_text(title), fontsize=9)
    return fig


def agreement_scatter(joined: pd.DataFrame, x: str, y: str, colours: Mapping[str, str],
                      value: str = "density", labels: Mapping[str, str] | None = None) -> plt.Figure:
    """One point per (species, region): method ``x``'s score against method ``y``'s, coloured by region."""
    fig, ax = plt.subplots(figsize=(3.4, 3.2))
    ax.scatter(joined[f"{value}_{x}"], joined[f"{value}_{y}"], s=9, linewidths=0, alpha=0.8,
               c=[colours.get(r, "#888888") for r in joined["region"]])
    top = float(np.nanmax(joined[[f"{value}_{x}", f"{value}_{y}"]].to_numpy())) if len(joined) else 1.0
    ax.plot([0, top], [0, top], color="#999999", lw=0.8, ls="--")
    ax.set_xlabel(f"{mpl_text((labels or {}).get(x, x))}: region {value}")
    ax.set_ylabel(f"{mpl_text((labels or {}).get(y, y))}: region {value}")
    return fig


def outline_region(image: np.ndarray, mask: np.ndarray, colour: str, dim: float = 1.0) -> np.ndarray:
    """``image`` with the region ``mask`` outlined in ``colour`` (one pixel wide, inside the region).

    Args:
        image: (h, w, 3) uint8, already at display size.
        mask: (h, w) bool, the region's pixels at that size.
        colour: the region's palette colour (``region_colours``), as hex.
        dim: brightness kept outside the region, which also loses its colour (1: unchanged; below 1
            makes the region stand out).
    """
    from matplotlib.colors import to_rgb
    from scipy.ndimage import binary_erosion

    out = image.astype(np.float32)
    if dim != 1.0:
        grey = out[~mask] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        out[~mask] = (grey * dim)[:, None]
    edge = mask & ~binary_erosion(mask, border_value=0)
    out[edge] = np.asarray(to_rgb(colour), dtype=np.float32) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def resize_image(image: np.ndarray, side: int) -> np.ndarray:
    """(h, w, 3) uint8 scaled so its longer side is ``side`` (up or down; bilinear), aspect kept."""
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize(thumb_size(w, h, side), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask resized to ``size`` = (w, h) by nearest neighbour (the labels stay labels)."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
