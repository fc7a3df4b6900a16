"""Seeded synthetic Ref-VOS world and writers for every data layout the project reads.

Why: the real datasets are large and licensed; tests, the quickstart and a CPU training smoke run need
small data in the *exact* real layouts. The world is built so that language matters: every video
holds 2-4 large, saturated, distinctly coloured shapes at once, every expression picks out its target
set unambiguously (checked against all objects of the video), and each object is the target of some
expression, so a model that ignores the text cannot do well.

Determinism: every video/image draws from its own ``SeedSequence([seed, tag, index])`` so the same
seed gives byte-identical files, and changing the size of one split does not change the others.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import zlib
from dataclasses import asdict, dataclass, fields
from typing import Callable, Sequence

import cv2
import numpy as np

from ..utils.io import atomic_write_bytes, atomic_write_json
from .errors import DataError
from .rle import encode_mask

logger = logging.getLogger(__name__)

# Saturated colours with well separated hues (RGB); backgrounds are neutral greys.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "yellow": (240, 215, 20),
    "green": (30, 175, 45),
    "cyan": (20, 200, 215),
    "blue": (35, 65, 225),
    "purple": (150, 40, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
DIRECTIONS: tuple[str, ...] = ("static", "left", "right", "up", "down")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
FORMATS: tuple[str, ...] = ("mevis", "qframe", "revos", "rvos", "refsav", "refcoco")
MEVIS_SPLITS: tuple[str, ...] = ("train", "valid_u", "valid")


@dataclass
class SyntheticOptions:
    """Knobs of generate_all (CLI flags mirror these names)."""

    num_train_videos: int = 120
    num_valid_u_videos: int = 20
    num_valid_videos: int = 20
    num_revos_videos: int = 24
    num_rvos_videos: int = 24
    num_sav_videos: int = 8
    num_images: int = 60
    min_frames: int = 12
    max_frames: int = 40
    sizes: tuple[tuple[int, int], ...] = ((320, 180), (256, 192))  # (W, H)
    min_objects: int = 2
    max_objects: int = 4
    min_object_size: float = 0.22  # fraction of the shorter frame side
    max_object_size: float = 0.32
    motion_expression_prob: float = 0.25  # per object: also add a motion expression
    extra_lengths: tuple[int, ...] = ()  # one extra valid_u and valid video per length (e.g. 100, 130)
    formats: tuple[str, ...] = FORMATS
    jpeg_quality: int = 90
    progress: bool = False

    def validate(self) -> None:
        for f in ("num_train_videos", "num_valid_u_videos", "num_valid_videos", "num_revos_videos",
                  "num_rvos_videos", "num_sav_videos", "num_images"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f} must be >= 0, got {getattr(self, f)}")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"need 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        if not self.sizes:
            raise ValueError("sizes must list at least one WxH frame size")
        for w, h in self.sizes:
            if w < 32 or h < 32 or w % 2 or h % 2:
                raise ValueError(f"frame size {w}x{h}: width and height must be even and >= 32")
        if not 1 <= self.min_objects <= self.max_objects <= len(DIRECTIONS) - 1:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 4, got {self.min_objects}, {self.max_objects}")
        if not 0.05 <= self.min_object_size <= self.max_object_size <= 0.5:
            raise ValueError("need 0.05 <= min_object_size <= max_object_size <= 0.5")
        if not 0.0 <= self.motion_expression_prob <= 1.0:
            raise ValueError(f"motion_expression_prob is a probability, in [0, 1], got {self.motion_expression_prob}")
        for n in self.extra_lengths:
            if n < 1:
                raise ValueError(f"extra_lengths must be positive, got {n}")
        if not self.formats:  # nothing would be generated
            raise ValueError(f"formats must name at least one of {list(FORMATS)}")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown formats {unknown}; choose from {list(FORMATS)}")


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'320x180,256x192' -> ((320, 180), (256, 192)) (width x height)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            w, h = part.split("x")
            out.append((int(w), int(h)))
        except ValueError:
            raise ValueError(f"bad frame size {part!r}; expected WIDTHxHEIGHT, e.g. 320x180") from None
    return tuple(out)


def _rng(seed: int, tag: str, index: int) -> np.random.Generator:
    """Independent stream per (seed, layout/split, item)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(tag.encode()), int(index)]))


# ==================================================================================================
# world: objects, motion, rendering
# ==================================================================================================
@dataclass
class ObjectSpec:
    """One object; motion is piecewise linear in normalised time u in [0, 1], so the same object can
    be rendered at any frame count (e.g. 24 fps for Ref-SAV, 6 fps for MeViS)."""

    obj_id: int
    color: str
    shape: str
    size: float  # px, nominal diameter
    rotation: float
    rgb: tuple[int, int, int]
    start: tuple[float, float]
    end: tuple[float, float]
    move_from: float = 0.0
    move_to: float = 1.0
    appear: float = 0.0  # not drawn before this u
    direction: str = "static"
    stops: bool = False
    leaves: bool = False
    late: bool = False

    def center(self, u: float) -> tuple[float, float]:
        if u <= self.move_from or self.direction == "static":
            return self.start
        if u >= self.move_to:
            return self.end
        a = (u - self.move_from) / max(self.move_to - self.move_from, 1e-9)
        return (self.start[0] + a * (self.end[0] - self.start[0]), self.start[1] + a * (self.end[1] - self.start[1]))

    def drawn(self, u: float) -> bool:
        return u >= self.appear - 1e-9


