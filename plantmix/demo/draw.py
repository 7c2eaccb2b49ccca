"""Procedural images for the demo world: plants drawn from species traits, and captioned general scenes.

Everything is a pure function of its arguments and a numpy Generator, so one seed gives byte-identical
files. Shapes are drawn at twice the output size and box-downsampled, which anti-aliases edges and
fine veins cheaply. Leaves are built in a local frame (base at (0, 0), tip at (0, 1)), decorated on a
small tile clipped by the leaf's own mask, then pasted onto the canvas.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SS = 2  # supersampling factor

LEAF_SHAPES = (
    "ovate", "obovate", "elliptic", "lanceolate", "oblanceolate", "linear", "spatulate", "deltoid",
    "orbicular", "cordate", "flabellate", "palmate", "pinnate_compound", "trifoliate", "needle",
)
MARGINS = (
    "entire", "serrate", "dentate", "crenate", "undulate", "lobed", "runcinate", "pinnatifid", "spiny",
    "bilobed", "notched",
)
VENATIONS = ("pinnate", "palmate", "parallel")
TEXTURES = (
    "plain", "reticulate", "stippled", "rugose", "pale_veins", "chevron", "fenestrate", "glossy", "variegated",
)

# Beta-like width profiles w(t) ∝ t^a (1-t)^b, scaled to a maximum half-width.
_PROFILES = {
    "ovate": (0.6, 1.0, 0.34),
    "obovate": (1.0, 0.6, 0.33),
    "elliptic": (0.8, 0.8, 0.26),
    "lanceolate": (0.6, 1.2, 0.13),
    "oblanceolate": (1.3, 0.6, 0.15),
    "linear": (0.12, 0.3, 0.05),
    "spatulate": (1.8, 0.35, 0.21),
}
_N_HALF = 120  # default outline points per side


@dataclass(frozen=True)
class PlantTraits:
    """What a species looks like (one row of the species table)."""

    leaf_shape: str
    margin: str
    venation: str
    leaf_color: tuple[int, int, int]
    flower_petals: int
    flower_color: tuple[int, int, int] | None
    vein_pairs: int
    texture: str


def hex_rgb(value: str) -> tuple[int, int, int]:
    value = value.strip().lstrip("#")
    if len(value) != 6:
        raise ValueError(f"not a #rrggbb colour: {value!r}")
    return (int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16))


# ---------------------------------------------------------------- colour helpers


def _jitter(rgb, rng: np.random.Generator, amount: float = 12.0) -> tuple[int, int, int]:
    c = np.asarray(rgb, float) * rng.uniform(0.88, 1.12) + rng.normal(0, amount, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


def _scale(rgb, f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, v * f))) for v in rgb)


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


# ---------------------------------------------------------------- leaf geometry (local frame)


def _half_outline(shape: str, n: int = _N_HALF) -> np.ndarray:
    """Right half of a simple leaf, base to tip, as (n, 2) points (x >= 0)."""
    s = np.linspace(0.0, 1.0, n)
    if shape in _PROFILES:
        a, b, w = _PROFILES[shape]
        t = s
        prof = t**a * (1 - t) ** b
        x = w * prof / prof.max()
        return np.stack([x, t], 1)
    if shape == "deltoid":
        x = 0.42 * (1 - s) ** 1.1 * np.minimum(1, s / 0.12) ** 0.6
        return np.stack([x, s], 1)
    if shape == "orbicular":
        return np.stack([0.5 * np.sin(np.pi * s), 0.5 - 0.5 * np.cos(np.pi * s)], 1)
    if shape == "cordate":
        u = s * np.pi  # classic heart curve, notch at the base, tip up
        x = 16 * np.sin(u) ** 3
        y = 13 * np.cos(u) - 5 * np.cos(2 * u) - 2 * np.cos(3 * u) - np.cos(4 * u)
        return np.stack([0.8 * x / 22.0, (5 - y) / 22.0], 1)
    if shape == "flabellate":
        n1 = n // 4
        side = np.linspace(0, 1, n1)[:, None] * np.array([[math.cos(0.5), math.sin(0.5)]]) * 0.95
        side[:, 0] *= np.linspace(0.2, 1, n1)  # narrow stalk-like base
        phi = np.linspace(0.5, math.pi / 2, n - n1)
        arc = 0.95 * np.stack([np.cos(phi), np.sin(phi)], 1)
        return np.concatenate([side, arc]) * np.array([1.0, 1.05])
    if shape == "palmate":
        phi = np.linspace(-math.pi / 2, math.pi / 2, n)
        lobes = [(math.pi / 2, 0.48), (math.radians(38), 0.44), (math.radians(-12), 0.30)]
        r = 0.14 + sum(a * np.exp(-np.abs((phi - p) / 0.3) ** 1.5) for p, a in lobes)
        return np.stack([r * np.cos(phi), r[0] + r * np.sin(phi)], 1)  # petiole sinus at y = 0
    raise ValueError(f"unknown leaf shape {shape!r}")


def _arclength(pts: np.ndarray) -> np.ndarray:
    d = np.r_[0, np.cumsum(np.hypot(*np.diff(pts, axis=0).T))]
    return d / max(d[-1], 1e-9)


def _apply_margin(pts: np.ndarray, margin: str, rng: np.random.Generator) -> np.ndarray:
    """Decorate a half outline with teeth or lobes; margins fade out at base and tip."""
    a = _arclength(pts)
    env = np.sin(np.pi * a) ** 0.5
    x, y = pts[:, 0].copy(), pts[:, 1].copy()
    g = np.gradient(pts, axis=0)
    g /= np.maximum(np.hypot(g[:, 0], g[:, 1]), 1e-9)[:, None]
    normal = np.stack([g[:, 1], -g[:, 0]], 1)  # outward for a base-to-tip right half
    disp = np.zeros_like(a)
    if margin == "serrate":
        n = rng.integers(14, 22)
        disp = 0.022 * ((a * n) % 1.0) ** 1.5
    elif margin == "dentate":
        n = rng.integers(9, 13)
        disp = 0.035 * (1 - np.abs(2 * ((a * n) % 1.0) - 1))
    elif margin == "crenate":
        n = rng.integers(8, 12)
        disp = 0.022 * np.abs(np.sin(np.pi * a * n))
    elif margin == "undulate":
        disp = 0.016 * np.sin(2 * np.pi * a * rng.integers(4, 6))
    elif margin == "spiny":
        frac = (a * rng.integers(8, 11)) % 1.0
        disp = 0.05 * np.maximum(0, 1 - np.abs(frac - 0.5) / 0.09)
    elif margin == "lobed":
        n, depth = rng.integers(3, 5) + 0.5, rng.uniform(0.45, 0.6)
        x *= 1 - depth * env + depth * env * np.abs(np.sin(np.pi * a * n)) ** 0.5
    elif margin == "runcinate":
        frac = (a * rng.integers(4, 6)) % 1.0
        x *= 1 - 0.7 * env + 0.7 * env * frac**0.45
    elif margin == "pinnatifid":
        frac = (a * rng.integers(5, 7)) % 1.0
        x *= 1 - 0.8 * env * np.exp(-(((frac - 0.5) / 0.045) ** 2))
    elif margin == "bilobed":
        x, y = _notch_tip(x, y)
    elif margin == "notched":  # waterlily: a slit from the blade's centre to its base
        keep = a > 0.035
        x, y = np.r_[0.0, x[keep]], np.r_[0.45, y[keep]]
        env, normal, disp = env[np.r_[0, np.flatnonzero(keep)]], normal[np.r_[0, np.flatnonzero(keep)]], 0.0
    return np.stack([x, y], 1) + normal * (disp * env)[:, None]


def _notch_tip(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ginkgo's cleft: pull the outline down near the apex."""
    top = y.max()
    near = np.exp(-((x / 0.08) ** 2)) * (y > 0.6 * top)
    return x, y - 0.3 * near


