"""Seeded generator of dermoscopy-like images in the official ISIC 2018 Task 3 layout.

This is dpskin's embedded default dataset: it needs no download and is read by the very
same loader as the real data. Each lesion gets parameters drawn from a per-class profile
(size, shape, colours, dermoscopic structures); each of its images is a new *view* of it
(rotation, zoom, lighting, hair, ruler). Profiles overlap on purpose and some features are
borrowed from another class, so the task is learnable but far from trivial.

Everything is procedural, vectorised numpy at a small internal resolution, then resized
with PIL and saved as JPEG. Same seed -> byte-identical CSVs and identical pixels.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..constants import CLASSES, HAM10000_COUNTS
from ..errors import ConfigError

GENERATOR_VERSION = "1"
MIN_LESIONS_PER_CLASS = 3   # a lesion-grouped 3-way split keeps every class in every split
CONFUSION = 0.03            # probability that a feature group is drawn from another class
_MIN_RENDER_SIDE = 64       # px; smaller outputs are rendered larger, then downsampled

_P = {  # palette, RGB in [0, 1]
    "skin_light": (0.93, 0.80, 0.74), "skin_pink": (0.92, 0.72, 0.70),
    "skin_tan": (0.84, 0.64, 0.52), "skin_grey": (0.82, 0.76, 0.78),
    "tan": (0.78, 0.58, 0.45), "light_brown": (0.66, 0.45, 0.32), "brown": (0.50, 0.31, 0.20),
    "dark_brown": (0.33, 0.19, 0.12), "black": (0.13, 0.09, 0.09),
    "blue_grey": (0.42, 0.45, 0.56), "pink": (0.88, 0.58, 0.60), "red": (0.78, 0.26, 0.30),
    "dark_red": (0.55, 0.12, 0.18), "rose": (0.86, 0.46, 0.46), "purple": (0.50, 0.20, 0.36), "white": (0.95, 0.92, 0.90),
    "yellow_white": (0.93, 0.88, 0.74),
}
_SKINS = ("skin_light", "skin_pink", "skin_tan", "skin_grey")
_TEXTURES = ("network", "dots", "globules", "streaks", "veil", "vessels", "scale",
             "cereb", "lacunae", "white")

# Per-class profiles: (lo, hi) uniform ranges; sizes in units of half the short image side.
_SHAPE = {  # radius, aspect, asymmetry (harmonics 1-3), irregularity (4-9), border softness, opacity
    "MEL": dict(r=(0.35, 0.70), asp=(1.0, 1.6), asym=(0.06, 0.22), irr=(0.04, 0.12), soft=(0.05, 0.18), op=(0.80, 1.0)),
    "NV": dict(r=(0.22, 0.50), asp=(1.0, 1.3), asym=(0.0, 0.07), irr=(0.0, 0.04), soft=(0.04, 0.12), op=(0.70, 1.0)),
    "BCC": dict(r=(0.22, 0.50), asp=(1.0, 1.5), asym=(0.03, 0.15), irr=(0.02, 0.10), soft=(0.06, 0.18), op=(0.50, 0.85)),
    "AKIEC": dict(r=(0.30, 0.65), asp=(1.0, 1.6), asym=(0.05, 0.20), irr=(0.04, 0.12), soft=(0.12, 0.30), op=(0.45, 0.80)),
    "BKL": dict(r=(0.30, 0.65), asp=(1.0, 1.5), asym=(0.03, 0.15), irr=(0.02, 0.08), soft=(0.03, 0.12), op=(0.60, 0.95)),
    "DF": dict(r=(0.20, 0.38), asp=(1.0, 1.3), asym=(0.0, 0.08), irr=(0.0, 0.05), soft=(0.10, 0.25), op=(0.60, 0.90)),
    "VASC": dict(r=(0.12, 0.35), asp=(1.0, 1.4), asym=(0.0, 0.08), irr=(0.0, 0.05), soft=(0.02, 0.06), op=(0.80, 1.0)),
}
_COLOUR = {  # base colours, second colours, variegation (area of the second colour), centre darkening
    "MEL": (("brown", "dark_brown", "light_brown"), ("black", "blue_grey", "dark_brown", "pink"), (0.3, 0.9), (-0.3, 0.5)),
    "NV": (("brown", "light_brown", "dark_brown", "tan"), ("brown", "dark_brown", "light_brown"), (0.0, 0.3), (-0.2, 0.4)),
    "BCC": (("pink", "skin_pink", "pink"), ("blue_grey", "blue_grey", "dark_brown"), (0.1, 0.4), (-0.2, 0.2)),
    "AKIEC": (("rose", "pink", "rose"), ("tan", "light_brown", "red", "yellow_white"), (0.2, 0.6), (-0.2, 0.2)),
    "BKL": (("tan", "light_brown", "brown"), ("light_brown", "brown", "yellow_white"), (0.1, 0.5), (-0.2, 0.3)),
    "DF": (("tan", "light_brown"), ("light_brown", "brown"), (0.0, 0.3), (-0.9, -0.4)),
    "VASC": (("red", "purple", "dark_red"), ("purple", "dark_red", "red"), (0.2, 0.6), (0.0, 0.3)),
}
_TEX = {  # strength ranges of dermoscopic structures; missing -> 0
    "MEL": dict(network=(0.2, 0.8), dots=(0.2, 0.8), globules=(0.0, 0.5), streaks=(0.0, 0.7), veil=(0.0, 0.7), vessels=(0.0, 0.2), cereb=(0.0, 0.2), white=(0.0, 0.2)),
    "NV": dict(network=(0.2, 0.8), dots=(0.0, 0.2), globules=(0.0, 0.5), vessels=(0.0, 0.05)),
    "BCC": dict(dots=(0.0, 0.3), globules=(0.5, 0.9), vessels=(0.7, 1.0), scale=(0.0, 0.2), white=(0.0, 0.2)),
    "AKIEC": dict(network=(0.0, 0.2), dots=(0.0, 0.3), vessels=(0.1, 0.4), scale=(0.5, 1.0)),
    "BKL": dict(network=(0.0, 0.3), dots=(0.0, 0.3), cereb=(0.4, 1.0), scale=(0.0, 0.3)),
    "DF": dict(network=(0.2, 0.6), white=(0.7, 1.0)),
    "VASC": dict(lacunae=(0.7, 1.0), white=(0.0, 0.15)),
}
_DOT_COLOUR = {"MEL": "black", "NV": "dark_brown", "BCC": "blue_grey", "AKIEC": "dark_red",
               "BKL": "white", "DF": "brown", "VASC": "dark_red"}
# Official diagnosis_confirm_type strings (HAM10000) with per-class weights.
CONFIRM_TYPES = ("histopathology", "serial imaging showing no change",
            "single image expert consensus", "confocal microscopy with consistent histopathology")
_CONFIRM_W = {"MEL": (0.97, 0, 0.02, 0.01), "NV": (0.45, 0.50, 0.04, 0.01),
              "BCC": (0.99, 0, 0.01, 0), "AKIEC": (0.99, 0, 0, 0.01), "BKL": (0.60, 0, 0.30, 0.10),
              "DF": (0.65, 0, 0.35, 0), "VASC": (0.55, 0, 0.45, 0)}

Size = Union[int, Tuple[int, int]]


def _u(rng: np.random.Generator, lohi: Tuple[float, float]) -> float:
    return float(rng.uniform(*lohi))


def _noise_spec(rng: np.random.Generator, f: Tuple[float, float], n: int = 6) -> np.ndarray:
    """Random Fourier components (fx, fy, phase) of a smooth field; f in cycles per unit."""
    ang, mag = rng.uniform(0, 2 * np.pi, n), rng.uniform(*f, n) * 2 * np.pi
    return np.stack([mag * np.cos(ang), mag * np.sin(ang), rng.uniform(0, 2 * np.pi, n)], 1)


def _noise(spec: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Evaluate a Fourier field at coordinates (p, q); roughly N(0, 1) per pixel."""
    out = np.zeros(p.shape, np.float32)
    for fx, fy, ph in spec:
        out += np.cos(fx * p + fy * q + ph)
    return out * np.float32(math.sqrt(2.0 / len(spec)))


