"""Procedural person crops in the style of CAUCA: fall (1) versus non-fall (0).

Each image is an articulated figure in a pose from one of CAUCA's ten activities, drawn over
a cluttered room with random lighting, blur, noise and occlusion. Poses are sampled from
overlapping ranges (a deep bend to pick something up looks like the start of a forward fall;
sitting on the floor looks like kneeling or sitting on a low chair), so a CNN cannot reach
100% and the cost of compression stays visible.

Every image is drawn from its own random stream, seeded by (seed, split, index): a data set of
n images is a prefix of one of n + k images, and generation does not depend on batch order.
Subjects (body proportions, clothes) of the train and test splits are disjoint, standing in
for the lab's held-out test subjects.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fallopt.config import DatasetConfig, check_seed, require
from fallopt.data.dataset import Loaded, Split

# Bump when the drawing changes, so stale caches are never reused.
GENERATOR_VERSION = 2

ADL_ACTIVITIES = ("hop", "kneel", "pick_up_object", "sit_down", "walk")
FALL_ACTIVITIES = ("fall_backward", "fall_forward", "fall_left", "fall_right", "fall_sitting")
ACTIVITIES = ADL_ACTIVITIES + FALL_ACTIVITIES
CLASS_NAMES = ("no_fall", "fall")
SPLITS = {"train": 0, "test": 1}
SUBJECTS_PER_SPLIT = 12

_SUPERSAMPLE = 2


@dataclass(frozen=True)
class Subject:
    """Body proportions (fractions of standing height) and clothing of one person."""

    torso: float
    upper_arm: float
    forearm: float
    thigh: float
    shin: float
    head: float
    girth: float
    shirt: tuple[int, int, int]
    trousers: tuple[int, int, int]
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]


@dataclass(frozen=True)
class Pose:
    """Absolute limb angles in degrees (0 points up, 90 right, 180 down) and placement."""

    torso: float
    arms: tuple[tuple[float, float], tuple[float, float]]
    legs: tuple[tuple[float, float], tuple[float, float]]
    lift: float = 0.0  # height of the lowest point above the floor, in body heights
    chair: bool = False
    object_on_floor: bool = False


def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))  # type: ignore[return-value]


def make_subject(seed: int, split: int, subject: int) -> Subject:
    """Draw one subject's body and clothes; the same arguments always give the same subject."""
    rng = np.random.default_rng([seed, split, 1_000_000 + subject])
    skin_tone = rng.uniform(0.35, 1.0)
    skin = tuple(int(c * skin_tone) for c in (235, 190, 160))
    return Subject(
        torso=rng.uniform(0.28, 0.33),
        upper_arm=rng.uniform(0.15, 0.18),
        forearm=rng.uniform(0.14, 0.17),
        thigh=rng.uniform(0.22, 0.26),
        shin=rng.uniform(0.22, 0.26),
        head=rng.uniform(0.055, 0.07),
        girth=rng.uniform(1.2, 1.8),
        shirt=_colour(rng),
        trousers=_colour(rng, 0, 200),
        skin=skin,  # type: ignore[arg-type]
        hair=_colour(rng, 0, 120),
    )