def _leaf_outline(shape: str, margin: str, rng: np.random.Generator,
                  n: int = _N_HALF) -> tuple[np.ndarray, np.ndarray]:
    """Full closed outline (2n, 2) plus the smooth half outline used to place veins."""
    smooth = _half_outline(shape, n)
    right = _apply_margin(smooth, margin, rng)
    # Natural asymmetry and a slight curl so no two leaves are mirror-perfect.
    sx = rng.uniform(0.88, 1.12, 2)
    left = right[::-1] * np.array([-sx[0], 1.0])
    right = right * np.array([sx[1], 1.0])
    full = np.concatenate([right, left])
    bend = rng.normal(0, 0.06)
    full[:, 0] += bend * full[:, 1] ** 2
    smooth = smooth * np.array([sx.mean(), 1.0])
    return full, smooth


def _halfwidth_fn(smooth: np.ndarray):
    """Half-width of the leaf as a function of height, from the smooth half outline."""
    bins = np.linspace(smooth[:, 1].min(), smooth[:, 1].max(), 48)
    idx = np.clip(np.digitize(smooth[:, 1], bins) - 1, 0, len(bins) - 1)
    hw = np.zeros(len(bins))
    np.maximum.at(hw, idx, smooth[:, 0])
    return lambda yy: np.interp(yy, bins, hw)


def _radius_fn(outline: np.ndarray, origin: np.ndarray):
    """Distance from `origin` to the outline as a function of direction angle."""
    d = outline - origin
    ang = np.arctan2(d[:, 1], d[:, 0])
    r = np.hypot(d[:, 0], d[:, 1])
    order = np.argsort(ang)
    ang, r = ang[order], r[order]
    return lambda phi: np.interp((phi + np.pi) % (2 * np.pi) - np.pi, ang, r, period=2 * np.pi)


