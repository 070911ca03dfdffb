"""The shapes world: a procedural data set of coloured shapes with exact captions, and its scorer.

The contract is `shared/specs/shapes-world.md`. In short: one or two circles, squares or
triangles in palette colours on a flat palette background, captioned by a small fixed grammar,
drawn anti-aliased at 256 x 256 (and area-downsampled to 64 x 64 for the base stage).

Splits (every scene belongs to exactly one of the first three):
- "heldout": captions naming at least one held-out colour-shape pair (purple triangle,
  orange square, green circle). Measures composition of words seen only in other pairs.
- "unseen": captions without held-out pairs that training never sees either: a fixed 1/32 of
  all captions, chosen by a stable hash of the caption text. Measures generalisation to new
  combinations of seen pairs, sizes, positions and backgrounds.
- "train": everything else.
- "all": any scene.

Everything is deterministic: `example(seed, index)` draws example `index` of the stream for
`seed` without drawing the ones before it, so data loaders can shard by index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 256       # ground-truth side, pixels
BASE_SIDE = 64     # side of the base stage's images
SUPERSAMPLE = 4    # drawn at 4x and box-downsampled, for anti-aliased edges

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
SIZE_FRACTION = {"small": 0.22, "large": 0.42}   # bounding-box side / canvas side
SIZE_JITTER = 0.08                               # of the object's own size
POSITION_JITTER = 0.04                           # of the canvas side
MARGIN = 0.02                                    # of the canvas side
LARGE_THRESHOLD = 0.32                           # scorer: bbox side over this share is "large"
MIN_REGION_SHARE = 0.01                          # scorer: smaller regions are noise

# One-object position phrases and their grid cell (column, row).
POSITIONS: dict[str, tuple[int, int]] = {
    "in the center": (1, 1),
    "on the left": (0, 1),
    "on the right": (2, 1),
    "at the top": (1, 0),
    "at the bottom": (1, 2),
    "in the top left corner": (0, 0),
    "in the top right corner": (2, 0),
    "in the bottom left corner": (0, 2),
    "in the bottom right corner": (2, 2),
}
# Two-object layouts: the cells of the first- and second-named object.
LAYOUT_CELLS = {"side_by_side": ((0, 1), (2, 1)), "stacked": ((1, 0), (1, 2))}
LAYOUTS = ("single", "side_by_side", "stacked")

HELDOUT_PAIRS = frozenset({("purple", "triangle"), ("orange", "square"), ("green", "circle")})
UNSEEN_BUCKETS = 32        # 1 caption in 32 (without held-out pairs) is never trained on
TWO_OBJECT_SHARE = 0.5     # share of scenes with two objects
SPLITS = ("train", "unseen", "heldout", "all")
ATTRIBUTES = ("background", "count", "color", "shape", "size", "position")

# Fill of the bounding box: square 1.0, circle pi/4, triangle 1/2; decide at the midpoints.
_FILL_TRIANGLE_BELOW = (0.5 + np.pi / 4) / 2
_FILL_CIRCLE_BELOW = (np.pi / 4 + 1.0) / 2


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object: what the caption says, and where it was drawn (bbox, None until placed).

    `cell` is the grid cell (column, row); `bbox` is (x0, y0, x1, y1) in pixels of the
    256 x 256 canvas, x1 / y1 exclusive.
    """

    color: str
    shape: str
    size: str
    cell: tuple[int, int]
    bbox: tuple[float, float, float, float] | None = None

    @property
    def words(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """A background and one or two objects; the caption follows from it."""

    background: str
    objects: tuple[ShapeObject, ...]
    layout: str  # "single", "side_by_side" or "stacked"

    @property
    def caption(self) -> str:
        tail = f"on a {self.background} background"
        if self.layout == "single":
            (obj,) = self.objects
            return f"{obj.words} {_phrase_of_cell(obj.cell)} {tail}"
        first, second = self.objects
        if self.layout == "side_by_side":
            return f"{first.words} on the left and {second.words} on the right {tail}"
        return f"{first.words} above {second.words} {tail}"

    @property
    def heldout(self) -> bool:
        return any((o.color, o.shape) in HELDOUT_PAIRS for o in self.objects)

    @property
    def split(self) -> str:
        """The split the scene belongs to: "train", "unseen" or "heldout"."""
        if self.heldout:
            return "heldout"
        return "unseen" if _caption_bucket(self.caption) == 0 else "train"

    @property
    def group(self) -> str:
        """The reporting group: "heldout", else "one_object" or "two_objects"."""
        if self.heldout:
            return "heldout"
        return "one_object" if len(self.objects) == 1 else "two_objects"

    def to_dict(self) -> dict:
        return {
            "background": self.background,
            "layout": self.layout,
            "objects": [dataclasses.asdict(o) for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objects = tuple(
            ShapeObject(o["color"], o["shape"], o["size"], tuple(o["cell"]),
                        None if o.get("bbox") is None else tuple(o["bbox"]))
            for o in d["objects"]
        )
        return cls(d["background"], objects, d["layout"])


@dataclasses.dataclass(frozen=True)
class Example:
    """One training / evaluation example."""

    index: int
    caption: str
    scene: Scene
    image256: np.ndarray  # uint8 (256, 256, 3)
    image64: np.ndarray   # uint8 (64, 64, 3), area-downsampled image256


def _phrase_of_cell(cell: tuple[int, int]) -> str:
    for phrase, c in POSITIONS.items():
        if c == tuple(cell):
            return phrase
    raise ValueError(f"cell {cell!r} is not a grid cell: use (column, row) with both in 0..2")


def _caption_bucket(caption: str) -> int:
    # sha256, not hash(): stable across processes and Python versions.
    digest = hashlib.sha256(caption.encode()).digest()
    return int.from_bytes(digest[:4], "little") % UNSEEN_BUCKETS


def in_split(scene: Scene, split: str) -> bool:
    _check_split(split)
    return split == "all" or scene.split == split


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown: use one of {', '.join(SPLITS)}")


# ---------------------------------------------------------------------------------------------
# Captions


_OBJ = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_BG = rf"on a ({'|'.join(COLORS)}) background"
_SINGLE = re.compile(rf"{_OBJ} ({'|'.join(POSITIONS)}) {_BG}")
_SIDE = re.compile(rf"{_OBJ} on the left and {_OBJ} on the right {_BG}")
_STACKED = re.compile(rf"{_OBJ} above {_OBJ} {_BG}")
_GRAMMAR = (
    "'a {size} {color} {shape} {position} on a {background} background', "
    "'a {size} {color} {shape} on the left and a {size} {color} {shape} on the right on a "
    "{background} background' or 'a {size} {color} {shape} above a {size} {color} {shape} "
    "on a {background} background' (lower case, single spaces, no punctuation)"
)


def parse_caption(caption: str) -> Scene:
    """The scene a caption names (objects without bbox). Raises ValueError off the grammar."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    if m := _SINGLE.fullmatch(caption):
        size, color, shape, phrase, bg = m.groups()
        scene = Scene(bg, (ShapeObject(color, shape, size, POSITIONS[phrase]),), "single")
    elif m := _SIDE.fullmatch(caption):
        s1, c1, h1, s2, c2, h2, bg = m.groups()
        cells = LAYOUT_CELLS["side_by_side"]
        scene = Scene(bg, (ShapeObject(c1, h1, s1, cells[0]), ShapeObject(c2, h2, s2, cells[1])),
                      "side_by_side")
    elif m := _STACKED.fullmatch(caption):
        s1, c1, h1, s2, c2, h2, bg = m.groups()
        cells = LAYOUT_CELLS["stacked"]
        scene = Scene(bg, (ShapeObject(c1, h1, s1, cells[0]), ShapeObject(c2, h2, s2, cells[1])),
                      "stacked")
    else:
        raise ValueError(f"caption {caption!r} is not in the shapes-world grammar: write {_GRAMMAR}")
    for obj in scene.objects:
        if obj.color == scene.background:
            raise ValueError(
                f"caption {caption!r} puts a {obj.color} {obj.shape} on a {obj.color} background, "
                "which cannot be seen: give the object a colour other than the background's")
    return scene


def _sample_description(rng: np.random.Generator) -> Scene:
    """A scene as a caption describes it (no geometry), from the whole world."""
    background = COLORS[rng.integers(len(COLORS))]
    object_colors = [c for c in COLORS if c != background]

    def obj(size: str, cell: tuple[int, int]) -> ShapeObject:
        color = object_colors[rng.integers(len(object_colors))]
        return ShapeObject(color, SHAPES[rng.integers(len(SHAPES))], size, cell)

    if rng.random() >= TWO_OBJECT_SHARE:
        cell = list(POSITIONS.values())[rng.integers(len(POSITIONS))]
        return Scene(background, (obj(SIZES[rng.integers(2)], cell),), "single")
    layout = ("side_by_side", "stacked")[rng.integers(2)]
    sizes = (("small", "small"), ("small", "large"), ("large", "small"))[rng.integers(3)]
    cells = LAYOUT_CELLS[layout]
    return Scene(background, (obj(sizes[0], cells[0]), obj(sizes[1], cells[1])), layout)


def sample_description(rng: np.random.Generator, split: str = "train") -> Scene:
    """A caption-level scene (no geometry) of `split`, by rejection from the whole world."""
    _check_split(split)
    while True:
        scene = _sample_description(rng)
        if in_split(scene, split):
            return scene


def all_captions(split: str = "all") -> list[str]:
    """Every caption of `split`, in a fixed order (about 24,000 for "all")."""
    _check_split(split)
    objects = [(s, c, h) for s in SIZES for c in COLORS for h in SHAPES]
    scenes = []
    for bg in COLORS:
        visible = [o for o in objects if o[1] != bg]
        for (s, c, h), cell in itertools.product(visible, POSITIONS.values()):
            scenes.append(Scene(bg, (ShapeObject(c, h, s, cell),), "single"))
        for layout, cells in LAYOUT_CELLS.items():
            for (s1, c1, h1), (s2, c2, h2) in itertools.product(visible, visible):
                if s1 == s2 == "large":
                    continue
                scenes.append(Scene(bg, (ShapeObject(c1, h1, s1, cells[0]),
                                         ShapeObject(c2, h2, s2, cells[1])), layout))
    return [s.caption for s in scenes if in_split(s, split)]


# ---------------------------------------------------------------------------------------------
# Geometry and drawing


def place_objects(scene: Scene, rng: np.random.Generator) -> Scene:
    """Give every object a jittered size and position (its bbox), kept inside the margin."""
    placed = []
    margin = MARGIN * CANVAS
    for obj in scene.objects:
        side = SIZE_FRACTION[obj.size] * CANVAS * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
        centre = []
        for k in obj.cell:  # column -> x, row -> y
            c = (2 * k + 1) / 6 * CANVAS + rng.uniform(-POSITION_JITTER, POSITION_JITTER) * CANVAS
            centre.append(min(max(c, margin + side / 2), CANVAS - margin - side / 2))
        cx, cy = centre
        bbox = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        placed.append(dataclasses.replace(obj, bbox=tuple(float(v) for v in bbox)))
    return dataclasses.replace(scene, objects=tuple(placed))


def draw(scene: Scene) -> np.ndarray:
    """The scene at 256 x 256, uint8 RGB; every object needs its bbox (see place_objects)."""
    big = CANVAS * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    pen = ImageDraw.Draw(image)
    for obj in scene.objects:
        if obj.bbox is None:
            raise ValueError(f"object {obj.words} has no bbox: place it with place_objects first")
        # PIL's boxes include their last pixel, hence the -1 on the exclusive end.
        x0, y0, x1, y1 = (round(v * SUPERSAMPLE) for v in obj.bbox)
        colour = PALETTE[obj.color]
        if obj.shape == "square":
            pen.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        elif obj.shape == "circle":
            pen.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
        elif obj.shape == "triangle":
            pen.polygon(((x0 + x1 - 1) / 2, y0, x1 - 1, y1 - 1, x0, y1 - 1), fill=colour)
        else:
            raise ValueError(f"shape {obj.shape!r} is unknown: use one of {', '.join(SHAPES)}")
    return downsample(np.asarray(image), CANVAS)


def downsample(image: np.ndarray, side: int = BASE_SIDE) -> np.ndarray:
    """Exact area average of a square uint8 image to `side` (e.g. 256 -> 64 for the base stage).

    Integer sums rounded half up, not PIL's fixed-point box filter: the same bytes everywhere.
    """
    big = image.shape[0]
    if image.shape[:2] != (big, big) or big % side:
        raise ValueError(f"image of shape {image.shape} cannot be area-downsampled to {side} x {side}: "
                         f"give a square image whose side is a multiple of {side}")
    f = big // side
    dtype = np.uint16 if f * f * 255 < 2**16 else np.uint32
    # Rows first, then columns: two sums over contiguous runs are much faster than one
    # strided sum over both axes.
    rows = image.reshape(side, f, -1).sum(axis=1, dtype=dtype)
    sums = rows.reshape(side, side, f, -1).sum(axis=2, dtype=dtype)
    return ((sums + f * f // 2) // (f * f)).astype(np.uint8)


def example(seed: int, index: int, split: str = "train") -> Example:
    """Example `index` of the stream for `seed`: independent of every other index."""
    rng = np.random.default_rng([seed, index])
    scene = place_objects(sample_description(rng, split), rng)
    image256 = draw(scene)
    return Example(index, scene.caption, scene, image256, downsample(image256))


def examples(seed: int, split: str = "train", start: int = 0,
             stop: int | None = None) -> Iterator[Example]:
    """The stream of examples for `seed` from index `start` (endless when `stop` is None)."""
    _check_split(split)
    for index in itertools.count(start) if stop is None else range(start, stop):
        yield example(seed, index, split)


# ---------------------------------------------------------------------------------------------
# Scoring

_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)
_PALETTE_NORMS = (_PALETTE_ARRAY ** 2).sum(-1)


def _nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """Index into COLORS of the nearest palette colour for each (..., 3) value."""
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2, and |x|^2 is the same for every p. The dot product
    # is written per channel: with an inner size of 3 that beats a BLAS matmul by far.
    x = np.asarray(rgb, dtype=np.float32)
    flat = x.reshape(-1, 3)
    dot = sum(flat[:, c:c + 1] * _PALETTE_ARRAY[:, c] for c in range(3))
    return (_PALETTE_NORMS - 2 * dot).argmin(-1).reshape(x.shape[:-1])


def _to_canvas(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        got = (f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray)
               else type(image).__name__)
        raise ValueError(f"image must be a uint8 RGB array of shape (H, W, 3), got {got}: "
                         "convert it with np.asarray(pil_image.convert('RGB'))")
    if image.shape[:2] == (CANVAS, CANVAS):
        return image
    h, w = image.shape[:2]
    # Area averaging when shrinking, bilinear when growing.
    resample = Image.BOX if min(h, w) >= CANVAS else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize((CANVAS, CANVAS), resample))


def find_regions(image: np.ndarray) -> tuple[str, list[dict]]:
    """The background colour name and the regions found, largest first, at 256 x 256.

    Each region: color, shape, size, cell, centroid (x, y), bbox (x0, y0, x1, y1), fill, area.
    """
    from scipy import ndimage  # a dependency of jax

    image = _to_canvas(image)
    # The border: the outer 4-pixel ring, which the 2% margin keeps free of objects.
    border = np.concatenate([image[:4].reshape(-1, 3), image[-4:].reshape(-1, 3),
                             image[:, :4].reshape(-1, 3), image[:, -4:].reshape(-1, 3)])
    background = int(_nearest_colour(np.median(border, axis=0)))
    # A pixel belongs to an object when its nearest palette colour is not the background's:
    # anti-aliased edges then split at half coverage, which keeps areas and fills true.
    foreground = _nearest_colour(image) != background
    labels, n = ndimage.label(foreground, structure=np.ones((3, 3), bool))
    if n == 0:
        return COLORS[background], []
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    regions = []
    for label in np.flatnonzero(areas >= MIN_REGION_SHARE * CANVAS * CANVAS):
        if label == 0:
            continue
        ys, xs = np.nonzero(labels == label)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        fill = len(xs) / float((x1 - x0) * (y1 - y0))
        shape = ("triangle" if fill < _FILL_TRIANGLE_BELOW
                 else "circle" if fill < _FILL_CIRCLE_BELOW else "square")
        side = max(x1 - x0, y1 - y0)
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        cell = tuple(min(int(v * 3 // CANVAS), 2) for v in (cx, cy))
        regions.append({
            "color": COLORS[int(_nearest_colour(np.median(image[ys, xs], axis=0)))],
            "shape": shape,
            "size": "large" if side > LARGE_THRESHOLD * CANVAS else "small",
            "cell": cell,
            "centroid": (float(cx), float(cy)),
            "bbox": (int(x0), int(y0), int(x1), int(y1)),
            "fill": round(float(fill), 4),
            "area": int(len(xs)),
        })
    regions.sort(key=lambda r: -r["area"])
    return COLORS[background], regions


def score(image: np.ndarray, target: str | Scene) -> dict:
    """Score an image (uint8 (H, W, 3), any size) against a caption or a scene.

    Returns a bool per attribute (background, count, color, shape, size, position), `correct`
    (all of them), and the `regions` found. An attribute holds when every named object shows
    it: regions are matched to named objects so as to agree on the most attributes, so a
    missing object fails every per-object attribute and swapped objects fail `position`.
    """
    scene = parse_caption(target) if isinstance(target, str) else target
    if not isinstance(scene, Scene):
        raise TypeError(f"target must be a caption (str) or a Scene, got {type(target).__name__}")
    background, regions = find_regions(image)
    named = scene.objects

    # Consider only the few largest regions when matching: beyond them the count already fails.
    candidates = regions[: len(named) + 2]
    best, best_agree = [], (-1, -1)
    k = min(len(named), len(candidates))
    for chosen in itertools.permutations(candidates, k):
        # What the objects are counts before where they are: drawn in swapped places, two
        # objects fail `position`, not `color` and `shape`.
        agree = (sum((r["color"] == o.color) + (r["shape"] == o.shape) + (r["size"] == o.size)
                     for r, o in zip(chosen, named)),
                 sum(r["cell"] == tuple(o.cell) for r, o in zip(chosen, named)))
        if agree > best_agree:
            best, best_agree = list(chosen), agree
    complete = len(best) == len(named)

    def every(attribute: str, wanted) -> bool:
        return complete and all(r[attribute] == wanted(o) for r, o in zip(best, named))

    position = every("cell", lambda o: tuple(o.cell))
    if position and scene.layout != "single":
        first, second = best
        axis = 0 if scene.layout == "side_by_side" else 1
        position = first["centroid"][axis] < second["centroid"][axis]
    result = {
        "background": background == scene.background,
        "count": len(regions) == len(named),
        "color": every("color", lambda o: o.color),
        "shape": every("shape", lambda o: o.shape),
        "size": every("size", lambda o: o.size),
        "position": bool(position),
    }
    result["correct"] = all(result.values())
    result["regions"] = regions
    return result


def summarize(scores: Sequence[dict], groups: Sequence[str] | None = None) -> dict:
    """Shares of fully correct images and of each attribute, overall ("all") and per group.

    `groups` names each score's group (e.g. Scene.group: "one_object", "two_objects",
    "heldout"); the overall entry pools them all.
    """
    if groups is not None and len(groups) != len(scores):
        raise ValueError(f"groups has {len(groups)} entries for {len(scores)} scores: "
                         "give one group name per score")
    members: dict[str, list[dict]] = {"all": list(scores)}
    known = ("one_object", "two_objects", "heldout")
    for g in [g for g in known if g in (groups or ())] + sorted(set(groups or ()) - set(known)):
        members[g] = [s for s, sg in zip(scores, groups) if sg == g]
    summary = {}
    for name, group in members.items():
        entry = {"n": len(group)}
        for key in ("correct",) + ATTRIBUTES:
            entry[key] = round(sum(bool(s[key]) for s in group) / len(group), 4) if group else None
        summary[name] = entry
    return summary