@dataclass
class SceneSpec:
    """A video (or a still image when num_frames == 1): frame size, background and objects (z-order =
    list order, later objects are drawn in front)."""

    name: str
    width: int
    height: int
    num_frames: int
    background: dict
    objects: list[ObjectSpec]
    crossing: tuple[int, int] | None = None


def shape_polygon(shape: str, cx: float, cy: float, size: float, rotation: float = 0.0) -> np.ndarray:
    """Vertices [N, 2] (x, y) of a shape of nominal diameter ``size``."""
    if shape == "circle":
        n, r = 48, size / 2
        ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
        pts = np.stack([r * np.cos(ang), r * np.sin(ang)], 1)
    elif shape == "square":
        h = size * 0.43
        pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]], dtype=float)
    elif shape == "triangle":
        r = size * 0.6
        ang = -np.pi / 2 + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        pts = np.stack([r * np.cos(ang), r * np.sin(ang) + size * 0.1], 1)
    elif shape == "star":
        ro, ri = size * 0.6, size * 0.3
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, ro, ri)
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(rotation), math.sin(rotation)
    rot = pts @ np.array([[c, s], [-s, c]])
    return rot + np.array([cx, cy])


def _raster(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sub-pixel polygon fill (cv2, 4 fractional bits) -> bool [H, W]."""
    canvas = np.zeros((h, w), dtype=np.uint8)
    pts = np.round((poly - 0.5) * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _background(spec: SceneSpec) -> np.ndarray:
    bg = spec.background
    h, w = spec.height, spec.width
    base = np.array(bg["rgb"], dtype=np.float32)
    img = np.broadcast_to(base, (h, w, 3)).copy()
    if bg["kind"] == "gradient":
        ramp = np.linspace(-1, 1, w if bg["axis"] == 0 else h, dtype=np.float32) * bg["amp"]
        img += ramp[None, :, None] if bg["axis"] == 0 else ramp[:, None, None]
    elif bg["kind"] == "noise":
        r = np.random.default_rng(bg["seed"])
        small = r.standard_normal((max(h // 16, 2), max(w // 16, 2))).astype(np.float32)
        img += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)[:, :, None] * bg["amp"]
    return np.clip(img, 0, 255).astype(np.uint8)


def render_scene(spec: SceneSpec) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """-> (frames [L] of RGB uint8 [H, W, 3], masks[obj][t] bool [H, W] of the *visible* pixels)."""
    h, w, n = spec.height, spec.width, spec.num_frames
    bg = _background(spec)
    frames, masks = [], [[] for _ in spec.objects]
    for t in range(n):
        u = t / (n - 1) if n > 1 else 0.0
        img = bg.copy()
        full = []
        for o in spec.objects:
            if o.drawn(u):
                cx, cy = o.center(u)
                m = _raster(shape_polygon(o.shape, cx, cy, o.size, o.rotation), h, w)
                img[m] = o.rgb
            else:
                m = np.zeros((h, w), dtype=bool)
            full.append(m)
        occluded = np.zeros((h, w), dtype=bool)
        for k in range(len(spec.objects) - 1, -1, -1):  # front to back
            masks[k].append(full[k] & ~occluded)
            occluded |= full[k]
        frames.append(img)
    return frames, masks


def _pick_colors_shapes(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """Distinct (colour, shape) pairs; colours mostly distinct, sometimes shared (for plural/shape-
    based expressions), shapes shared more often."""
    colors, shapes = list(COLORS), list(SHAPES)
    while True:
        cs = list(rng.choice(colors, size=n, replace=False))
        if n >= 2 and rng.random() < 0.2:
            cs[1] = cs[0]
        ss = [str(rng.choice(shapes)) for _ in range(n)]
        pairs = list(zip(map(str, cs), ss))
        if len(set(pairs)) == n:
            order = rng.permutation(n)
            return [pairs[i] for i in order]


def _axis(direction: str) -> int:
    return 0 if direction in ("left", "right") else 1


def _sign(direction: str) -> int:
    return -1 if direction in ("left", "up") else 1


def _make_objects(rng: np.random.Generator, w: int, h: int, n_obj: int, opts: SyntheticOptions, still: bool):
    short = min(w, h)
    pairs = _pick_colors_shapes(rng, n_obj)
    if still:
        dirs = ["static"] * n_obj
    else:
        dirs = [str(d) for d in rng.choice(DIRECTIONS, size=n_obj, replace=False)]
    movers = [i for i, d in enumerate(dirs) if d != "static"]
    leaver = int(rng.choice(movers)) if (movers and not still and rng.random() < 0.3) else None
    late_cands = [i for i in range(n_obj) if i != leaver]
    late = int(rng.choice(late_cands)) if (not still and late_cands and rng.random() < 0.3) else None
    crossing = None
    if not still and "left" in dirs and "right" in dirs and leaver is None and rng.random() < 0.5:
        crossing = (dirs.index("left"), dirs.index("right"))
    objs = []
    shared_y = None
    for i, ((color, shape), d) in enumerate(zip(pairs, dirs)):
        size = float(rng.uniform(opts.min_object_size, opts.max_object_size) * short)
        e = 0.62 * size  # conservative half extent (stars/triangles reach 0.6 * size)
        rot = float(rng.uniform(-0.15, 0.15)) if shape != "circle" else 0.0
        rgb = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLORS[color])
        lo = (e, e)
        hi = (w - e, h - e)
        p = [float(rng.uniform(lo[0], hi[0])), float(rng.uniform(lo[1], hi[1]))]
        start, end = tuple(p), tuple(p)
        move_from, move_to, stops, leaves = 0.0, 1.0, False, False
        appear = float(rng.uniform(0.25, 0.5)) if i == late else 0.0
        if d != "static":
            ax, sg = _axis(d), _sign(d)
            span = hi[ax] - lo[ax]
            if crossing is not None and i in crossing:
                if shared_y is None:
                    shared_y = float(rng.uniform(lo[1], hi[1]))
                p[1] = float(np.clip(shared_y + rng.uniform(-0.1, 0.1) * size, lo[1], hi[1]))
                dist = float(rng.uniform(0.7, 0.9)) * span
            else:
                dist = float(rng.uniform(0.35, 0.75)) * span
            if i == leaver:
                leaves = True
                limit = w if ax == 0 else h
                # start in the half opposite to the exit edge, leave entirely before the end
                a0 = float(rng.uniform(0.35, 0.65)) * limit
                p[ax] = a0 if sg < 0 else limit - a0
                q = list(p)
                q[ax] = -e - 2 if sg < 0 else limit + e + 2
                start, end = tuple(p), tuple(q)
                move_from, move_to = appear, appear + float(rng.uniform(0.55, 0.8)) * (1 - appear)
            else:
                a_lo, a_hi = (lo[ax] + dist, hi[ax]) if sg < 0 else (lo[ax], hi[ax] - dist)
                p[ax] = float(rng.uniform(a_lo, max(a_lo, a_hi)))
                q = list(p)
                q[ax] = p[ax] + sg * dist
                start, end = tuple(p), tuple(q)
                move_from = appear
                if crossing is None or i not in crossing:
                    stops = bool(rng.random() < 0.35)
                move_to = move_from + (float(rng.uniform(0.4, 0.65)) * (1 - move_from) if stops else (1 - move_from))
        objs.append(ObjectSpec(
            obj_id=i, color=color, shape=shape, size=size, rotation=rot, rgb=rgb, start=start, end=end,
            move_from=move_from, move_to=move_to, appear=appear, direction=d, stops=stops, leaves=leaves,
            late=(i == late),
        ))
    return objs, crossing


def _min_separation(objs: list[ObjectSpec], crossing, w: int, h: int) -> float:
    """Smallest (distance / needed distance) over pairs and sampled times; < 1 means overlap."""
    worst = float("inf")
    for u in np.linspace(0, 1, 9):
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                if crossing is not None and {i, j} == set(crossing):
                    continue
                a, b = objs[i], objs[j]
                if not (a.drawn(u) and b.drawn(u)):
                    continue
                (xa, ya), (xb, yb) = a.center(u), b.center(u)
                need = 0.5 * (a.size + b.size) * 0.95
                worst = min(worst, math.hypot(xa - xb, ya - yb) / need)
    return worst


def make_scene(rng: np.random.Generator, name: str, opts: SyntheticOptions, num_frames: int | None = None,
               still: bool = False) -> SceneSpec:
    """Draw one video (or still image): size, background, objects without lasting overlaps."""
    w, h = opts.sizes[int(rng.integers(len(opts.sizes)))]
    if num_frames is None:
        num_frames = 1 if still else int(rng.integers(opts.min_frames, opts.max_frames + 1))
    # Favour 3-4 objects: with many objects at once, ignoring the expression cannot score well.
    counts = np.arange(opts.min_objects, opts.max_objects + 1)
    wts = np.where(counts <= 2, 1.0, 4.0)
    n_obj = int(rng.choice(counts, p=wts / wts.sum()))
    kind = str(rng.choice(["plain", "noise", "gradient"], p=[0.4, 0.3, 0.3]))
    grey = int(rng.integers(85, 171))
    background = {
        "kind": kind,
        "rgb": [int(np.clip(grey + rng.integers(-8, 9), 0, 255)) for _ in range(3)],
        "amp": float(rng.uniform(6, 14) if kind == "noise" else rng.uniform(10, 25)),
        "axis": int(rng.integers(2)),
        "seed": int(rng.integers(2**31)),
    }
    best = None
    for _ in range(60):
        objs, crossing = _make_objects(rng, w, h, n_obj, opts, still)
        sep = _min_separation(objs, crossing, w, h)
        if best is None or sep > best[0]:
            best = (sep, objs, crossing)
        if sep >= 1.0:
            break
    _, objs, crossing = best
    order = [int(k) for k in rng.permutation(len(objs))]  # random z-order; obj ids stay 0..n-1
    objs = [objs[k] for k in order]
    if crossing is not None:
        crossing = (order.index(crossing[0]), order.index(crossing[1]))
    for z, o in enumerate(objs):
        o.obj_id = z
    return SceneSpec(name=name, width=w, height=h, num_frames=num_frames, background=background,
                     objects=objs, crossing=crossing)


# ==================================================================================================
# referring expressions
# ==================================================================================================
@dataclass
class ExpressionSpec:
    """A generated expression and its target objects (indices into scene.objects)."""

    text: str
    obj_ids: list[int]
    kind: str  # "appearance", "motion", "plural"


EXPRESSION_KINDS: tuple[str, ...] = ("colour", "shape", "motion-only", "plural")


def text_words(text: str) -> set[str]:
    """Lower-case words of an expression or question, punctuation dropped."""
    return set(text.lower().replace(".", " ").replace(",", " ").replace("?", " ").split())


def expression_kind(text: str, num_objects: int) -> str:
    """How a synthetic expression picks its target, read off the text (for per-kind scores): "plural"
    (several targets), else "colour" (names a colour), "shape" (names a shape, no colour) or
    "motion-only" (only what it does: "the object that keeps moving up")."""
    if num_objects > 1:
        return "plural"
    words = text_words(text)
    if words & set(COLORS):
        return "colour"
    if words & set(SHAPES):
        return "shape"
    return "motion-only"


def _motion_phrases(o: ObjectSpec) -> list[tuple[str, Callable[[ObjectSpec], bool]]]:
    """Motion descriptions of o with the predicate that defines their meaning."""
    out = []
    d = o.direction
    if d == "static":
        out.append(("that does not move", lambda p: p.direction == "static"))
        out.append(("that stays still", lambda p: p.direction == "static"))
    else:
        word = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}[d]
        if o.stops:
            out.append((f"that moves {word} and then stops", lambda p, d=d: p.direction == d))
        elif not o.leaves:
            out.append((f"moving {word}", lambda p, d=d: p.direction == d))
            out.append((f"that keeps moving {word}", lambda p, d=d: p.direction == d))
    if o.leaves:
        out.append(("that leaves the frame", lambda p: p.leaves))
        out.append(("that moves out of the view", lambda p: p.leaves))
    if o.late:
        out.append(("that appears later", lambda p: p.late))
        out.append(("that shows up in the middle of the video", lambda p: p.late))
    return out


def make_expressions(scene: SceneSpec, rng: np.random.Generator, motion_prob: float = 0.25,
                     allow_plural: bool = True) -> list[ExpressionSpec]:
    """Expressions whose target set is unique in the scene (checked by predicate over all objects).

    Mostly appearance ("the red circle", "the red object", "the star"); per object a motion expression
    with probability ``motion_prob``; plural ("the two squares") for shared shapes/colours.
    """
    objs = scene.objects
    still = scene.num_frames == 1
    out: list[ExpressionSpec] = []

    def matches(pred) -> list[int]:
        return [p.obj_id for p in objs if pred(p)]

    for o in [objs[int(k)] for k in rng.permutation(len(objs))]:
        cands: list[tuple[float, str]] = []
        c, s = o.color, o.shape
        for t in (f"the {c} {s}", f"{c} {s}", f"the {s} that is {c}"):
            cands.append((1.0, t))
        if matches(lambda p: p.color == c) == [o.obj_id]:
            for t in (f"the {c} object", f"the {c} shape", f"the {c} one"):
                cands.append((1.0, t))
        if matches(lambda p: p.shape == s) == [o.obj_id]:
            for t in (f"the {s}", f"the only {s}"):
                cands.append((0.4, t))
        wts = np.array([x[0] for x in cands])
        out.append(ExpressionSpec(cands[int(rng.choice(len(cands), p=wts / wts.sum()))][1], [o.obj_id], "appearance"))
        if still or rng.random() >= motion_prob:
            continue
        phrases = [ph for ph, pred in _motion_phrases(o) if matches(pred) == [o.obj_id]]
        if phrases:
            ph = phrases[int(rng.integers(len(phrases)))]
            noun = "object" if rng.random() < 0.5 else "shape"
            # Mostly qualified by appearance ("the red circle moving up"), sometimes motion only.
            text = f"the {c} {s} {ph}" if rng.random() < 0.6 else f"the {noun} {ph}"
            out.append(ExpressionSpec(text, [o.obj_id], "motion"))
    if allow_plural:
        groups = []
        for s in SHAPES:
            ids = matches(lambda p, s=s: p.shape == s)
            if len(ids) >= 2:
                groups.append((f"the {COUNT_WORDS[len(ids)]} {PLURAL[s]}", ids))
        for c in COLORS:
            ids = matches(lambda p, c=c: p.color == c)
            if len(ids) >= 2:
                groups.append((f"the {COUNT_WORDS[len(ids)]} {c} objects", ids))
        for text, ids in groups:
            if rng.random() < 0.4:
                out.append(ExpressionSpec(text, sorted(ids), "plural"))
    seen, uniq = set(), []
    for e in out:
        if e.text not in seen:
            seen.add(e.text)
            uniq.append(e)
    order = rng.permutation(len(uniq))
    return [uniq[int(k)] for k in order]


# ==================================================================================================
# Q-frame emulation
# ==================================================================================================
def qframe_indices(visible: Sequence[bool], rng: np.random.Generator, num_samples: int = 100) -> list[int]:
    """Deterministic stand-in for query-aware selection: favour frames where the target is visible.
    L <= num_samples: every frame once, the rest drawn with replacement (weights 4:1); L > num_samples:
    Gumbel top-k without replacement (as Q-Frame does). Sorted ascending."""
    vis = np.asarray(visible, dtype=bool)
    n = len(vis)
    wts = np.where(vis, 4.0, 1.0) if vis.any() else np.ones(n)
    if n <= num_samples:
        extra = rng.choice(n, size=num_samples - n, replace=True, p=wts / wts.sum())
        return sorted(list(range(n)) + [int(i) for i in extra])
    keys = np.log(wts) + rng.gumbel(size=n)
    return sorted(int(i) for i in np.argsort(-keys, kind="stable")[:num_samples])


# ==================================================================================================
# writers
# ==================================================================================================
def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """Deterministic JPEG bytes (4:4:4 chroma keeps the colours of small shapes crisp)."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [
        cv2.IMWRITE_JPEG_QUALITY, int(quality),
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
    ])
    if not ok:
        raise DataError("cv2.imencode failed to encode a JPEG")
    return buf.tobytes()