def _veins(shape: str, venation: str, k: int, outline: np.ndarray, smooth: np.ndarray,
           rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Vein polylines in the local frame, as (points, rank) with rank 0 = primary, 1 = secondary.

    `k` is the species' vein density: secondary pairs (pinnate), branches per primary (palmate) or
    parallel veins per side.
    """
    veins: list[tuple[np.ndarray, int]] = []
    y_lo, y_hi = smooth[:, 1].min(), smooth[:, 1].max()
    hw = _halfwidth_fn(smooth)
    if venation == "pinnate":
        base = max(y_lo, 0.0)
        veins.append((np.array([[0, base], [0, y_hi * 0.97]]), 0))
        if k:
            t = np.repeat(base + (np.arange(k) + 0.6) / (k + 0.4) * (y_hi - base) * 0.86, 2)
            side = np.tile([-1.0, 1.0], k)
            rise = 0.06 + 0.25 / (k + 2)
            end_y = np.minimum(t + rise, y_hi * 0.97)
            w = side * hw(end_y) * rng.uniform(0.8, 0.92, 2 * k)
            start, mid, end = np.stack([0 * t, t], 1), np.stack([w * 0.5, t + rise * 0.65], 1), np.stack([w, end_y], 1)
            lines = np.stack([start, mid, end], 1)
            veins += [(line, 1) for line in lines]
    elif venation == "palmate" or (venation == "parallel" and shape == "flabellate"):
        flab = shape == "flabellate"
        origin = np.array([0.0, 0.0 if flab else (0.14 if shape == "palmate" else
                                                  0.45 if shape == "orbicular" else 0.12)])
        radius = _radius_fn(outline, origin)
        if flab:
            angles = np.linspace(0.55, math.pi - 0.55, 2 * k + 1)
        elif shape == "palmate":
            angles = np.array([np.pi / 2, math.radians(38), math.radians(142), math.radians(-12), math.radians(192)])
        elif shape == "orbicular":
            angles = np.linspace(0, 2 * np.pi, 9, endpoint=False) + np.pi / 2 + 0.2
        else:
            angles = np.array([np.pi / 2, 1.0, np.pi - 1.0, 0.1, np.pi - 0.1])
        for phi in angles:
            r = radius(phi) * 0.93
            direction = np.array([math.cos(phi), math.sin(phi)])
            veins.append((np.array([origin, origin + r * direction]), 1 if flab else 0))
            if flab:
                continue
            for j in range(k):
                f = (j + 1) / (k + 1)
                start = origin + f * r * direction
                length = 0.4 * (1 - f) * r + 0.02  # the leaf mask clips any overshoot
                for side in (-1, 1):
                    psi = phi + side * 0.6
                    veins.append((np.stack([start, start + length * np.array([math.cos(psi), math.sin(psi)])]), 1))
    else:  # parallel: lines following the blade from base to tip
        ys = np.linspace(y_lo + 0.02, y_hi * 0.98, 24)
        for f in np.linspace(-0.8, 0.8, 2 * k + 1):
            veins.append((np.stack([f * hw(ys), ys], 1), 0 if abs(f) < 1e-6 else 1))
    return veins


# ---------------------------------------------------------------- drawing leaves on the canvas

_CIRCLE = np.linspace(0, 2 * np.pi, 18, endpoint=False)
_UNIT = np.stack([np.cos(_CIRCLE), np.sin(_CIRCLE)], 1)


class _Frame:
    """Maps the local leaf frame to canvas pixels: base point, length and tip direction."""

    def __init__(self, base, length: float, angle: float):
        self.base = np.asarray(base, float)
        self.length = float(length)
        self.angle = float(angle)
        self.u = np.array([math.sin(angle), -math.cos(angle)])  # tip direction; angle 0 points up
        self.v = np.array([math.cos(angle), math.sin(angle)])

    def __call__(self, pts) -> np.ndarray:
        pts = np.asarray(pts, float)
        return self.base + self.length * (pts[..., :1] * self.v + pts[..., 1:2] * self.u)


_VARIANTS = 16  # leaf geometries per (shape, margin, venation, density, resolution)


@functools.lru_cache(maxsize=8192)
def _geometry(shape: str, margin: str, venation: str, vein_pairs: int, n: int, variant: int):
    """Outline, smooth half outline and veins of one leaf variant, in the local frame.

    Building a leaf (margin teeth, asymmetry, veins) is the costliest numpy work per leaf, so each
    species draws from a fixed set of variants. The variant's own seed depends only on its arguments,
    which keeps images independent of drawing order.
    """
    key = zlib.crc32(f"{shape}|{margin}|{venation}|{vein_pairs}|{n}".encode())
    rng = np.random.default_rng([key, variant])
    outline, smooth = _leaf_outline(shape, margin, rng, n)
    veins = _veins(shape, venation, vein_pairs, outline, smooth, rng)
    for a in (outline, smooth, *[v for v, _ in veins]):
        a.setflags(write=False)
    return outline, smooth, tuple(veins)


def _poly(pts: np.ndarray) -> list[float]:
    """Flat [x0, y0, x1, y1, ...] list, the fastest form PIL's ImageDraw accepts."""
    return np.round(pts, 1).ravel().tolist()


def _leaf(canvas: Image.Image, traits: PlantTraits, rng: np.random.Generator, frame: _Frame,
          color: tuple[int, int, int]) -> None:
    """One leaf of the species (compound leaves and needle bundles included) in `frame`."""
    if traits.leaf_shape == "needle":
        _needles(canvas, rng, frame, color)
    elif traits.leaf_shape == "pinnate_compound":
        _pinnate_compound(canvas, traits, rng, frame, color)
    elif traits.leaf_shape == "trifoliate":
        _stalk(canvas, frame(np.array([[0, 0], [0, 0.45]])), color, frame.length * 0.025)
        tip = frame(np.array([0, 0.45]))
        for turn in (-1.1, 0.0, 1.1):
            sub = _Frame(tip, frame.length * rng.uniform(0.5, 0.58), frame.angle + turn + rng.normal(0, 0.08))
            _simple_leaf(canvas, traits, rng, sub, color, "obovate", traits.margin)
    else:
        _simple_leaf(canvas, traits, rng, frame, color, traits.leaf_shape, traits.margin)


def _pinnate_compound(canvas, traits: PlantTraits, rng, frame: _Frame, color) -> None:
    if traits.margin == "lobed" and not traits.flower_petals:  # fern frond
        shape, pairs, size = "lanceolate", int(rng.integers(6, 9)), 0.36
    elif traits.margin == "lobed":
        shape, pairs, size = "ovate", 3, 0.34
    else:
        shape, pairs, size = "elliptic", int(rng.integers(2, 4)), 0.3
    _stalk(canvas, frame(np.array([[0, 0], [0, 0.97]])), color, frame.length * 0.018)
    for i in range(pairs):
        t = 0.18 + 0.72 * i / pairs
        taper = 1.0 - 0.45 * i / pairs if shape == "lanceolate" else 1.0
        for side in (-1, 1):
            sub = _Frame(frame(np.array([0, t])), frame.length * size * taper * rng.uniform(0.9, 1.1),
                         frame.angle + side * rng.uniform(0.95, 1.25))
            _simple_leaf(canvas, traits, rng, sub, color, shape, traits.margin)
    _simple_leaf(canvas, traits, rng, _Frame(frame(np.array([0, 0.9])), frame.length * size, frame.angle),
                 color, shape, traits.margin)


def _needles(canvas, rng, frame: _Frame, color) -> None:
    draw = ImageDraw.Draw(canvas)
    for turn in (-0.14, 0.14):
        f = _Frame(frame.base, frame.length, frame.angle + turn + rng.normal(0, 0.04))
        t = np.linspace(0, 1, 8)
        line = f(np.stack([0.04 * t**2 * np.sign(turn), t], 1))
        w = max(2, int(frame.length * 0.05))
        draw.line(_poly(line), fill=_scale(color, 0.7), width=w + 2)
        draw.line(_poly(line), fill=_jitter(color, rng, 5), width=w)


def _stalk(canvas, pts: np.ndarray, color, width: float) -> None:
    ImageDraw.Draw(canvas).line(_poly(pts), fill=_scale(_mix(color, (110, 90, 40), 0.3), 0.8),
                                width=max(1, int(round(width))), joint="curve")


def _simple_leaf(canvas: Image.Image, traits: PlantTraits, rng: np.random.Generator, frame: _Frame,
                 color, shape: str, margin: str) -> None:
    L = frame.length
    # PIL fills polygons scanline by scanline over all edges, so points cost time: use what the
    # margin needs (about five per tooth) and no more.
    n = 48 if L < 100 or margin in ("entire", "undulate", "notched") else 110 if margin != "pinnatifid" else 160
    variant = int(rng.integers(_VARIANTS))
    outline, smooth, veins = _geometry(shape, margin, traits.venation, traits.vein_pairs, n, variant)
    pts = frame(outline)
    base_color = _jitter(color, rng, 6)
    edge_color = _scale(base_color, 0.55)
    if L < 60:  # too small for visible texture: fill, edge and midrib straight onto the canvas
        draw = ImageDraw.Draw(canvas)
        draw.polygon(_poly(pts), fill=base_color, outline=edge_color)
        draw.line(_poly(frame(np.array([[0, max(0.0, outline[:, 1].min())], [0, 0.9 * outline[:, 1].max()]]))),
                  fill=_scale(base_color, 0.65), width=1)
        return
    x0, y0 = np.floor(pts.min(0)).astype(int) - 2
    x1, y1 = np.ceil(pts.max(0)).astype(int) + 2
    w, h = int(x1 - x0), int(y1 - y0)
    off = np.array([x0, y0])

    def local(p: np.ndarray) -> list[float]:
        return _poly(frame(p) - off)

    variegated = traits.texture == "variegated"
    tile = Image.new("RGB", (w, h), _jitter((160, 196, 70), rng, 10) if variegated else base_color)
    draw = ImageDraw.Draw(tile, "RGBA")
    if variegated:
        draw.polygon(local(outline * np.array([0.6, 0.94]) + np.array([0, 0.03])), fill=base_color)
    # One half a touch darker, as if lit from one side.
    right = outline[outline[:, 0] >= 0]
    draw.polygon(local(np.concatenate([[[0, outline[:, 1].min()]], right, [[0, outline[:, 1].max()]]])),
                 fill=(0, 0, 0, int(rng.uniform(10, 35))))

    pale = traits.texture == "pale_veins" or _luma(base_color) < 60
    vein_rgb = _mix(base_color, (235, 240, 210), 0.55) if pale else _scale(base_color, 0.6)
    widths = (max(1, round(L * (0.022 if pale else 0.016))), max(1, round(L * (0.011 if pale else 0.008))))
    alpha = (230, 210) if pale else (220, 205)
    flat = _poly(frame(np.concatenate([v for v, _ in veins])) - off)  # one transform for all veins
    at = 0
    for v, rank in veins:
        draw.line(flat[at:at + 2 * len(v)], fill=vein_rgb + (alpha[rank],), width=int(widths[rank]))
        at += 2 * len(v)
    _texture(draw, traits.texture, outline, local, L, base_color, rng)

    mask = Image.new("L", (w, h), 0)
    mdraw = ImageDraw.Draw(mask)
    mdraw.polygon(local(outline), fill=255)
    if traits.texture == "fenestrate":
        hw = _halfwidth_fn(smooth)
        for t in np.linspace(0.22, 0.72, max(2, traits.vein_pairs // 2)):
            for side in (-1, 1):
                c = np.array([side * hw(t) * rng.uniform(0.35, 0.5), t + rng.uniform(-0.02, 0.02)])
                mdraw.polygon(local(c + np.array([hw(t) * 0.13, 0.03]) * _UNIT), fill=0)
    canvas.paste(tile, (int(x0), int(y0)), mask)
    edge = _poly(pts)
    ImageDraw.Draw(canvas).line(edge + edge[:2], fill=edge_color, width=max(1, int(L * 0.006)))


def _walk(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, steps: int, step: float,
          turn: float) -> np.ndarray:
    """A random walk reflected inside the box [lo, hi]: one polyline that reads as a vein net or wrinkles."""
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.uniform(-turn, turn, steps))
    moves = step * np.stack([np.cos(heading), np.sin(heading)], 1)
    pts = rng.uniform(lo, hi) + np.cumsum(moves, 0)
    span = np.maximum(hi - lo, 1e-6)
    folded = np.mod(pts - lo, 2 * span)  # reflect at the walls
    return lo + np.where(folded > span, 2 * span - folded, folded)


def _texture(draw: ImageDraw.ImageDraw, texture: str, outline: np.ndarray, local, L: float, color, rng) -> None:
    lo, hi = outline.min(0), outline.max(0)
    if texture == "reticulate":  # a fine net of veinlets
        width = 2 if L > 250 else 1
        for _ in range(4):
            walk = _walk(rng, lo, hi, int(40 + L * 0.2), 0.045, 1.6)
            draw.line(local(walk), fill=_scale(color, 0.45) + (200,), width=width)
    elif texture == "rugose":  # wavy wrinkles
        for _ in range(4):
            walk = _walk(rng, lo, hi, int(20 + L * 0.1), 0.05, 0.5)
            draw.line(local(walk), fill=_scale(color, 0.7) + (120,), width=1)
    elif texture == "stippled":  # pale dots (areoles, glands), drawn as small squares of points
        dots = np.asarray(local(rng.uniform(lo, hi, (int(40 + L * 0.3), 2)))).reshape(-1, 2)
        r = max(1, int(L * 0.012))
        light, dark = dots[len(dots) // 4:], dots[: len(dots) // 4]
        for dx in range(-r, r + 1):
            for dy in range(-r, r + 1):
                if dx * dx + dy * dy <= r * r + 1:
                    draw.point((light + (dx, dy)).ravel().tolist(), fill=(250, 250, 215, 200))
                    draw.point((dark + (dx, dy)).ravel().tolist(), fill=_scale(color, 0.5) + (200,))
    elif texture == "chevron":  # clover's pale V
        v = np.array([[-0.3, 0.35], [0.0, 0.55], [0.3, 0.35]]) * np.array([hi[0] - lo[0], 1.0])
        draw.line(local(v), fill=(240, 245, 230, 170), width=max(1, int(L * 0.06)))
    elif texture == "glossy":  # a specular highlight
        c = np.array([rng.uniform(-0.1, 0.1) * (hi[0] - lo[0]), lo[1] + 0.55 * (hi[1] - lo[1])])
        draw.polygon(local(c + np.array([0.12 * (hi[0] - lo[0]), 0.22]) * _UNIT), fill=(255, 255, 255, 60))


# ---------------------------------------------------------------- flowers


def _flower(canvas: Image.Image, center, r: float, petals: int, color, rng: np.random.Generator) -> None:
    """A radial flower seen from above; many-petalled ones (>= 12) are composite heads (daisy-like)."""
    draw = ImageDraw.Draw(canvas)
    c = np.asarray(center, float)
    composite = petals >= 12
    rings = 2 if petals >= 24 else 1
    spin = rng.uniform(0, 2 * np.pi)
    squash = np.array([1.0, rng.uniform(0.75, 1.0)])  # slight tilt
    for ring in range(rings):
        outer = r * (1.0 if ring == 0 else 0.72)
        inner = r * (0.3 if composite else 0.12)
        half_len = (outer - inner) / 2
        half_w = (np.pi * (inner + half_len) / petals * (0.85 if composite else 1.25))
        for i in range(petals):
            a = spin + 2 * np.pi * (i + 0.5 * ring) / petals + rng.normal(0, 0.04)
            d, n = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
            mid = inner + half_len
            pts = (mid + half_len * _UNIT[:, :1]) * d + (min(half_w, half_len) * _UNIT[:, 1:]) * n
            pc = _jitter(color, rng, 5) if ring == 0 else _scale(color, 0.92)
            draw.polygon(_poly(c + pts * squash), fill=pc, outline=_scale(pc, 0.78))
    if composite and petals <= 24 and _luma(color) < 200:
        disc, dr = (92, 58, 24), 0.42  # sunflower-like dark disc
    elif composite:
        disc, dr = ((236, 190, 30) if _luma(color) >= 200 else _scale(color, 0.85)), 0.26
    else:
        disc, dr = ((240, 205, 60) if _luma(color) < 200 or color[2] > 150 else (230, 150, 40)), 0.16
    rr = r * dr * squash
    draw.ellipse([c[0] - rr[0], c[1] - rr[1], c[0] + rr[0], c[1] + rr[1]], fill=_jitter(disc, rng, 6))


def _spike(canvas: Image.Image, base, top, r: float, color, rng: np.random.Generator) -> None:
    """A flower spike (lavender-like): small florets along the top of a stalk."""
    draw = ImageDraw.Draw(canvas)
    base, top = np.asarray(base, float), np.asarray(top, float)
    draw.line(_poly(np.stack([base, top])), fill=(95, 120, 70), width=max(1, int(r * 0.35)))
    for t in np.linspace(0.55, 1.0, 9):
        p = base + t * (top - base) + rng.normal(0, r * 0.25, 2)
        rr = r * rng.uniform(0.5, 0.8)
        draw.ellipse([p[0] - rr, p[1] - rr * 0.8, p[0] + rr, p[1] + rr * 0.8], fill=_jitter(color, rng, 10))


def _bloom(canvas, traits: PlantTraits, rng, at, r: float, stalk_from=None) -> None:
    color = traits.flower_color or (255, 255, 255)
    if traits.flower_petals <= 4:
        start = stalk_from if stalk_from is not None else np.asarray(at) + np.array([0, r * 3])
        _spike(canvas, start, at, r * 0.45, color, rng)
        return
    if stalk_from is not None:
        _stalk(canvas, np.stack([np.asarray(stalk_from, float), np.asarray(at, float)]), traits.leaf_color, r * 0.12)
    _flower(canvas, at, r, traits.flower_petals, color, rng)


# ---------------------------------------------------------------- plant layouts


def _curve(p0, p1, p2, n: int = 16) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t**2 * np.asarray(p2)


def _layout(traits: PlantTraits, rng: np.random.Generator) -> str:
    if traits.leaf_shape == "linear":
        return "clump" if rng.random() < 0.8 else "closeup"
    if traits.leaf_shape == "needle":
        return "sprig" if rng.random() < 0.75 else "closeup"
    return str(rng.choice(["closeup", "sprig", "rosette"], p=[0.4, 0.35, 0.25]))


def draw_plant(traits: PlantTraits, rng: np.random.Generator, size: int,
               restyle: np.random.Generator | None = None) -> tuple[Image.Image, dict]:
    """One photo-like image of the species; returns the image and what it shows (view, flowers, setting).

    With `restyle`, the very plant that `rng` (in the same state) draws, photographed again: the same
    leaves and flowers on the same background, drawn from the same draws of `rng`, the plant slightly
    rotated, scaled, shifted and colour-shifted, with new lighting and noise, drawn from `restyle`.
    """
    if restyle is None:
        canvas, _, view = _compose(traits, rng, size, layered=False)
    else:
        layer, back, view = plant_layer(traits, rng, size)
        canvas = _rephotograph(layer, back, restyle)
        rng = restyle
    return _finish(canvas, rng, size), view


def plant_layer(traits: PlantTraits, rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image, dict]:
    """The plant of draw_plant alone, on a transparent supersampled RGBA layer, and its background (RGBA):
    (layer, background, view). Every stroke is opaque and leaves are pasted through binary masks, so
    compositing the layer on the background gives exactly the drawing draw_plant makes straight onto it."""
    return _compose(traits, rng, size, layered=True)


def _compose(traits: PlantTraits, rng: np.random.Generator, size: int,
             layered: bool) -> tuple[Image.Image, Image.Image | None, dict]:
    """Background, then the plant: on the background itself, or (layered) on a transparent layer of its own
    (the slower path, so only restyled drawings take it)."""
    S = size * SS
    background = str(rng.choice(_PLANT_BACKGROUNDS))
    back = _background(rng, S, background)
    canvas = Image.new("RGBA", (S, S), (0, 0, 0, 0)) if layered else back
    layout = _layout(traits, rng)
    color = _jitter(traits.leaf_color, rng, 8)
    flowering = traits.flower_petals > 0 and rng.random() < (0.45 if layout == "closeup" else 0.85)
    fr = S * (rng.uniform(0.1, 0.15) if traits.flower_petals >= 12 else rng.uniform(0.07, 0.11))

    if layout == "closeup":
        compound = traits.leaf_shape in ("pinnate_compound", "trifoliate")
        count = int(rng.integers(3, 6)) if traits.leaf_shape in ("linear", "needle") else 1
        for _ in range(count):
            L = S * (rng.uniform(0.75, 0.95) if compound or count > 1 else rng.uniform(0.55, 0.8))
            angle = rng.uniform(-0.9, 0.9) if rng.random() < 0.7 else rng.uniform(-np.pi, np.pi)
            centre = S * rng.uniform(0.4, 0.6, 2)
            frame = _Frame(centre - 0.5 * L * np.array([np.sin(angle), -np.cos(angle)]), L, angle)
            _stalk(canvas, frame(np.array([[0, 0], [0, -0.12]])), color, L * 0.02)
            _leaf(canvas, traits, rng, frame, color)
        if flowering:
            _bloom(canvas, traits, rng, S * rng.choice([0.18, 0.82], 2) + rng.normal(0, S * 0.03, 2), fr)
    elif layout == "sprig":
        start = np.array([S * rng.uniform(0.3, 0.7), S * 1.02])
        end = np.array([S * rng.uniform(0.3, 0.7), S * rng.uniform(0.12, 0.3)])
        stem = _curve(start, (start + end) / 2 + rng.normal(0, S * 0.1, 2), end)
        _stalk(canvas, stem, color, S * 0.012)
        needle = traits.leaf_shape == "needle"
        compound = traits.leaf_shape in ("pinnate_compound", "trifoliate")
        n = int(rng.integers(14, 22)) if needle else int(rng.integers(2, 5)) if compound else int(rng.integers(4, 8))
        big = {"pinnate_compound": 0.36, "trifoliate": 0.3, "needle": 0.17}.get(traits.leaf_shape, 0.24)
        for i, t in enumerate(np.sort(rng.uniform(0.12, 0.92, n))):
            j = min(int(t * (len(stem) - 1)), len(stem) - 2)
            d = stem[j + 1] - stem[j]
            stem_angle = math.atan2(d[0], -d[1])
            side = 1 if i % 2 else -1
            L = S * big * rng.uniform(0.8, 1.15) * (1.15 - 0.4 * t)
            _leaf(canvas, traits, rng, _Frame(stem[j], L, stem_angle + side * rng.uniform(0.6, 1.1)), color)
        if flowering:
            for k in range(int(rng.integers(1, 4))):
                at = end + (rng.normal(0, S * 0.08, 2) if k else 0)
                _bloom(canvas, traits, rng, at, fr * (1 if k == 0 else 0.8), stalk_from=end if k else None)
    elif layout == "rosette":
        centre = S * np.array([rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.62)])
        n = int(rng.integers(5, 9))
        for a in rng.permutation(np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 1)):
            L = S * rng.uniform(0.26, 0.4) * (0.8 if traits.leaf_shape == "pinnate_compound" else 1)
            _leaf(canvas, traits, rng, _Frame(centre, L, a + rng.normal(0, 0.12)), color)
        if flowering:
            if traits.flower_petals >= 12:
                _bloom(canvas, traits, rng, centre, fr)
            else:
                at = centre + np.array([rng.normal(0, S * 0.1), -S * 0.28])
                _bloom(canvas, traits, rng, at, fr, stalk_from=centre)
    else:  # clump of long leaves from one base (grasses, irises, lavender)
        base = np.array([S * rng.uniform(0.3, 0.7), S * 1.04])
        for a in rng.uniform(-0.6, 0.6, int(rng.integers(4, 9))):
            _leaf(canvas, traits, rng, _Frame(base, S * rng.uniform(0.6, 1.0), a), color)
        if flowering:
            for _ in range(int(rng.integers(1, 3)) if traits.flower_petals > 4 else int(rng.integers(3, 6))):
                at = base + np.array([rng.normal(0, S * 0.15), -S * rng.uniform(0.6, 0.85)])
                _bloom(canvas, traits, rng, at, fr, stalk_from=base)
    view = {"layout": layout, "flowering": bool(flowering), "background": background}
    return canvas, (back.convert("RGBA") if layered else None), view


def _rephotograph(plant: Image.Image, background: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The plant layer (RGBA) moved a little (rotation up to 12 degrees, scale 0.88-1.12, shift up to 10 %)
    and slightly colour-shifted, on its own background (RGBA): the same individual in the same place,
    photographed again from a step aside (new lighting and noise come from _finish), far in pHash."""
    S = plant.size[0]
    canvas = background.copy()
    angle, scale = rng.uniform(-12, 12), rng.uniform(0.88, 1.12)
    shift = rng.uniform(-0.1, 0.1, 2) * S
    # Inverse affine map (output -> input pixel) of rotate-and-scale about the centre, then shift.
    a = math.radians(angle)
    c, s = math.cos(a) / scale, math.sin(a) / scale
    cx, cy = S / 2 + shift[0], S / 2 + shift[1]
    matrix = (c, s, S / 2 - c * cx - s * cy, -s, c, S / 2 + s * cx - c * cy)
    # NEAREST keeps the layer's alpha binary (no dark fringe from transparent black); the 2x supersampled
    # canvas is box-reduced afterwards, which anti-aliases the edges.
    moved = plant.transform((S, S), Image.AFFINE, matrix, Image.NEAREST)
    gain = np.r_[rng.uniform(0.93, 1.07, 3), 1.0].astype(np.float32)
    moved = Image.fromarray(np.clip(np.asarray(moved, np.float32) * gain, 0, 255).astype(np.uint8), "RGBA")
    canvas.alpha_composite(moved)
    return canvas.convert("RGB")


# ---------------------------------------------------------------- backgrounds and finishing

_PLANT_BACKGROUNDS = ("soil", "sky", "paper", "stone", "dark", "sand", "bokeh")
_BG_COLORS = {
    "soil": ((92, 64, 40), (50, 34, 22)),
    "sky": ((150, 190, 235), (215, 230, 245)),
    "paper": ((238, 236, 228), (212, 210, 204)),
    "stone": ((140, 140, 135), (95, 96, 98)),
    "dark": ((28, 34, 30), (60, 62, 58)),
    "sand": ((222, 200, 160), (190, 165, 120)),
    "bokeh": ((60, 85, 55), (150, 160, 120)),
    "plain": ((235, 235, 235), (200, 200, 200)),
    "night": ((12, 18, 50), (40, 50, 100)),
    "sea": ((130, 180, 230), (30, 80, 150)),
    "sunset": ((250, 170, 90), (120, 90, 160)),
}


def _background(rng: np.random.Generator, S: int, kind: str, color=None) -> Image.Image:
    """A gradient between two jittered colours plus low-frequency blotches, at canvas size S."""
    pair = _BG_COLORS[kind] if color is None else (color, _scale(color, 0.85))
    c1, c2 = (np.array(_jitter(c, rng, 14), float) for c in pair)
    g = 7
    yy, xx = np.mgrid[0:g, 0:g] / (g - 1)
    a = rng.uniform(0, 2 * np.pi)
    ramp = np.clip(0.5 + (np.cos(a) * (xx - 0.5) + np.sin(a) * (yy - 0.5)) * rng.uniform(0.6, 1.4), 0, 1)
    blotch = rng.normal(0, 12, (g, g, 1)) + rng.normal(0, 2.5, (g, g, 3))  # mostly brightness, a little hue
    mixed = c1 * (1 - ramp[..., None]) + c2 * ramp[..., None] + blotch
    small = Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))
    # Smooth at quarter size, then blow up: far cheaper than a full-size bicubic and just as smooth
    # once the noise of _finish is on top.
    quarter = small.resize((S // 4, S // 4), Image.BICUBIC)
    if kind == "bokeh":
        draw = ImageDraw.Draw(quarter, "RGBA")
        q = S // 4
        for _ in range(int(rng.integers(6, 14))):
            p, r = rng.uniform(0, q, 2), q * rng.uniform(0.04, 0.12)
            draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=_jitter((200, 215, 170), rng, 30) + (60,))
        quarter = quarter.filter(ImageFilter.BoxBlur(max(1, q // 60)))
        return quarter.resize((S, S), Image.BILINEAR)
    return quarter.resize((S, S), Image.NEAREST)


_NOISE_SIDE = 512
_noise_field: np.ndarray | None = None


def _sensor_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size) unit-variance noise patch: a random window of one fixed field (cheap, deterministic)."""
    global _noise_field
    if size > _NOISE_SIDE // 2:
        return rng.standard_normal((size, size), dtype=np.float32)
    if _noise_field is None:
        _noise_field = np.random.default_rng(20240601).standard_normal((_NOISE_SIDE, _NOISE_SIDE), dtype=np.float32)
    y, x = rng.integers(0, _NOISE_SIDE - size, 2)
    return _noise_field[y:y + size, x:x + size]


def _finish(canvas: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """Downsample, then apply lighting (gain, colour cast, light falloff), sensor noise and focus blur."""
    img = canvas.reduce(SS) if canvas.size[0] == size * SS else canvas.resize((size, size), Image.BOX)
    # Planar (3, size, size) layout keeps numpy's inner loops long; broadcasting per-pixel fields over
    # a trailing axis of 3 is several times slower.
    arr = np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1), dtype=np.float32)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    a, k = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.25) * rng.uniform(0.8, 1.15)
    light = (rng.uniform(0.8, 1.15) + k * (np.cos(a) * ramp[None, :] + np.sin(a) * ramp[:, None])).astype(np.float32)
    arr *= light
    arr += _sensor_noise(rng, size) * np.float32(rng.uniform(1, 4))
    arr += rng.normal(0, 6, (3, 1, 1)).astype(np.float32)  # colour cast
    np.clip(arr, 0, 255, out=arr)
    out = Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8).transpose(1, 2, 0)))
    if rng.random() < 0.25:  # soft focus: down and up again is a cheap blur
        small = max(8, round(size * rng.uniform(0.45, 0.7)))
        out = out.resize((small, small), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    return out


# ---------------------------------------------------------------- general-domain scenes

_NAMED_COLORS = {
    "red": (205, 35, 40), "orange": (240, 130, 30), "yellow": (245, 205, 40), "blue": (40, 80, 200),
    "purple": (120, 50, 160), "pink": (240, 120, 170), "white": (245, 245, 245), "black": (25, 25, 28),
    "grey": (128, 128, 132), "brown": (120, 75, 40), "teal": (30, 140, 140),
}
_NUMBERS = ("a", "two", "three", "four", "five")
_PREFIXES = ("", "", "a drawing of ", "an illustration of ", "a photo of ", "a simple picture of ", "clip art of ")


def _color_name(rng: np.random.Generator, exclude: tuple[str, ...] = ()) -> str:
    return str(rng.choice([c for c in _NAMED_COLORS if c not in exclude]))


def _phrase(count: int, color: str, noun: str) -> str:
    if count == 1:
        plural = noun
    else:
        plural = noun[:-1] + "ies" if noun.endswith("y") else noun + ("es" if noun.endswith(("x", "s")) else "s")
    article = ("an" if color[0] in "aeiou" else "a") if count == 1 else _NUMBERS[count - 1]
    return f"{article} {color} {plural}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _house(d: ImageDraw.ImageDraw, x: float, ground: float, w: float, body, roof, lit: bool, rng) -> None:
    h = w * rng.uniform(0.7, 1.0)
    d.rectangle([x, ground - h, x + w, ground], fill=body, outline=_scale(body, 0.6), width=2)
    d.polygon([x - w * 0.1, ground - h, x + w * 1.1, ground - h, x + w / 2, ground - h - w * rng.uniform(0.45, 0.7)],
              fill=roof, outline=_scale(roof, 0.6))
    d.rectangle([x + w * 0.4, ground - h * 0.45, x + w * 0.6, ground], fill=_scale(body, 0.5))
    win = (250, 220, 110) if lit else (170, 210, 240)
    for wx in (0.12, 0.68):
        d.rectangle([x + w * wx, ground - h * 0.8, x + w * (wx + 0.2), ground - h * 0.55], fill=win,
                    outline=(60, 60, 60))


def _car(d: ImageDraw.ImageDraw, x: float, ground: float, w: float, body, rng) -> None:
    h = w * 0.28
    wheel = w * 0.11
    d.rounded_rectangle([x, ground - wheel - h, x + w, ground - wheel * 0.6], radius=h * 0.3, fill=body,
                        outline=_scale(body, 0.55), width=2)
    cab = [x + w * 0.22, ground - wheel - h, x + w * 0.32, ground - wheel - h * 1.8,
           x + w * 0.66, ground - wheel - h * 1.8, x + w * 0.8, ground - wheel - h]
    d.polygon(cab, fill=body, outline=_scale(body, 0.55))
    d.polygon([x + w * 0.3, ground - wheel - h * 1.05, x + w * 0.36, ground - wheel - h * 1.65,
               x + w * 0.63, ground - wheel - h * 1.65, x + w * 0.72, ground - wheel - h * 1.05],
              fill=(170, 210, 235))
    for cx in (x + w * 0.22, x + w * 0.78):
        d.ellipse([cx - wheel, ground - 2 * wheel, cx + wheel, ground], fill=(25, 25, 25))
        hub = wheel * 0.45
        d.ellipse([cx - hub, ground - wheel - hub, cx + hub, ground - wheel + hub], fill=(170, 170, 170))


def _boat(d: ImageDraw.ImageDraw, x: float, water: float, w: float, hull, sail, rng) -> None:
    deck, keel = water - w * 0.18, water + w * 0.04
    d.polygon([x, deck, x + w, deck, x + w * 0.82, keel, x + w * 0.15, keel], fill=hull, outline=_scale(hull, 0.6))
    mast = x + w * 0.48
    d.line([mast, water - w * 0.18, mast, water - w * 1.0], fill=(90, 60, 30), width=max(2, int(w * 0.03)))
    d.polygon([mast + 3, water - w * 0.95, mast + 3, water - w * 0.24, mast + w * 0.42, water - w * 0.24], fill=sail,
              outline=_scale(sail, 0.7))


def _sun(d: ImageDraw.ImageDraw, c, r: float, color) -> None:
    for a in np.linspace(0, 2 * np.pi, 12, endpoint=False):
        u = np.array([np.cos(a), np.sin(a)])
        d.line(_poly(np.stack([c + 1.25 * r * u, c + 1.7 * r * u])), fill=color, width=max(2, int(r * 0.15)))
    d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=color)