def _pose(activity: str, rng: np.random.Generator) -> Pose:
    """Sample a pose for an activity, facing right; the caller mirrors half of them."""
    u, n = rng.uniform, rng.normal

    def arm(up: float, bend_lo: float = 0, bend_hi: float = 40) -> tuple[float, float]:
        return up, up + u(bend_lo, bend_hi)

    def leg(thigh: float, knee_lo: float = 0, knee_hi: float = 20) -> tuple[float, float]:
        return thigh, thigh - u(knee_lo, knee_hi)

    # A fall photographed early is a partial rotation: the source of falls that look like bends.
    progress = 1.0 if u() < 0.7 else u(0.35, 0.75)
    if activity == "walk":
        s = u(8, 30)
        return Pose(n(4, 4), (arm(180 + s), arm(180 - s)), (leg(180 - s), leg(180 + s, 0, 35)))
    if activity == "hop":
        return Pose(
            n(0, 7),
            (arm(u(60, 175)), arm(u(185, 300))),
            (leg(u(150, 190), 20, 70), leg(u(150, 190), 20, 70)),
            lift=u(0.03, 0.15),
        )
    if activity == "kneel":
        return Pose(
            n(5, 10),
            (arm(u(120, 200)), arm(u(150, 210))),
            ((180 + n(0, 10), 270 + n(0, 10)), (90 + n(0, 12), 180 + n(0, 10))),
        )
    if activity == "pick_up_object":
        bend = u(35, 105)
        return Pose(
            bend,
            (arm(u(150, 200), 0, 25), arm(u(150, 210), 0, 25)),
            (leg(180 + n(0, 8), 0, 40), leg(180 + n(0, 8), 0, 40)),
            object_on_floor=True,
        )
    if activity == "sit_down":
        thigh = u(85, 140)  # on the seat, or still lowering onto it
        return Pose(
            n(-5, 8) + (140 - thigh) * 0.6,
            (arm(u(150, 200)), arm(u(140, 200))),
            ((thigh, 180 + n(0, 12)), (thigh + n(0, 6), 180 + n(0, 12))),
            chair=u() < 0.75,
        )
    if activity == "fall_sitting":
        thigh = u(60, 100)
        knees_up = u() < 0.5
        shin = thigh + u(50, 100) if knees_up else thigh + n(0, 8)
        return Pose(
            -u(0, 35) * progress,
            (arm(u(185, 230), 0, 20), arm(u(180, 230), 0, 20)),
            ((thigh, shin), (thigh + n(0, 8), shin + n(0, 10))),
        )
    if activity == "fall_forward":
        t = u(60, 105) * progress
        return Pose(
            t,
            (arm(t + u(-40, 20), -20, 20), arm(t + u(-20, 40), -20, 20)),
            (leg(t + 180 + n(0, 10), 0, 30), leg(t + 180 + n(0, 10), 0, 50)),
        )
    if activity == "fall_backward":
        t = -u(55, 110) * progress
        return Pose(
            t,
            (arm(t + u(90, 180)), arm(t + u(120, 220))),
            (leg(u(40, 150), 0, 60), leg(u(60, 170), 0, 60)),
        )
    if activity in ("fall_left", "fall_right"):
        # Seen from the front: the body tips sideways, legs apart, arms flung out.
        t = u(50, 100) * progress * (1 if activity == "fall_right" else -1)
        side = math.copysign(1, t)
        return Pose(
            t,
            (arm(t + side * u(30, 100), -30, 30), arm(t - side * u(60, 150), -30, 30)),
            (leg(t + 180 + u(5, 30), 0, 30), leg(t + 180 - u(5, 30), 0, 30)),
        )
    raise ValueError(f"unknown activity {activity!r}; expected one of {ACTIVITIES}")


def _direction(angle: float) -> np.ndarray:
    a = math.radians(angle)
    return np.array([math.sin(a), -math.cos(a)])


def _skeleton(subject: Subject, pose: Pose, mirror: bool) -> dict[str, np.ndarray]:
    """Joint positions in body heights, image orientation (y grows downwards)."""
    sign = -1.0 if mirror else 1.0

    def d(angle: float) -> np.ndarray:
        v = _direction(angle)
        return np.array([v[0] * sign, v[1]])

    j: dict[str, np.ndarray] = {"pelvis": np.zeros(2)}
    j["neck"] = j["pelvis"] + d(pose.torso) * subject.torso
    j["head"] = j["neck"] + d(pose.torso) * (subject.head * 1.3)
    for i, (upper, lower) in enumerate(pose.arms):
        j[f"elbow{i}"] = j["neck"] + d(upper) * subject.upper_arm
        j[f"hand{i}"] = j[f"elbow{i}"] + d(lower) * subject.forearm
    for i, (thigh, shin) in enumerate(pose.legs):
        j[f"knee{i}"] = j["pelvis"] + d(thigh) * subject.thigh
        j[f"foot{i}"] = j[f"knee{i}"] + d(shin) * subject.shin
    return j


def _muted(rng: np.random.Generator, base: tuple[int, int, int]) -> tuple[int, int, int]:
    """A furniture colour: a random colour pulled halfway towards the wall's."""
    return tuple(int((c + b) / 2) for c, b in zip(_colour(rng), base, strict=True))  # type: ignore[return-value]


def _box(draw: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float, fill) -> None:
    draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=fill)