def write_frames(folder: str, names: Sequence[str], frames: Sequence[np.ndarray], quality: int) -> None:
    """Write <folder>/<name>.jpg atomically and drop stale .jpg files of an earlier, longer run."""
    os.makedirs(folder, exist_ok=True)
    keep = {n + ".jpg" for n in names}
    for f in os.listdir(folder):
        if f.endswith(".jpg") and f not in keep:
            os.remove(os.path.join(folder, f))
    for n, fr in zip(names, frames):
        atomic_write_bytes(os.path.join(folder, n + ".jpg"), encode_jpeg(fr, quality))


def _write_json(path: str, obj) -> None:
    atomic_write_json(path, obj, separators=(",", ":"))


def _write_mp4(path: str, frames: Sequence[np.ndarray], fps: float = 24.0) -> None:
    """mp4v via OpenCV into a temp file in the same folder, then os.replace (atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, ".tmp_" + os.path.basename(path))
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise DataError(f"{path}: OpenCV cannot open an mp4v writer")
    try:
        for fr in frames:
            writer.write(np.ascontiguousarray(fr[:, :, ::-1]))
    finally:
        writer.release()
    os.replace(tmp, path)


def _progress(it, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, leave=False)


@dataclass
class _RenderedVideo:
    scene: SceneSpec
    frames: list[np.ndarray]
    masks: list[list[np.ndarray]]
    expressions: list[ExpressionSpec]


def _render_split(seed: int, tag: str, count: int, opts: SyntheticOptions, prefix: str,
                  lengths: Sequence[int | None] = (), allow_plural: bool = True) -> list[_RenderedVideo]:
    """Render ``count`` videos of a split plus one per extra fixed length."""
    plan: list[int | None] = [None] * count + list(lengths)
    out = []
    for i, length in enumerate(_progress(plan, f"render {tag}", opts.progress)):
        rng = _rng(seed, tag, i)
        scene = make_scene(rng, f"{prefix}{i:05d}", opts, num_frames=length)
        frames, masks = render_scene(scene)
        exps = make_expressions(scene, rng, opts.motion_expression_prob, allow_plural=allow_plural)
        out.append(_RenderedVideo(scene, frames, masks, exps))
    return out


def _frame_names(n: int, stride: int = 1) -> list[str]:
    return [f"{i * stride:05d}" for i in range(n)]


def _rle_list(masks: Sequence[np.ndarray]) -> list[dict | None]:
    """Per-frame RLE, null where the object is not visible (absent / out of frame / hidden)."""
    return [encode_mask(m) if m.any() else None for m in masks]


def _split_stats(videos: list[_RenderedVideo]) -> dict:
    if not videos:
        return {"videos": 0, "frames": 0, "expressions": 0}
    lens = [v.scene.num_frames for v in videos]
    exps = [len(v.expressions) for v in videos]
    kinds = {}
    for v in videos:
        for e in v.expressions:
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
    return {
        "videos": len(videos),
        "frames": int(sum(lens)),
        "frames_min": int(min(lens)),
        "frames_max": int(max(lens)),
        "expressions": int(sum(exps)),
        "expressions_per_video_min": int(min(exps)),
        "expressions_per_video_max": int(max(exps)),
        "expression_kinds": dict(sorted(kinds.items())),
        "sizes": sorted({f"{v.scene.width}x{v.scene.height}" for v in videos}),
    }


def write_mevis_split(root: str, split: str, videos: list[_RenderedVideo], opts: SyntheticOptions,
                      with_masks: bool, with_ids: bool) -> None:
    """mevis/<split>/JPEGImages, meta_expressions.json, mask_dict.json (train/valid_u)."""
    base = os.path.join(root, "mevis", split)
    meta: dict = {"videos": {}}
    mask_dict: dict = {}
    anno = 0
    for v in _progress(videos, f"write mevis/{split}", opts.progress):
        vid = v.scene.name
        names = _frame_names(v.scene.num_frames)
        write_frames(os.path.join(base, "JPEGImages", vid), names, v.frames, opts.jpeg_quality)
        anno_of = {}
        for o, m in zip(v.scene.objects, v.masks):
            anno_of[o.obj_id] = anno
            mask_dict[str(anno)] = _rle_list(m)
            anno += 1
        exps = {}
        for k, e in enumerate(v.expressions):
            entry: dict = {"exp": e.text}
            if with_ids:
                entry["obj_id"] = list(e.obj_ids)
                entry["anno_id"] = [anno_of[i] for i in e.obj_ids]
            exps[str(k)] = entry
        meta["videos"][vid] = {"frames": names, "expressions": exps}
    _write_json(os.path.join(base, "meta_expressions.json"), meta)
    if with_masks:
        _write_json(os.path.join(base, "mask_dict.json"), mask_dict)


def write_qframe_split(root: str, split: str, videos: list[_RenderedVideo], seed: int) -> None:
    """mevis_q_frame/<split>/selected_frames.json with 100 sorted indices per expression."""
    out = {}
    for vi, v in enumerate(videos):
        sel = {}
        for k, e in enumerate(v.expressions):
            vis = [any(v.masks[i][t].any() for i in e.obj_ids) for t in range(v.scene.num_frames)]
            sel[str(k)] = qframe_indices(vis, _rng(seed, f"qframe/{split}", vi * 1000 + k))
        out[v.scene.name] = {"selected_frames": sel}
    _write_json(os.path.join(root, "mevis_q_frame", split, "selected_frames.json"), out)


def write_revos(root: str, videos: list[_RenderedVideo], opts: SyntheticOptions) -> None:
    """revos/JPEGImages/<sub/path>/..., meta_expressions_train_.json (str anno ids, type_id), mask_dict.json."""
    base = os.path.join(root, "revos")
    meta: dict = {"videos": {}}
    mask_dict: dict = {}
    anno = 0
    for v in _progress(videos, "write revos", opts.progress):
        vid = v.scene.name
        names = _frame_names(v.scene.num_frames)
        write_frames(os.path.join(base, "JPEGImages", vid), names, v.frames, opts.jpeg_quality)
        anno_of = {}
        for o, m in zip(v.scene.objects, v.masks):
            anno_of[o.obj_id] = f"{anno}"
            mask_dict[f"{anno}"] = _rle_list(m)
            anno += 1
        exps = {str(k): {"exp": e.text, "obj_id": list(e.obj_ids), "anno_id": [anno_of[i] for i in e.obj_ids],
                         "type_id": 0 if e.kind != "motion" else 1}
                for k, e in enumerate(v.expressions)}
        meta["videos"][vid] = {"vid_id": vid, "frames": names, "expressions": exps}
    _write_json(os.path.join(base, "meta_expressions_train_.json"), meta)
    _write_json(os.path.join(base, "mask_dict.json"), mask_dict)


def write_rvos(root: str, videos: list[_RenderedVideo], opts: SyntheticOptions) -> None:
    """Ref-YouTube-VOS: stems step 5 (like the real 'every 5th frame'), obj_id as 1-based str, no anno_id;
    mask_dict.pkl keyed by the global running expression counter (exp ids sorted as strings)."""
    base = os.path.join(root, "rvos")
    meta: dict = {"videos": {}}
    per_video_exps = []
    for v in _progress(videos, "write rvos", opts.progress):
        vid = v.scene.name
        names = _frame_names(v.scene.num_frames, stride=5)
        write_frames(os.path.join(base, "train", "JPEGImages", vid), names, v.frames, opts.jpeg_quality)
        exps = {str(k): {"exp": e.text, "obj_id": str(e.obj_ids[0] + 1)} for k, e in enumerate(v.expressions)}
        meta["videos"][vid] = {"frames": names, "expressions": exps}
        per_video_exps.append(exps)
    mask_dict = {}
    counter = 0
    for v, exps in zip(videos, per_video_exps):
        for exp_id in sorted(exps):
            obj = int(exps[exp_id]["obj_id"]) - 1
            mask_dict[str(counter)] = _rle_list(v.masks[obj])
            counter += 1
    _write_json(os.path.join(base, "meta_expressions", "train", "meta_expressions.json"), meta)
    atomic_write_bytes(os.path.join(base, "mask_dict.pkl"), pickle.dumps(mask_dict, protocol=4))


def write_refsav(root: str, seed: int, opts: SyntheticOptions) -> dict:
    """sam_v_full/<vid>.mp4 (24 fps), sam_v_full/annotations/<vid>_manual.json (masklet on every 4th
    frame) and Ref-SAV.json; paths in Ref-SAV.json are relative to sam_v_full/."""
    vroot = os.path.join(root, "sam_v_full")
    index = {}
    frames_total = 0
    exps_total = 0
    for i in _progress(range(opts.num_sav_videos), "write refsav", opts.progress):
        rng = _rng(seed, "refsav", i)
        kept = int(rng.integers(opts.min_frames, opts.max_frames + 1))
        full = 4 * kept - int(rng.integers(0, 4))  # any length with ceil(full / 4) == kept
        scene = make_scene(rng, f"sav_{i:06d}", opts, num_frames=full)
        frames, masks = render_scene(scene)
        exps = make_expressions(scene, rng, opts.motion_expression_prob, allow_plural=False)
        vid = scene.name
        _write_mp4(os.path.join(vroot, vid + ".mp4"), frames, fps=24.0)
        keep_t = list(range(0, full, 4))
        masklet = [[encode_mask(masks[k][t]) for k in range(len(scene.objects))] for t in keep_t]
        anno = {
            "video_id": vid,
            "video_duration": full / 24.0,
            "video_frame_count": full,
            "video_height": scene.height,
            "video_width": scene.width,
            "masklet_id": list(range(len(scene.objects))),
            "masklet_num": len(scene.objects),
            "masklet_first_appeared_frame": [
                next((t for t in keep_t if masks[k][t].any()), -1) for k in range(len(scene.objects))
            ],
            "masklet": masklet,
        }
        _write_json(os.path.join(vroot, "annotations", f"{vid}_manual.json"), anno)
        objects = {}
        for e in exps:  # one expression per object (the first drawn for it)
            key = str(e.obj_ids[0])
            if key not in objects:
                objects[key] = {"formated": e.text}
        index[vid] = {"video_path": f"{vid}.mp4", "anno_path": f"annotations/{vid}_manual.json",
                      "objects": dict(sorted(objects.items(), key=lambda kv: int(kv[0])))}
        frames_total += len(keep_t)
        exps_total += len(objects)
    if opts.num_sav_videos:
        _write_json(os.path.join(root, "Ref-SAV.json"), index)
    return {"videos": opts.num_sav_videos, "kept_frames": frames_total, "expressions": exps_total}


REFCOCO_SETS = (("refcoco", "refs(unc).p"), ("refcoco+", "refs(unc).p"), ("refcocog", "refs(umd).p"))


def _location_words(objs: list[ObjectSpec], o: ObjectSpec) -> list[str]:
    xs = sorted(p.start[0] for p in objs)
    out = []
    if o.start[0] == xs[0]:
        out.append("leftmost")
    if o.start[0] == xs[-1]:
        out.append("rightmost")
    return out


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts (column-major runs, starting with a background run)."""
    flat = mask.reshape(-1, order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0] + runs
    return [int(r) for r in runs]