def _cloud(d: ImageDraw.ImageDraw, c, r: float, rng) -> None:
    for dx, dy, k in ((-0.8, 0.1, 0.6), (0.0, -0.2, 0.8), (0.8, 0.1, 0.6), (0.3, 0.25, 0.55), (-0.3, 0.25, 0.55)):
        rr = r * k * rng.uniform(0.9, 1.1)
        x, y = c[0] + dx * r, c[1] + dy * r
        d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=(250, 250, 252))


def _balloon(d: ImageDraw.ImageDraw, c, r: float, color) -> None:
    d.line([c[0], c[1] + r * 1.2, c[0] + r * 0.2, c[1] + r * 3.2], fill=(70, 70, 70), width=2)
    d.ellipse([c[0] - r * 0.85, c[1] - r, c[0] + r * 0.85, c[1] + r * 1.2], fill=color, outline=_scale(color, 0.6),
              width=2)


def _shape(d: ImageDraw.ImageDraw, kind: str, c, r: float, color, rng) -> None:
    outline = _scale(color, 0.6) if _luma(color) > 60 else (110, 110, 110)
    if kind == "circle":
        d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=color, outline=outline, width=2)
    elif kind == "ring":
        d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], outline=color, width=max(3, int(r * 0.3)))
    else:
        n = {"square": 4, "triangle": 3, "hexagon": 6, "star": 10}[kind]
        a = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, n, endpoint=False)
        rad = np.where(np.arange(n) % 2, 0.45, 1.0) * r if kind == "star" else np.full(n, r)
        d.polygon(_poly(np.asarray(c) + np.stack([rad * np.cos(a), rad * np.sin(a)], 1)), fill=color, outline=outline)