def _background(rng: np.random.Generator, size: int, floor_y: float) -> Image.Image:
    wall, floor = _colour(rng, 40, 240), _colour(rng, 20, 200)
    img = Image.new("RGB", (size, size), wall)
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, min(floor_y, size), size, size], fill=floor)
    for _ in range(rng.integers(1, 5)):  # furniture, doors, pictures
        x0, y0 = rng.uniform(-0.2, 1.0, size=2) * size
        w, h = rng.uniform(0.08, 0.5, size=2) * size
        shape = draw.rectangle if rng.uniform() < 0.7 else draw.ellipse
        shape([x0, y0, x0 + w, y0 + h], fill=_muted(rng, wall))
    for _ in range(rng.integers(0, 3)):  # cables, edges, shadows
        pts = (rng.uniform(0, 1, size=4) * size).tolist()
        draw.line(pts, fill=_muted(rng, wall), width=int(rng.integers(1, 3) * _SUPERSAMPLE))
    return img


def _draw_figure(
    draw: ImageDraw.ImageDraw,
    subject: Subject,
    pose: Pose,
    joints: dict[str, np.ndarray],
    to_px: float,
    origin: np.ndarray,
) -> None:
    def p(name: str) -> tuple[float, float]:
        x, y = joints[name] * to_px + origin
        return float(x), float(y)

    def limb(a: str, b: str, width: float, colour: tuple[int, int, int]) -> None:
        w = max(1, int(width * subject.girth * to_px))
        draw.line([p(a), p(b)], fill=colour, width=w)
        for end in (a, b):  # round joints
            x, y = p(end)
            draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=colour)

    # Far limbs first, so the body covers them.
    limb("pelvis", "knee1", 0.065, subject.trousers)
    limb("knee1", "foot1", 0.05, subject.trousers)
    limb("neck", "elbow1", 0.045, subject.shirt)
    limb("elbow1", "hand1", 0.038, subject.skin)
    limb("pelvis", "neck", 0.12, subject.shirt)
    limb("pelvis", "knee0", 0.065, subject.trousers)
    limb("knee0", "foot0", 0.05, subject.trousers)
    limb("neck", "elbow0", 0.045, subject.shirt)
    limb("elbow0", "hand0", 0.038, subject.skin)
    hx, hy = p("head")
    r = subject.head * to_px
    draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=subject.skin)
    draw.pieslice([hx - r, hy - r, hx + r, hy + r], 180, 360, fill=subject.hair)