def allocate(n: int, images_per_lesion: Tuple[int, int], rng: np.random.Generator) -> List[Tuple[int, int]]:
    """Split n images into lesions: a list of (class index, number of images).

    Image counts per class follow HAM10000 proportions (largest remainder), raised to the
    minimum needed for MIN_LESIONS_PER_CLASS lesions; sizes are drawn in images_per_lesion.
    """
    lo, hi = images_per_lesion
    if not (1 <= lo <= hi):
        raise ConfigError(f"images_per_lesion={images_per_lesion!r}: need 1 <= low <= high")
    need = MIN_LESIONS_PER_CLASS * lo
    if n < need * len(CLASSES):
        raise ConfigError(f"n={n} is too small: every class needs {MIN_LESIONS_PER_CLASS} lesions "
                          f"of >= {lo} image(s), i.e. n >= {need * len(CLASSES)}")
    p = np.array([HAM10000_COUNTS[c] for c in CLASSES], float)
    raw = n * p / p.sum()
    counts = np.floor(raw).astype(int)
    counts[np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]] += 1
    def feasible(m: int) -> bool:  # m images split into >= 3 lesions of lo..hi images each
        return max(MIN_LESIONS_PER_CLASS, -(-m // hi)) <= m // lo

    big = int(np.argmax(counts))
    for c in range(len(CLASSES)):  # top up the other classes, taking images from the largest
        while c != big and not feasible(int(counts[c])):
            counts[c] += 1
            counts[big] -= 1
    out: List[Tuple[int, int]] = []
    for c, m in enumerate(counts):
        k_min, k_max = max(MIN_LESIONS_PER_CLASS, -(-m // hi)), m // lo
        if k_min > k_max:  # e.g. images_per_lesion=(2, 2) and an odd class count
            raise ConfigError(f"images_per_lesion={images_per_lesion!r}: cannot split the {m} "
                              f"{CLASSES[c]} images of n={n} into lesions of that size")
        k = int(np.clip(round(m / ((lo + hi) / 2)), k_min, k_max))
        sizes = rng.integers(lo, hi + 1, k)
        while (diff := m - int(sizes.sum())) != 0:  # nudge random lesions until the sum is m
            ok = np.flatnonzero(sizes < hi) if diff > 0 else np.flatnonzero(sizes > lo)
            sizes[rng.choice(ok)] += 1 if diff > 0 else -1
        out += [(c, int(s)) for s in sizes]
    return out


def draw_lesion(cls: str, rng: np.random.Generator) -> Dict[str, object]:
    """Parameters of one lesion of class ``cls``; each feature group may come from another class."""
    def src() -> str:
        return str(rng.choice([c for c in CLASSES if c != cls])) if rng.random() < CONFUSION else cls

    sh = _SHAPE[src()]
    base, second, varieg, cdark = _COLOUR[src()]
    L: Dict[str, object] = {k: _u(rng, v) for k, v in sh.items()}
    L["theta"] = float(rng.uniform(0, 2 * np.pi))
    L["harm"] = np.concatenate([rng.uniform(0, L["asym"], 3),  # high harmonics decay: smooth-ish border
                                rng.uniform(0, L["irr"], 6) * (np.arange(4, 10) / 4.0) ** -0.8])
    L["harm_ph"] = rng.uniform(0, 2 * np.pi, 9)
    def mix(names: Tuple[str, ...]) -> np.ndarray:  # a palette colour, +-10 % brightness, slight tint
        return np.array(_P[str(rng.choice(names))]) * rng.uniform(0.9, 1.1) * (1 + rng.normal(0, 0.025, 3))

    L["base"], L["second"] = mix(base), mix(second)
    L["varieg"], L["cdark"] = _u(rng, varieg), _u(rng, cdark)
    L["skin"] = mix(_SKINS)
    tex_cls = src()
    L["tex"] = {t: (_u(rng, _TEX[tex_cls][t]) if t in _TEX[tex_cls] else 0.0) for t in _TEXTURES}
    if rng.random() < CONFUSION:  # one extra structure borrowed from any class
        other = _TEX[str(rng.choice(CLASSES))]
        t = str(rng.choice(list(other)))
        L["tex"][t] = max(L["tex"][t], _u(rng, other[t]))
    L["dot_col"] = np.array(_P[_DOT_COLOUR[tex_cls]])
    L["n_var"], L["n_warp"] = _noise_spec(rng, (0.4, 1.2)), _noise_spec(rng, (1.0, 2.0))
    L["n_vessel"], L["n_vmask"] = _noise_spec(rng, (1.2, 2.5)), _noise_spec(rng, (0.8, 1.5))
    L["n_fine"], L["n_cereb"] = _noise_spec(rng, (2.5, 8.0), 16), _noise_spec(rng, (0.7, 1.3))
    L["n_skin"] = _noise_spec(rng, (0.3, 1.0))
    L["net_f"] = float(rng.uniform(3.0, 5.0))  # network cells per lesion radius
    k = int(rng.integers(6, 25))
    L["dot_xy"] = rng.uniform(-0.85, 0.85, (k, 2))
    L["dot_r"] = rng.uniform(0.03, 0.08, k)
    L["lac_xy"] = rng.uniform(-0.7, 0.7, (int(rng.integers(5, 14)), 2))
    L["lac_r"] = rng.uniform(0.15, 0.32, len(L["lac_xy"]))
    L["streak_n"] = int(rng.integers(10, 25))
    return L


def _blobs(p: np.ndarray, q: np.ndarray, xy: np.ndarray, r: np.ndarray, power: int = 2) -> np.ndarray:
    """Max over discs of exp(-(d/r)^power): soft dots (power 2) or flat-topped lobules (4)."""
    d2 = (p[..., None] - xy[:, 0]) ** 2 + (q[..., None] - xy[:, 1]) ** 2
    return np.exp(-((d2 / r**2) ** (power / 2))).max(-1).astype(np.float32)


def _lerp(img: np.ndarray, col: np.ndarray, w: np.ndarray) -> np.ndarray:
    return img + (np.asarray(col, np.float32) - img) * w[..., None]


def render(L: Dict[str, object], width: int, height: int, rng: np.random.Generator,
           hair: bool = True, ruler: bool = True) -> np.ndarray:
    """One view of lesion ``L`` as a uint8 (height, width, 3) RGB array."""
    s = max(1, -(-_MIN_RENDER_SIDE // min(width, height)))  # supersampling factor
    W, H = width * s, height * s
    half = min(W, H) / 2
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    x, y = (x - W / 2 + 0.5) / half, (y - H / 2 + 0.5) / half  # units: half the short side
    # view: rotation, zoom and offset of the lesion frame
    rot, zoom = L["theta"] + rng.uniform(0, 2 * np.pi), rng.uniform(0.9, 1.4)
    cx, cy = rng.uniform(-0.15, 0.15, 2)
    c, sn = math.cos(rot), math.sin(rot)
    u, v = ((x - cx) * c + (y - cy) * sn) / zoom, (-(x - cx) * sn + (y - cy) * c) / zoom
    R, asp = L["r"], L["asp"]
    p, q = u / (R * math.sqrt(asp)), v * math.sqrt(asp) / R   # lesion-normalised coords
    rho, phi = np.sqrt(p * p + q * q), np.arctan2(q, p)
    k = np.arange(1, 10, dtype=np.float32)
    bound = 1 + (L["harm"] * np.cos(k * phi[..., None] + L["harm_ph"])).sum(-1)
    d = rho / np.maximum(bound, 0.35)                          # 1 on the border
    mask = 1 / (1 + np.exp(-(1 - d) / L["soft"]))
    T = L["tex"]

    # skin: base tone, low-frequency mottling
    img = np.broadcast_to(np.asarray(L["skin"], np.float32), (H, W, 3)).copy()
    img *= (1 + 0.04 * _noise(L["n_skin"], x, y))[..., None]

    # lesion colour field
    t2 = 1 / (1 + np.exp(-2.5 * (_noise(L["n_var"], p, q) - (1 - 2 * L["varieg"]))))
    col = _lerp(np.broadcast_to(np.asarray(L["base"], np.float32), (H, W, 3)), L["second"], t2)
    col *= (1 - 0.35 * L["cdark"] * np.clip(1 - d, 0, 1))[..., None]
    fine = _noise(L["n_fine"], p, q) if T["scale"] > 0.02 or T["white"] > 0.02 else None
    if T["network"] > 0.02:  # warped grid: dark lines around lighter holes
        wp = p + 0.12 * _noise(L["n_warp"], p, q)
        wq = q + 0.12 * _noise(L["n_warp"], q, p)
        f = 2 * np.pi * L["net_f"]
        holes = ((1 + np.cos(f * wp)) * (1 + np.cos(f * wq)) / 4) ** 0.5
        col *= (1 - 0.55 * T["network"] * (1 - holes) * np.clip(1.2 - d, 0, 1))[..., None]
    if T["cereb"] > 0.02:    # gyri/sulci: contour bands of a smooth field
        sulci = 0.5 + 0.5 * np.cos(2 * np.pi * 2.5 * _noise(L["n_cereb"], p, q))
        col = _lerp(col, np.asarray(L["base"]) * 0.55, 0.6 * T["cereb"] * sulci**3)
        col = _lerp(col, _P["yellow_white"], 0.25 * T["cereb"] * (1 - sulci) ** 4)
    if T["veil"] > 0.02:     # blue-white veil over part of the lesion
        veil = np.clip(_noise(L["n_warp"], q, p) - 0.2, 0, 1) * (d < 0.9)
        col = _lerp(col, (0.55, 0.62, 0.74), 0.8 * T["veil"] * veil)
    if T["scale"] > 0.02:    # scaly: rough texture with whitish keratin flakes
        col *= (1 + 0.12 * T["scale"] * fine)[..., None]
        col = _lerp(col, _P["yellow_white"], 0.8 * T["scale"] * np.clip(fine - 1.0, 0, 1))
    if T["dots"] > 0.02:
        col = _lerp(col, L["dot_col"], 0.9 * T["dots"] * _blobs(p, q, L["dot_xy"], L["dot_r"]))
    if T["globules"] > 0.02:
        g = _blobs(p, q, L["dot_xy"][::2] * 0.8, L["dot_r"][::2] * 2.2)
        col = _lerp(col, np.asarray(L["second"]) * 0.8, 0.8 * T["globules"] * g)
    if T["lacunae"] > 0.02:  # red-purple lobules separated by paler septa
        lac = _blobs(p, q, L["lac_xy"], L["lac_r"], 4)
        col = _lerp(col, _P["dark_red"] if L["cdark"] > 0.15 else _P["purple"], T["lacunae"] * lac)
        col = _lerp(col, _P["pink"], 0.4 * T["lacunae"] * (1 - lac) * (d < 0.9))
    if T["white"] > 0.02:    # central white scar-like patch (DF), regression (MEL)
        wc = np.exp(-(rho / 0.55) ** 2) * (1 + 0.3 * fine)
        col = _lerp(col, _P["white"], np.clip(0.9 * T["white"] * wc, 0, 1))
    img += (col - img) * (mask * L["op"])[..., None]
    if T["streaks"] > 0.02:  # radial streaks / pseudopods at the periphery
        ring = np.exp(-((d - 1.0) / 0.12) ** 2)
        st = np.clip(np.cos(L["streak_n"] * phi + _noise(L["n_warp"], p, q)), 0, 1) ** 8
        img = _lerp(img, L["second"] * 0.7, 0.85 * T["streaks"] * ring * st)
    if T["vessels"] > 0.02:  # arborising red lines: thin level sets of a smooth field
        ves = np.exp(-(_noise(L["n_vessel"], p, q) / 0.25) ** 2)
        ves *= np.clip(_noise(L["n_vmask"], p, q) + 0.5, 0, 1) * np.clip(1.25 - d, 0, 1)
        img = _lerp(img, (0.85, 0.06, 0.12), np.clip(1.3 * T["vessels"] * ves, 0, 1))

    # imaging: lighting gradient, vignette, dermoscope circle, colour cast, noise
    gx, gy = rng.uniform(-0.12, 0.12, 2)
    r2 = x * x + y * y
    light = rng.uniform(0.85, 1.12) * (1 + gx * x + gy * y - rng.uniform(0, 0.12) * r2)
    img *= light[..., None] * rng.normal(1, 0.025, 3).astype(np.float32)
    if rng.random() < 0.2:
        rc = rng.uniform(1.0, 1.3) * max(W, H) / (2 * half)
        img *= (1 / (1 + np.exp((np.sqrt(r2) - rc) / 0.03)))[..., None] * 0.95 + 0.03
    img += rng.normal(0, rng.uniform(0.01, 0.03), img.shape).astype(np.float32)
    out = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    has_hair, has_ruler = rng.random() < 0.3, rng.random() < 0.1  # drawn even when disabled
    if hair and has_hair:
        out = _draw_hair(out, rng, s)
    if ruler and has_ruler:
        _draw_ruler(out, rng, s)
    if s > 1:
        out = out.resize((width, height), Image.Resampling.BOX)
    return np.asarray(out)


def _draw_hair(im: Image.Image, rng: np.random.Generator, s: int) -> Image.Image:
    """Dark thin curved hairs (quadratic Bezier curves), alpha-blended over the image."""
    W, H = im.size
    mask = Image.new("L", im.size, 0)
    draw = ImageDraw.Draw(mask)
    t = np.linspace(0, 1, 24)[:, None]
    for _ in range(int(rng.integers(1, 7))):
        a = rng.uniform(0, 1, 2) * (W, H)
        ang, ln = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.2) * max(W, H)
        b = a + ln * np.array([math.cos(ang), math.sin(ang)])
        m = (a + b) / 2 + rng.normal(0, 0.15 * ln, 2)
        pts = (1 - t) ** 2 * a + 2 * (1 - t) * t * m + t**2 * b
        draw.line([tuple(pt) for pt in pts], fill=int(rng.integers(120, 230)),
                  width=max(1, round(s * rng.uniform(0.5, 1.3))))
    shade = int(rng.integers(20, 70))
    colour = Image.new("RGB", im.size, (shade, int(shade * 0.8), int(shade * 0.7)))
    return Image.composite(colour, im, mask)


def _draw_ruler(im: Image.Image, rng: np.random.Generator, s: int) -> None:
    """Millimetre-like tick marks along one image edge, as dermoscopy rulers leave."""
    W, H = im.size
    draw = ImageDraw.Draw(im)
    step, off = max(2, int(rng.integers(3, 6)) * s), int(rng.integers(1, 4)) * s
    side, shade = int(rng.integers(4)), int(rng.integers(10, 60))
    for i, pos in enumerate(range(off, (W if side < 2 else H), step)):
        ln = (4 if i % 5 == 0 else 2) * s
        e = off if side % 2 == 0 else (H if side < 2 else W) - off - ln
        xy = [(pos, e), (pos, e + ln)] if side < 2 else [(e, pos), (e + ln, pos)]
        draw.line(xy, fill=(shade, shade, shade), width=max(1, s // 2))


def generate(out_dir: Path, n: int, size: Size = 64, seed: int = 0, *, hair: bool = True,
             ruler: bool = True, images_per_lesion: Tuple[int, int] = (1, 4)) -> Path:
    """Write ``n`` synthetic dermoscopy-like images in the official ISIC 2018 Task 3 layout.

    ``size`` is the square side in px, or ``(width, height)`` such as ``(200, 150)``. Creates
    ``ISIC2018_Task3_Training_Input/ISIC_<7 digits>.jpg``, the ground-truth and
    lesion-grouping CSVs and a README.txt, and returns ``out_dir``. Classes follow HAM10000
    proportions with at least 3 lesions per class (ConfigError, a ValueError, if ``n`` is
    too small). Deterministic in ``seed``.
    """
    width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if width < 8 or height < 8:
        raise ConfigError(f"size={size!r}: images must be at least 8x8 px")
    ipl = (int(images_per_lesion[0]), int(images_per_lesion[1]))
    rng = np.random.default_rng([seed, 0])
    lesions = allocate(int(n), ipl, rng)
    rng.shuffle(lesions)   # lesion ids and image ids carry no class order
    views = [(li, j) for li, (_, k) in enumerate(lesions) for j in range(k)]
    order = rng.permutation(len(views))
    out_dir = Path(out_dir)
    img_dir = out_dir / "ISIC2018_Task3_Training_Input"
    img_dir.mkdir(parents=True, exist_ok=True)
    gt = ["image," + ",".join(CLASSES)]
    groups = ["image,lesion_id,diagnosis_confirm_type"]
    params: Dict[int, Dict[str, object]] = {}
    confirm: Dict[int, str] = {}
    for i, vi in enumerate(tqdm(order, desc="synthetic images", unit="img")):
        li, _ = views[vi]
        c = lesions[li][0]
        if li not in params:  # lesion rng depends only on (seed, lesion index)
            lrng = np.random.default_rng([seed, 1, li])
            params[li] = draw_lesion(CLASSES[c], lrng)
            w = np.array(_CONFIRM_W[CLASSES[c]], float)
            confirm[li] = CONFIRM_TYPES[int(lrng.choice(len(w), p=w / w.sum()))]
        pixels = render(params[li], width, height, np.random.default_rng([seed, 2, i]), hair, ruler)
        name = f"ISIC_{i:07d}"
        Image.fromarray(pixels).save(img_dir / f"{name}.jpg", quality=90)
        gt.append(name + "," + ",".join("1.0" if k == c else "0.0" for k in range(len(CLASSES))))
        groups.append(f"{name},HAM_{li:07d},{confirm[li]}")
    (out_dir / "ISIC2018_Task3_Training_GroundTruth.csv").write_text("\n".join(gt) + "\n")
    (out_dir / "ISIC2018_Task3_Training_LesionGroupings.csv").write_text("\n".join(groups) + "\n")
    counts = {cl: sum(k for c, k in lesions if CLASSES[c] == cl) for cl in CLASSES}
    (out_dir / "README.txt").write_text(
        "SYNTHETIC data generated by dpskin_core.synth -- procedural dermoscopy-like images,\n"
        "NOT real patients and NOT the ISIC archive. Same layout as ISIC 2018 Task 3.\n"
        f"generator_version={GENERATOR_VERSION} seed={seed} n={n} size={width}x{height} "
        f"hair={hair} ruler={ruler} images_per_lesion={ipl[0]}-{ipl[1]} lesions={len(lesions)}\n"
        f"images per class: {counts}\n")
    return out_dir