SCENE_KINDS = ("street", "sea", "sky", "shapes", "night")


def draw_scene(rng: np.random.Generator, size: int, kind: str | None = None) -> tuple[Image.Image, str]:
    """A general-domain image (houses, cars, boats, skies, geometric shapes; no plants) and its caption.

    `kind` (one of SCENE_KINDS) fixes the scene class; by default it is drawn from rng.
    """
    S = size * SS
    kind = kind or str(rng.choice(list(SCENE_KINDS), p=[0.25, 0.15, 0.15, 0.35, 0.1]))
    parts: list[str] = []
    if kind == "shapes":
        bg_name = str(rng.choice(["white", "grey", "black", "blue", "yellow", "pink"]))
        canvas = _background(rng, S, "plain", _NAMED_COLORS[bg_name])
        d = ImageDraw.Draw(canvas)
        kinds = rng.choice(["circle", "square", "triangle", "star", "ring", "hexagon"], int(rng.integers(1, 3)),
                           replace=False)
        for k in kinds:
            color = _color_name(rng, (bg_name,))
            count = int(rng.integers(1, 5))
            for _ in range(count):
                fill = _jitter(_NAMED_COLORS[color], rng, 8)
                _shape(d, str(k), S * rng.uniform(0.15, 0.85, 2), S * rng.uniform(0.07, 0.2), fill, rng)
            parts.append(_phrase(count, color, str(k)))
        caption = f"{_join(parts)} on a {bg_name} background"
    else:
        sky = "night" if kind == "night" else "sunset" if rng.random() < 0.25 else "sky"
        canvas = _background(rng, S, sky)
        d = ImageDraw.Draw(canvas)
        horizon = S * rng.uniform(0.35, 0.85)
        if kind in ("street", "night"):
            ground = str(rng.choice(["grey", "brown", "white"]))
            d.rectangle([0, horizon, S, S], fill=_jitter(_NAMED_COLORS[ground], rng, 10))
            houses, cars = int(rng.integers(0, 3)), int(rng.integers(0, 3))
            if houses + cars == 0:
                houses = 1
            if houses:
                color, roof = _color_name(rng, ("black",)), _color_name(rng, ("white",))
                for i in range(houses):
                    x, w = S * (0.05 + 0.45 * i + rng.uniform(0, 0.12)), S * rng.uniform(0.28, 0.38)
                    _house(d, x, horizon + S * 0.05, w, _jitter(_NAMED_COLORS[color], rng, 8),
                           _jitter(_NAMED_COLORS[roof], rng, 8), kind == "night", rng)
                roofs = f"a {roof} roof" if houses == 1 else f"{roof} roofs"
                parts.append(f"{_phrase(houses, color, 'house')} with {roofs}")
            if cars:
                color = _color_name(rng, (ground,))
                for i in range(cars):
                    x, w = S * (0.06 + 0.46 * i + rng.uniform(0, 0.08)), S * rng.uniform(0.32, 0.42)
                    _car(d, x, S * rng.uniform(0.88, 0.97), w, _jitter(_NAMED_COLORS[color], rng, 8), rng)
                parts.append(_phrase(cars, color, "car"))
            where = "at night" if kind == "night" else f"on a {'snowy' if ground == 'white' else 'quiet'} street"
        elif kind == "sea":
            water = [(40, 90, 160), (20, 50, 100), (60, 150, 170), (90, 140, 200)][int(rng.integers(0, 4))]
            d.rectangle([0, horizon, S, S], fill=_jitter(water, rng, 12))
            boats = int(rng.integers(1, 3))
            color = _color_name(rng, ("blue",))
            for i in range(boats):
                x, w = S * (0.05 + 0.45 * i + rng.uniform(0, 0.15)), S * rng.uniform(0.2, 0.45)
                _boat(d, x, horizon + S * rng.uniform(0.05, 0.12), w, _jitter(_NAMED_COLORS[color], rng, 8),
                      _jitter((245, 245, 240), rng, 6), rng)
            parts.append(_phrase(boats, color, "sailboat"))
            where = "on the sea"
        else:
            count, color = int(rng.integers(1, 6)), _color_name(rng, ("blue",))
            for _ in range(count):
                at = S * np.array([rng.uniform(0.1, 0.9), rng.uniform(0.15, 0.6)])
                _balloon(d, at, S * rng.uniform(0.05, 0.09), _jitter(_NAMED_COLORS[color], rng, 8))
            parts.append(_phrase(count, color, "balloon"))
            where = "in the sky"
        if kind == "night":
            c = S * np.array([rng.uniform(0.6, 0.9), rng.uniform(0.1, 0.25)])
            r = S * 0.07
            d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=(245, 240, 200))
            parts.append("the moon")
        elif rng.random() < 0.6:
            _sun(d, S * np.array([rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.2)]), S * rng.uniform(0.05, 0.08),
                 _jitter((250, 210, 40), rng, 8))
            parts.append("the sun")
        clouds = int(rng.integers(0, 3)) if kind != "night" else 0
        for _ in range(clouds):
            _cloud(d, S * np.array([rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.3)]), S * rng.uniform(0.05, 0.09), rng)
        if clouds:
            parts.append(_phrase(clouds, "white", "cloud"))
        if sky == "sunset":
            where += " at sunset"
        caption = f"{_join(parts[:1])} {where}" + (f" with {_join(parts[1:])}" if len(parts) > 1 else "")
    return _finish(canvas, rng, size), str(rng.choice(_PREFIXES)) + caption