def write_refcoco(root: str, seed: int, opts: SyntheticOptions) -> dict:
    """ref_seg/{refcoco,refcoco+,refcocog}: one set of still images of the same world; instances.json
    (polygons, every 4th annotation as RLE: compressed str or uncompressed list/iscrowd), refs pickles.
    The rendered pixels come from the pycocotools rasterisation of the stored polygon, so annotation
    and image agree exactly."""
    from pycocotools import mask as mask_utils

    images, annotations, jpegs = [], [], []
    refs_by_set: dict[str, list] = {name: [] for name, _ in REFCOCO_SETS}
    ann_id, ref_id, sent_id = 1, 0, 0
    for i in _progress(range(opts.num_images), "render refcoco", opts.progress):
        rng = _rng(seed, "refcoco", i)
        scene = make_scene(rng, f"img{i}", opts, still=True)
        h, w = scene.height, scene.width
        img = _background(scene).copy()
        image_id = i + 1
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        split = str(rng.choice(["train", "val", "testA"], p=[0.8, 0.1, 0.1]))
        ann_of = {}
        occluded = np.zeros((h, w), dtype=bool)
        painted = []
        for o in scene.objects:
            poly = shape_polygon(o.shape, o.start[0], o.start[1], o.size, o.rotation)
            poly[:, 0] = np.clip(poly[:, 0], 0, w)
            poly[:, 1] = np.clip(poly[:, 1], 0, h)
            flat = [round(float(x), 2) for x in poly.reshape(-1)]
            m = mask_utils.decode(mask_utils.frPyObjects([flat], h, w))[:, :, 0].astype(bool)
            painted.append((o, flat, m))
        # Visible masks front to back; objects are placed without overlap so polygons stay exact.
        for o, flat, m in reversed(painted):
            vis = m & ~occluded
            occluded |= m
            ann_of[o.obj_id] = (flat, vis)
        painted_full = {o.obj_id: m for o, flat, m in painted}
        for o, flat, m in painted:
            img[m] = o.rgb
        jpegs.append((file_name, encode_jpeg(img, opts.jpeg_quality)))
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        exps = make_expressions(scene, rng, 0.0, allow_plural=False)
        for o in scene.objects:
            flat, vis = ann_of[o.obj_id]
            ys, xs = np.nonzero(vis)
            bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)] if len(xs) else [0.0, 0.0, 0.0, 0.0]
            ann = {"id": ann_id, "image_id": image_id, "category_id": SHAPES.index(o.shape) + 1,
                   "area": int(vis.sum()), "bbox": bbox, "iscrowd": 0}
            exact_polygon = bool(np.array_equal(vis, painted_full[o.obj_id]))
            if ann_id % 4 == 0 or not exact_polygon:
                # RLE for some annotations, and always when the polygon would include occluded pixels.
                if ann_id % 8 == 0:  # uncompressed RLE, as COCO writes crowd regions
                    ann["segmentation"] = {"size": [h, w], "counts": _uncompressed_counts(vis)}
                    ann["iscrowd"] = 1
                else:
                    ann["segmentation"] = encode_mask(vis)
            else:
                ann["segmentation"] = [flat]
            annotations.append(ann)
            own = [e.text for e in exps if e.obj_ids == [o.obj_id]]
            c, s = o.color, o.shape
            loc = _location_words(scene.objects, o)
            texts = {
                "refcoco": own + [f"{lw} {s}" for lw in loc][:1],
                "refcoco+": own + [f"{c} {s}"],
                "refcocog": [f"a {c} {s} in the picture", f"the {c} {s} among the shapes."],
            }
            for name, _ in REFCOCO_SETS:
                sents = []
                for t in texts[name]:
                    sents.append({"raw": t.capitalize() if name == "refcocog" else t, "sent": t.lower().rstrip("."),
                                  "tokens": t.lower().rstrip(".").split(), "sent_id": sent_id})
                    sent_id += 1
                refs_by_set[name].append({
                    "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                    "sentences": sents, "sent_ids": [s_["sent_id"] for s_ in sents],
                    "category_id": SHAPES.index(o.shape) + 1, "file_name": file_name,
                })
                ref_id += 1
            ann_id += 1
    instances = {
        "info": {"description": "SaSaSa2VA synthetic shapes"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)],
    }
    for name, refs_name in REFCOCO_SETS:
        base = os.path.join(root, "ref_seg", name)
        _write_json(os.path.join(base, "instances.json"), instances)
        atomic_write_bytes(os.path.join(base, refs_name), pickle.dumps(refs_by_set[name], protocol=2))
        for fn, data in jpegs:
            atomic_write_bytes(os.path.join(base, "coco2014", "train2014", fn), data)
    n_train = sum(1 for r in refs_by_set["refcoco"] if r["split"] == "train")
    return {"images": len(images), "annotations": len(annotations), "refs_per_set": len(refs_by_set["refcoco"]),
            "train_refs_per_set": n_train}