def render(activity: str, subject: Subject, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """Draw one crop of a subject doing an activity, as a uint8 (size, size, 3) array."""
    pose = _pose(activity, rng)
    mirror = bool(rng.uniform() < 0.5)
    joints = _skeleton(subject, pose, mirror)
    pts = np.stack(list(joints.values()))
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    extent = float(max(hi - lo)) + 2 * subject.head

    big = size * _SUPERSAMPLE
    # A person detector's crop: the figure fills most of it, not always centred.
    to_px = big * rng.uniform(0.55, 0.95) / extent
    centre = (lo + hi) / 2 * to_px
    origin = big / 2 - centre + rng.normal(0, 0.07, size=2) * big
    floor_y = float((hi[1] + pose.lift + 0.01) * to_px + origin[1])

    img = _background(rng, big, floor_y)
    draw = ImageDraw.Draw(img)
    if pose.chair:
        seat = joints["pelvis"] * to_px + origin
        w = 0.28 * to_px
        colour = _colour(rng, 30, 200)
        x0 = seat[0] - w / 2
        _box(draw, x0, seat[1] + 0.02 * to_px, x0 + w, seat[1] + 0.06 * to_px, colour)
        _box(draw, x0, seat[1], x0 + 0.04 * to_px, floor_y, colour)
        _box(draw, x0 + w - 0.04 * to_px, seat[1], x0 + w, floor_y, colour)
    if pose.object_on_floor:
        hand = joints["hand0"] * to_px + origin
        s = rng.uniform(0.04, 0.1) * to_px
        _box(draw, hand[0] - s, floor_y - s, hand[0] + s, floor_y, _colour(rng))
    _draw_figure(draw, subject, pose, joints, to_px, origin)
    if rng.uniform() < 0.2:  # something between camera and person
        x0, y0 = rng.uniform(-0.1, 0.9, size=2) * big
        w, h = rng.uniform(0.1, 0.35, size=2) * big
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=_colour(rng))

    img = img.resize((size, size), Image.Resampling.LANCZOS)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 1.2))))
    arr = np.asarray(img, dtype=np.float32)
    # Lighting: overall exposure, a colour cast and a gradient from a window or lamp.
    gradient = np.linspace(rng.uniform(0.6, 1.0), rng.uniform(1.0, 1.4), size, dtype=np.float32)
    gradient = gradient[None, :, None] if rng.uniform() < 0.5 else gradient[:, None, None]
    arr *= rng.uniform(0.55, 1.25) * rng.uniform(0.85, 1.15, size=3) * gradient
    arr += rng.normal(0, rng.uniform(2, 14), size=arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def generate(
    n: int, seed: int = 0, split: str = "train", size: int = 96, channels: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate n crops; returns (images uint8 (n, size, size, channels), labels, activities).

    Activities cycle through all ten, so every prefix is balanced between the classes.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    split_id = SPLITS[split]
    subjects = [make_subject(seed, split_id, s) for s in range(SUBJECTS_PER_SPLIT)]
    images = np.empty((n, size, size, channels), dtype=np.uint8)
    activities = np.arange(n, dtype=np.int64) % len(ACTIVITIES)
    for i in range(n):
        rng = np.random.default_rng([seed, split_id, i])
        subject = subjects[int(rng.integers(SUBJECTS_PER_SPLIT))]
        rgb = render(ACTIVITIES[activities[i]], subject, rng, size)
        if channels == 1:
            rgb = np.asarray(Image.fromarray(rgb).convert("L"))[..., None]
        images[i] = rgb
    labels = (activities >= len(ADL_ACTIVITIES)).astype(np.int64)
    return images, labels, activities


def cache_path(cache_dir: Path, n: int, seed: int, split: str, size: int, channels: int) -> Path:
    """Where the set of these parameters is cached; the name changes with the generator."""
    key = f"v{GENERATOR_VERSION}-{split}-seed{seed}-{size}x{size}x{channels}-n{n}"
    return cache_dir / f"synthetic_falls-{key}.npz"


def _digest(images: np.ndarray, labels: np.ndarray) -> str:
    return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()


def load_or_generate(
    cache_dir: Path, n: int, seed: int, split: str, size: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return the cached set for these parameters, generating (and caching) it if needed.

    A cache file that is truncated or whose checksum does not match is regenerated.
    """
    path = cache_path(cache_dir, n, seed, split, size, channels)
    if path.exists():
        try:
            with np.load(path) as f:
                images, labels, digest = f["images"], f["labels"], str(f["sha256"])
            if _digest(images, labels) == digest:
                return images, labels
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # corrupt or truncated: rebuilt below
    images, labels, _ = generate(n, seed, split, size, channels)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, images=images, labels=labels, sha256=_digest(images, labels))
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return images, labels


@dataclass
class SyntheticFallsConfig(DatasetConfig):
    """Generated CAUCA-style crops; `seed` fixes the images, independent of the training seed."""

    name: str = "synthetic_falls"
    image_size: int = 96
    channels: int = 3
    n_train: int = 2000
    n_test: int = 500
    seed: int = 0
    cache_dir: str | None = None  # default: $FALLOPT_CACHE or ~/.cache/fallopt

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seed("dataset.seed", self.seed)
        require(self.image_size >= 8, "dataset.image_size", self.image_size, "must be >= 8")
        require(self.channels in (1, 3), "dataset.channels", self.channels, "must be 1 or 3")
        for key in ("n_train", "n_test"):
            n = getattr(self, key)
            require(n >= 10, f"dataset.{key}", n, "must be >= 10 (one image per activity)")

    def ignored(self) -> set[str]:
        """Where the images are cached does not change them."""
        return {"cache_dir"}

    def sources(self) -> dict[str, str]:
        """The generator's version: a new drawing makes new images."""
        return {"generator": str(GENERATOR_VERSION)}


SCHEMA = SyntheticFallsConfig


def load(cfg: SyntheticFallsConfig) -> Loaded:
    """The train pool and the test set of disjoint subjects, generated once and cached."""
    from fallopt.data import default_cache_dir

    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    sets = []
    for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        n = min(n, cfg.limit or n)  # every prefix is balanced: generate only what is used
        if not cache_path(cache, n, cfg.seed, split, cfg.image_size, cfg.channels).exists():
            logging.getLogger(__name__).info(
                "[data] generating %d synthetic_falls %s images (cached in %s)", n, split, cache
            )
        x, y = load_or_generate(cache, n, cfg.seed, split, cfg.image_size, cfg.channels)
        sets.append(Split(x, y))
    origin = f"fallopt synthetic_falls generator v{GENERATOR_VERSION}, seed {cfg.seed}"
    return Loaded(CLASS_NAMES, sets[0], sets[1], origin=origin)