# ==================================================================================================
# entry point
# ==================================================================================================
def synthetic_options(**options) -> SyntheticOptions:
    """Validated SyntheticOptions from keyword options (sizes / formats also as "WxH,..." / "a,b" strings)."""
    names = {f.name for f in fields(SyntheticOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"generate_all: unknown options {unknown}; known: {sorted(names)}")
    if isinstance(options.get("sizes"), str):
        options["sizes"] = parse_sizes(options["sizes"])
    if isinstance(options.get("formats"), str):
        options["formats"] = tuple(f.strip() for f in options["formats"].split(",") if f.strip())
    opts = SyntheticOptions(**options)
    opts.sizes = tuple((int(w), int(h)) for w, h in opts.sizes)
    opts.formats = tuple(opts.formats)
    opts.extra_lengths = tuple(int(n) for n in opts.extra_lengths)
    opts.validate()
    return opts


def check_seed(seed: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def generate_all(root: str, seed: int = 0, **options) -> dict:
    """Generate every requested layout under ``root`` from one seeded world; returns a summary dict
    (also written, deterministically, to <root>/synthetic_info.json)."""
    opts = synthetic_options(**options)
    check_seed(seed)
    os.makedirs(root, exist_ok=True)
    fmts = set(opts.formats)
    summary: dict = {"seed": seed, "formats": list(opts.formats)}

    if fmts & {"mevis", "qframe"}:
        counts = {"train": opts.num_train_videos, "valid_u": opts.num_valid_u_videos, "valid": opts.num_valid_videos}
        prefix = {"train": "mvtrain_", "valid_u": "mvvalu_", "valid": "mvval_"}
        summary["mevis"] = {}
        sizes_px: list[float] = []
        size_fracs: list[float] = []
        for split in MEVIS_SPLITS:
            if "mevis" not in fmts and split == "train":
                continue
            extra = opts.extra_lengths if split != "train" else ()
            videos = _render_split(seed, f"mevis/{split}", counts[split], opts, prefix[split], extra)
            if "mevis" in fmts:
                write_mevis_split(root, split, videos, opts, with_masks=(split != "valid"),
                                  with_ids=(split != "valid"))
                summary["mevis"][split] = _split_stats(videos)
            if "qframe" in fmts and split != "train":
                write_qframe_split(root, split, videos, seed)
            sizes_px += [o.size for v in videos for o in v.scene.objects]
            size_fracs += [o.size / min(v.scene.width, v.scene.height) for v in videos for o in v.scene.objects]
            del videos
        if sizes_px:
            summary["object_size_px"] = [round(min(sizes_px), 1), round(max(sizes_px), 1)]
            summary["object_size_frac_of_short_side"] = [round(min(size_fracs), 3), round(max(size_fracs), 3)]
        if not summary["mevis"]:
            del summary["mevis"]
    if "revos" in fmts:
        videos = _render_split(seed, "revos", opts.num_revos_videos, opts, "synth/revos_")
        write_revos(root, videos, opts)
        summary["revos"] = _split_stats(videos)
        del videos
    if "rvos" in fmts:
        videos = _render_split(seed, "rvos", opts.num_rvos_videos, opts, "rvos_", allow_plural=False)
        write_rvos(root, videos, opts)
        summary["rvos"] = _split_stats(videos)
        del videos
    if "refsav" in fmts:
        summary["refsav"] = write_refsav(root, seed, opts)
    if "refcoco" in fmts:
        summary["refcoco"] = write_refcoco(root, seed, opts)
    info = {"generator": "projects.sasasa2va.datasets.synthetic", "options": _options_json(opts), "summary": summary}
    atomic_write_json(os.path.join(root, "synthetic_info.json"), info, indent=1)
    summary["root"] = os.path.abspath(root)
    return summary


# what generate_all writes at the top of its root; the record first, so that a removal cut short never leaves
# it describing half-removed data (auto_prepare would take that as complete)
GENERATED_ENTRIES = ("synthetic_info.json", "mevis", "mevis_q_frame", "revos", "rvos", "sam_v_full", "Ref-SAV.json",
                     "ref_seg")


def planned_info(seed: int, **options) -> dict:
    """The ``seed`` and ``options`` part synthetic_info.json would record for these arguments (ValueError
    for invalid options, as generate_all)."""
    check_seed(seed)
    return {"seed": seed, "options": _options_json(synthetic_options(**options))}


def _options_json(opts: SyntheticOptions) -> dict:
    d = asdict(opts)
    d.pop("progress", None)
    d["sizes"] = [f"{w}x{h}" for w, h in opts.sizes]
    d["formats"] = list(opts.formats)
    d["extra_lengths"] = list(opts.extra_lengths)
    return d
