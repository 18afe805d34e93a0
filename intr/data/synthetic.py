"""The built-in synthetic "bird" data set with planted traits.

Procedurally drawn birds (body, crown, beak, eye, wing, tail, breast, legs).
A genus fixes the shapes (bill length, tail shape) and a base colour/pattern
state for every part; the species of one genus are identical except in a
small, known set of parts (one for most pairs, two for some), and those
differences are always colour or pattern states, never shapes.  All colours
come from one shared palette, and the background reuses the genus' own
colours and patterns, so that a global colour histogram cannot tell siblings
apart: only *where* a colour sits does.

Everything is written in the CUB_200_2011 layout (images.txt, classes.txt,
parts/part_locs.txt, attributes/..., ...) plus one part-id mask PNG per image,
``traits.csv`` (the planted truth) and ``pairs.csv`` (the parts that differ
per look-alike pair).  The same config gives byte-identical files.

Rendering is a tiny rasteriser over canonical bird coordinates: every image
pixel is mapped back through the pose (flip, rotation, scale, translation) and
each part is an implicit shape there, painted back to front.  Nuisance (pose,
background, distractors, occluder, colour jitter, noise) is drawn from a
random stream that does not depend on the species, so two siblings rendered
with the same nuisance differ only inside their differing parts' masks.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from analysis.config import defaults

# --------------------------------------------------------------------------- vocabulary

PARTS: tuple[str, ...] = ("body", "crown", "beak", "eye", "wing", "tail", "breast", "legs")
PART_ID: dict[str, int] = {name: i + 1 for i, name in enumerate(PARTS)}  # 0 = background
DISTINGUISHING_PARTS: tuple[str, ...] = ("crown", "beak", "eye", "wing", "tail", "breast")

# CUB colour names; RGB chosen far enough apart that mild jitter never swaps them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "blue": (40, 80, 210),
    "yellow": (240, 210, 40),
    "black": (25, 25, 28),
    "white": (242, 242, 236),
    "orange": (245, 135, 20),
    "green": (40, 155, 60),
    "brown": (125, 78, 35),
    "grey": (135, 135, 140),
    "purple": (125, 50, 160),
    "pink": (240, 140, 190),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
PATTERNS: tuple[str, ...] = ("solid", "striped", "spotted")
# Which parts may carry a pattern other than solid.
PATTERNED_PARTS: frozenset[str] = frozenset({"crown", "wing", "tail", "breast"})
BILL_LENGTHS: dict[str, float] = {"shorter_than_head": 0.2, "about_the_same_as_head": 0.26,
                                  "longer_than_head": 0.32}
TAIL_SHAPES: tuple[str, ...] = ("squared_tail", "notched_tail", "pointed_tail")

# CUB attribute stems per synthetic part (colour, pattern).
ATTRIBUTE_STEMS: dict[str, tuple[str, str | None]] = {
    "body": ("has_back_color", None),
    "crown": ("has_crown_color", "has_head_pattern"),
    "beak": ("has_bill_color", None),
    "eye": ("has_eye_color", None),
    "wing": ("has_wing_color", "has_wing_pattern"),
    "tail": ("has_upper_tail_color", "has_tail_pattern"),
    "breast": ("has_breast_color", "has_breast_pattern"),
    "legs": ("has_leg_color", None),
}
PART_ADJECTIVE: dict[str, str] = {"crown": "crowned", "beak": "billed", "eye": "eyed",
                                  "wing": "winged", "tail": "tailed", "breast": "breasted"}
TARGET_GENUS_NAMES: tuple[str, ...] = (
    "Finch", "Warbler", "Tanager", "Sparrow", "Vireo", "Wren", "Flycatcher", "Grosbeak",
    "Bunting", "Oriole", "Thrush", "Kingbird", "Swallow", "Shrike", "Jay", "Nuthatch",
    "Pipit", "Lark", "Starling", "Robin", "Chat", "Babbler", "Bulbul", "Sunbird", "Weaver",
    "Manakin", "Cotinga", "Antbird", "Becard", "Euphonia", "Seedeater", "Siskin",
)
_SYLLABLES = ("ca", "lo", "ri", "ven", "tu", "mo", "sa", "phi", "dra", "ne", "xo", "ly",
              "ter", "bu", "qui", "zel", "ar", "om", "pe", "sti")

# --------------------------------------------------------------------------- config


SYNTHETIC = defaults("synthetic")  # the config schema's defaults


@dataclass(frozen=True)
class SyntheticConfig:
    """What to render.

    Args:
        genera: number of genera.
        species_per_genus: look-alike species per genus.
        images_per_species: images rendered per species.
        image_size: side of the square images in pixels (64 on CPU, 224 for GPU runs).
        train_fraction: fraction of each species' images marked as training images.
        seed: seed of taxonomy and rendering.
        set: ``target`` (the species to study) or ``pretrain`` (a larger, disjoint
            species set of minimal pairs covering every part and state).
        two_part_fraction: fraction of genera whose species differ from the base
            species in different parts (pairs among them then differ in two parts);
            the other genera vary one part only.
        target_genera: with ``set: pretrain``, the target set (same seed) whose
            species the pretraining set must not contain.
        target_species_per_genus: as ``target_genera``.
        class_names: optional names replacing the generated species names in
            class order (the first ``len(class_names)`` species); each becomes a
            class folder, so it must be unique, non-empty, free of '/' and line
            breaks, without surrounding spaces and without a numeric ``NNN.``
            prefix. Any other text is allowed (the tests use an HTML-like name
            to check that the report escapes it).
    """

    genera: int = SYNTHETIC["genera"]
    species_per_genus: int = SYNTHETIC["species_per_genus"]
    images_per_species: int = SYNTHETIC["images_per_species"]
    image_size: int = SYNTHETIC["image_size"]
    train_fraction: float = SYNTHETIC["train_fraction"]
    seed: int = SYNTHETIC["seed"]
    set: str = "target"
    two_part_fraction: float = 0.5
    target_genera: int = 4
    target_species_per_genus: int = 3
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.set not in ("target", "pretrain"):
            raise ValueError(f"set must be 'target' or 'pretrain', got {self.set!r}")
        for name in ("genera", "species_per_genus", "images_per_species"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 px, got {self.image_size}")
        if not 0.0 <= self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must lie in [0, 1], got {self.train_fraction}")
        if self.class_names is not None:
            _check_class_names(self.class_names, self.genera * self.species_per_genus)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> "SyntheticConfig":
        """Build from a mapping; unknown keys are an error naming them.

        With ``set: pretrain``, sizes not given default to the pretraining recipe
        (32 genera x 3 species x 150 images).
        """
        known = {f.name for f in fields(cls)} | {"workers"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown synthetic option(s): {', '.join(unknown)}")
        values = {k: v for k, v in options.items() if k != "workers"}
        if values.get("class_names") is not None:
            names = values["class_names"]
            if isinstance(names, str) or not isinstance(names, Sequence):
                raise ValueError(f"synthetic.class_names must be a list of strings, got {names!r}")
            values["class_names"] = tuple(names)
        if values.get("set") == "pretrain":
            for key, default in (("genera", 32), ("species_per_genus", 3), ("images_per_species", 150)):
                values.setdefault(key, default)
        return cls(**values)


def _check_class_names(names: Sequence[Any], n_species: int) -> None:
    """ValueError naming the first ``synthetic.class_names`` entry that cannot be a class folder."""
    if len(names) > n_species:
        raise ValueError(f"synthetic.class_names has {len(names)} names but the set has only "
                         f"{n_species} species (genera x species_per_genus)")
    for k, name in enumerate(names):
        where = f"synthetic.class_names[{k}] = {name!r}"
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: a class name must be a non-empty string")
        if "/" in name or "\\" in name or "\n" in name or "\r" in name or "\0" in name:
            raise ValueError(f"{where}: a class name is a folder name and cannot hold '/', '\\', "
                             f"a line break or NUL")
        if name != name.strip():
            raise ValueError(f"{where}: a class name cannot start or end with spaces (classes.txt drops them)")
        if re.match(r"^\d+\.", name):
            raise ValueError(f"{where}: a class name cannot start with a numeric 'NNN.' prefix "
                             f"(it is read as CUB's folder number)")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"synthetic.class_names repeats {repeated[0]!r}: class names must be unique")


# --------------------------------------------------------------------------- taxonomy


@dataclass(frozen=True)
class PartState:
    """The planted state of one part: a palette colour and a pattern."""

    colour: str
    pattern: str = "solid"

    @property
    def label(self) -> str:
        return self.colour if self.pattern == "solid" else f"{self.pattern} {self.colour}"


@dataclass(frozen=True)
class Genus:
    """Shapes and base states shared by all species of a genus."""

    name: str
    bill_length: str
    tail_shape: str
    base: Mapping[str, PartState]
    varying: tuple[PartState, ...] = ()  # every state a distinguishing part takes in this genus

    @property
    def palette(self) -> tuple[str, ...]:
        """All colours of the genus' species: what its background reuses."""
        return tuple(sorted({s.colour for s in self.base.values()} | {s.colour for s in self.varying}))


@dataclass(frozen=True)
class Species:
    """One class: its genus and the state of every part."""

    name: str
    genus: Genus
    states: Mapping[str, PartState]

    def differing_parts(self, other: "Species") -> list[str]:
        return [p for p in PARTS if self.states[p] != other.states[p]]


def _distinct_colour(rng: np.random.Generator, avoid: str) -> str:
    """A palette colour clearly different from ``avoid``."""
    a = np.array(PALETTE[avoid], dtype=float)
    candidates = [c for c in COLOURS if np.linalg.norm(np.array(PALETTE[c], dtype=float) - a) > 110]
    return str(rng.choice(candidates))


def _random_state(rng: np.random.Generator, part: str) -> PartState:
    colour = str(rng.choice(COLOURS))
    pattern = "solid"
    if part in PATTERNED_PARTS and rng.random() < 0.35:
        pattern = str(rng.choice(PATTERNS[1:]))
    return PartState(colour, pattern)


def _mutated_state(rng: np.random.Generator, part: str, base: PartState, taken: set[PartState]) -> PartState:
    """A new, clearly different state of ``part`` (colour mostly, pattern sometimes)."""
    for _ in range(100):
        if part in PATTERNED_PARTS and rng.random() < 0.3:
            pattern = str(rng.choice([p for p in PATTERNS if p != base.pattern]))
            state = PartState(base.colour, pattern)
        else:
            state = PartState(_distinct_colour(rng, base.colour), base.pattern)
        if state not in taken:
            return state
    raise RuntimeError(f"could not find a new state for part {part}")


def _genus_names(config: SyntheticConfig, rng: np.random.Generator) -> list[str]:
    if config.set == "target":
        base = list(TARGET_GENUS_NAMES)
        names = [base[i % len(base)] + ("" if i < len(base) else f"_{i // len(base) + 1}")
                 for i in range(config.genera)]
        return names
    names: list[str] = []
    while len(names) < config.genera:
        word = "".join(rng.choice(_SYLLABLES, size=3)).capitalize()
        if word not in names and word not in TARGET_GENUS_NAMES:
            names.append(word)
    return names


def _species_name(genus: Genus, changes: Mapping[str, PartState]) -> str:
    if not changes:
        return f"Common_{genus.name}"
    words = []
    for part, state in changes.items():
        base = genus.base[part]
        adjective = state.colour.capitalize() if state.colour != base.colour else state.pattern.capitalize()
        words.append(f"{adjective}_{PART_ADJECTIVE[part]}")
    return "_".join(words) + f"_{genus.name}"


def build_taxonomy(config: SyntheticConfig) -> list[Species]:
    """The species of a set, in class order (genus by genus).

    The target set draws mutated parts at random; the pretraining set cycles
    through every distinguishing part and state so a backbone trained on it
    must encode all parts, and it never contains a target species.
    """
    stream = 0 if config.set == "target" else 1
    rng = np.random.default_rng([config.seed, stream, 7])
    excluded: set[tuple] = set()
    if config.set == "pretrain":
        target = replace(config, set="target", genera=config.target_genera,
                         species_per_genus=config.target_species_per_genus, class_names=None)
        excluded = {_species_key(s) for s in build_taxonomy(target)}

    species: list[Species] = []
    cycle = itertools.cycle(DISTINGUISHING_PARTS)
    for name in _genus_names(config, rng):
        while True:
            base = {part: _random_state(rng, part) for part in PARTS}
            base["legs"] = PartState(str(rng.choice(["brown", "grey", "black", "orange", "pink"])))
            genus = Genus(name, str(rng.choice(list(BILL_LENGTHS))), str(rng.choice(TAIL_SHAPES)), base)
            members = _genus_species(genus, config, rng, cycle)
            if not any(_species_key(s) in excluded for s in members):
                break
        species.extend(members)
    if config.class_names:
        renamed = [replace(sp, name=name) for sp, name in zip(species, config.class_names)]
        species = renamed + species[len(renamed):]
        clashes = sorted(name for name, count in Counter(sp.name for sp in species).items() if count > 1)
        if clashes:
            raise ValueError(f"synthetic.class_names: {clashes[0]!r} is also a generated species name; "
                             f"class names must be unique")
    return species


def _genus_species(genus: Genus, config: SyntheticConfig, rng: np.random.Generator,
                   cycle: Iterable[str]) -> list[Species]:
    n_mutants = config.species_per_genus - 1
    if config.set == "pretrain":
        parts = [next(iter(cycle)) for _ in range(n_mutants)]  # type: ignore[call-overload]
    elif rng.random() < config.two_part_fraction and n_mutants <= len(DISTINGUISHING_PARTS):
        parts = [str(p) for p in rng.choice(DISTINGUISHING_PARTS, size=n_mutants, replace=False)]
    else:
        parts = [str(rng.choice(DISTINGUISHING_PARTS))] * n_mutants
    members = [Species(_species_name(genus, {}), genus, dict(genus.base))]
    taken: dict[str, set[PartState]] = {p: {genus.base[p]} for p in PARTS}
    for part in parts:
        state = _mutated_state(rng, part, genus.base[part], taken[part])
        taken[part].add(state)
        states = dict(genus.base)
        states[part] = state
        members.append(Species(_species_name(genus, {part: state}), genus, states))
    varying = tuple(sorted({st for part in set(parts) for st in taken[part]}, key=lambda st: (st.colour, st.pattern)))
    genus = replace(genus, varying=varying)
    return [replace(sp, genus=genus) for sp in members]


def _species_key(species: Species) -> tuple:
    g = species.genus
    return (g.bill_length, g.tail_shape) + tuple(species.states[p] for p in PARTS)


# --------------------------------------------------------------------------- nuisance


@dataclass(frozen=True)
class Nuisance:
    """Everything about one image that is not the species: drawn before rendering."""

    flip: bool
    angle: float            # radians
    scale: float            # canonical unit -> fraction of the image side
    shift: tuple[float, float]  # fraction of the image side
    background: tuple[int, int, int, int]  # two palette indices (of the genus palette or global), orientation, frequency bucket
    texture_phase: tuple[float, float]
    distractors: tuple[tuple[float, ...], ...]  # kind, x, y, rx, ry, angle, colour_u, pattern_u, from_genus
    decoys: tuple[tuple[float, ...], ...]  # x, y, rx, ry, angle, state_u: the genus' varying states
    occluder: tuple[float, ...] | None   # x, y, rx, ry, angle, colour_u
    gain: tuple[float, float, float]
    brightness: float
    contrast: float
    noise_seed: int


def draw_nuisance(rng: np.random.Generator) -> Nuisance:
    """Draw the nuisance of one image (pose, background, distractors, occluder, jitter)."""
    n_distractors = int(rng.integers(5, 11))
    distractors = tuple(
        (float(rng.integers(0, 3)), *rng.uniform(0, 1, 2), *rng.uniform(0.05, 0.16, 2),
         float(rng.uniform(0, math.pi)), float(rng.random()), float(rng.random()), float(rng.random()))
        for _ in range(n_distractors)
    )
    decoys = tuple(
        (*rng.uniform(0, 1, 2), *rng.uniform(0.04, 0.15, 2), float(rng.uniform(0, math.pi)), float(rng.random()))
        for _ in range(int(rng.integers(2, 13)))
    )
    occluder = None
    if rng.random() < 0.3:
        occluder = (*rng.uniform(0.3, 0.7, 2), *rng.uniform(0.08, 0.16, 2),
                    float(rng.uniform(0, math.pi)), float(rng.random()))
    return Nuisance(
        flip=bool(rng.random() < 0.5),
        angle=float(rng.uniform(-0.35, 0.35)),
        scale=float(rng.uniform(0.64, 0.8)),
        shift=(float(rng.uniform(-0.07, 0.07)), float(rng.uniform(-0.07, 0.07))),
        background=(int(rng.integers(0, 1 << 16)), int(rng.integers(0, 1 << 16)),
                    int(rng.integers(0, 4)), int(rng.integers(0, 3))),
        texture_phase=(float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, 2 * math.pi))),
        distractors=distractors,
        decoys=decoys,
        occluder=occluder,
        gain=tuple(float(g) for g in rng.uniform(0.94, 1.06, 3)),  # type: ignore[arg-type]
        brightness=float(rng.uniform(0.88, 1.12)),
        contrast=float(rng.uniform(0.88, 1.12)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


# --------------------------------------------------------------------------- rasteriser

def _ellipse(u: np.ndarray, v: np.ndarray, cx: float, cy: float, rx: float, ry: float,
             angle: float = 0.0) -> np.ndarray:
    du, dv = u - cx, v - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        du, dv = c * du + s * dv, -s * du + c * dv
    return (du / rx) ** 2 + (dv / ry) ** 2 <= 1.0


def _polygon(u: np.ndarray, v: np.ndarray, points: Sequence[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the grid."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(points)
    for i in range(n):
        (x1, y1), (x2, y2) = points[i], points[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (x2 - x1) * (v - y1) / (y2 - y1 + 1e-12) + x1
        inside ^= crosses & (u < x_at)
    return inside


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Pixels of a part that take the pattern's second colour."""
    if pattern == "striped":
        return np.sin(2 * math.pi * u / period) > 0.0
    if pattern == "spotted":
        fu = (u / period) % 1.0 - 0.5
        fv = (v / period + 0.5 * np.floor(u / period)) % 1.0 - 0.5
        return fu**2 + fv**2 < 0.33**2
    return np.zeros(u.shape, dtype=bool)


def _second_colour(colour: str) -> str:
    return "white" if colour in ("black", "brown", "purple", "blue") else "black"


def _part_shapes(genus: Genus, u: np.ndarray, v: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Canonical bird (facing +u, v down), painted back to front."""
    length = BILL_LENGTHS[genus.bill_length]
    tail_end, tail_half = -0.5, 0.12
    if genus.tail_shape == "squared_tail":
        tail = [(-0.16, -0.07), (tail_end, -tail_half), (tail_end, tail_half), (-0.16, 0.07)]
    elif genus.tail_shape == "notched_tail":
        tail = [(-0.16, -0.07), (tail_end, -tail_half - 0.02), (tail_end + 0.09, 0.0),
                (tail_end, tail_half + 0.02), (-0.16, 0.07)]
    else:
        tail = [(-0.16, -0.08), (tail_end + 0.04, -tail_half), (tail_end - 0.05, 0.0),
                (tail_end + 0.04, tail_half), (-0.16, 0.08)]
    body = _ellipse(u, v, 0.0, 0.02, 0.27, 0.16)
    legs = ((np.abs(u - 0.02) < 0.018) | (np.abs(u - 0.1) < 0.018)) & (v > 0.12) & (v < 0.33)
    head = _ellipse(u, v, 0.27, -0.14, 0.165, 0.165)
    beak = _polygon(u, v, [(0.38, -0.25), (0.42 + length, -0.13), (0.38, -0.02)])
    return [
        ("legs", legs),
        ("tail", _polygon(u, v, tail)),
        ("body", body),
        ("breast", body & _ellipse(u, v, 0.13, 0.07, 0.17, 0.12)),
        ("wing", _ellipse(u, v, -0.06, -0.01, 0.22, 0.1, angle=-0.18)),
        ("beak", beak & ~head),
        ("crown", head),
        ("eye", _ellipse(u, v, 0.31, -0.16, 0.1, 0.1)),
    ]


def _palette_colour(u01: float, from_genus: bool, genus_palette: Sequence[str]) -> str:
    pool = genus_palette if from_genus and genus_palette else COLOURS
    return pool[min(int(u01 * len(pool)), len(pool) - 1)]


def _paint_background(img: np.ndarray, gx: np.ndarray, gy: np.ndarray, nz: Nuisance,
                      genus_palette: Sequence[str], varying: Sequence[PartState]) -> None:
    c1 = np.array(PALETTE[COLOURS[nz.background[0] % len(COLOURS)]], dtype=np.float32)
    c2 = np.array(PALETTE[COLOURS[nz.background[1] % len(COLOURS)]], dtype=np.float32)
    # Muted two-colour texture: the background is busy but rarely bird-bright.
    grey = np.float32(120.0)
    c1, c2 = 0.45 * c1 + 0.55 * grey, 0.45 * c2 + 0.55 * grey
    theta = nz.background[2] * math.pi / 4
    freq = (2.0, 3.5, 6.0)[nz.background[3]]
    wave = np.sin(2 * math.pi * freq * (math.cos(theta) * gx + math.sin(theta) * gy) + nz.texture_phase[0])
    wave += 0.6 * np.sin(2 * math.pi * 1.3 * freq * gy + nz.texture_phase[1])
    t = (0.5 + 0.25 * wave).clip(0, 1)[..., None]
    img[:] = c1 * (1 - t) + c2 * t
    for kind, x, y, rx, ry, angle, colour_u, pattern_u, genus_u in nz.distractors:
        colour = _palette_colour(colour_u, genus_u < 0.7, genus_palette)
        if kind == 0:
            shape = _ellipse(gx, gy, x, y, rx, ry, angle)
        elif kind == 1:
            shape = _ellipse(gx, gy, x, y, rx, ry * 0.25, angle)  # a twig
        else:
            shape = _polygon(gx, gy, [(x - rx, y + ry), (x + rx, y + ry), (x, y - ry)])
        pattern = PATTERNS[min(int(pattern_u * 3), 2)]
        second = _pattern_mask(pattern, gx - x, gy - y, 0.07)
        img[shape] = PALETTE[colour]
        img[shape & second] = PALETTE[_second_colour(colour)]
    # Decoys wear exactly the states that tell this genus' species apart, in
    # random amounts, so the colour of a planted trait says nothing without
    # its place on the bird.
    for x, y, rx, ry, angle, state_u in nz.decoys if varying else ():
        state = varying[min(int(state_u * len(varying)), len(varying) - 1)]
        shape = _ellipse(gx, gy, x, y, rx, ry, angle)
        img[shape] = PALETTE[state.colour]
        img[shape & _pattern_mask(state.pattern, gx - x, gy - y, 0.07)] = PALETTE[_second_colour(state.colour)]


def render_bird(species: Species, nuisance: Nuisance, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one image.

    Args:
        species: the species (its genus gives shapes, its states the colours).
        nuisance: pose, background and jitter, from :func:`draw_nuisance`.
        size: image side in pixels.

    Returns:
        ``(image, mask)``: uint8 RGB image (size, size, 3) and uint8 part-id mask
        (size, size), 0 where no part is visible.
    """
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    gx, gy = np.meshgrid(coords, coords)
    img = np.empty((size, size, 3), dtype=np.float32)
    _paint_background(img, gx, gy, nuisance, species.genus.palette, species.genus.varying)

    # Image -> canonical bird coordinates (inverse of: flip, rotate, scale, translate).
    dx = (gx - 0.5 - nuisance.shift[0]) / nuisance.scale
    dy = (gy - 0.5 - nuisance.shift[1]) / nuisance.scale
    c, s = math.cos(nuisance.angle), math.sin(nuisance.angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if nuisance.flip:
        u = -u
    u = u + 0.1  # centre of the canonical bird's box

    mask = np.zeros((size, size), dtype=np.uint8)
    for part, shape in _part_shapes(species.genus, u, v):
        state = species.states[part]
        img[shape] = PALETTE[state.colour]
        if state.pattern != "solid":
            second = shape & _pattern_mask(state.pattern, u, v, 0.085)
            img[second] = PALETTE[_second_colour(state.colour)]
        mask[shape] = PART_ID[part]
    pupil = _ellipse(u, v, 0.315, -0.16, 0.04, 0.04)
    img[pupil] = PALETTE["black"]

    if nuisance.occluder is not None:
        x, y, rx, ry, angle, colour_u = nuisance.occluder
        leaf = _ellipse(gx, gy, x, y, rx, ry, angle)
        img[leaf] = PALETTE[("green", "brown", "grey")[min(int(colour_u * 3), 2)]]
        mask[leaf] = 0

    # Colour jitter pivots on a fixed grey, not the image mean, so that pixels
    # outside a changed part stay identical between siblings.
    img = (img - 128.0) * nuisance.contrast + 128.0
    img = img * nuisance.brightness * np.asarray(nuisance.gain, dtype=np.float32)
    noise = np.random.default_rng(nuisance.noise_seed).normal(0.0, 4.0, img.shape).astype(np.float32)
    image = np.clip(np.rint(img + noise), 0, 255).astype(np.uint8)
    return image, mask


def render_counterfactual(species: Species, nuisance: Nuisance, size: int,
                          states: Mapping[str, PartState]) -> tuple[np.ndarray, np.ndarray]:
    """Render ``species`` under ``nuisance`` with some parts' states replaced ("A with B's beak").

    The same rasteriser as :func:`render_bird`: shapes, background and noise
    come from the genus and the nuisance, so only the replaced parts' pixels change.

    Args:
        species: the species drawn (its genus keeps the shapes and the background's palette).
        nuisance: pose, background and jitter of the image re-rendered.
        size: image side in pixels.
        states: new state per part name; parts not named keep the species' own state.

    Returns:
        ``(image, mask)`` as :func:`render_bird`.
    """
    unknown = sorted(set(states) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(unknown)}; parts are {', '.join(PARTS)}")
    return render_bird(replace(species, states={**species.states, **states}), nuisance, size)


def control_state(taxonomy: Sequence[Species], species: Species, part: str) -> PartState | None:
    """A state of ``part`` that occurs elsewhere in the data set, for a control swap of ``species``.

    The first species in class order outside ``species``' genus whose ``part`` differs,
    skipping states that would turn the bird into another species of the set (a
    control must change the bird without making it a known class). None if no such state.

    Args:
        taxonomy: every species of the data set, in class order.
        species: the species whose image is changed.
        part: the part to change (one the compared pair shares).
    """
    known = {_species_key(sp) for sp in taxonomy}
    for other in taxonomy:
        state = other.states[part]
        if other.genus.name == species.genus.name or state == species.states[part]:
            continue
        changed = replace(species, states={**species.states, part: state})
        if _species_key(changed) not in known:
            return state
    return None


# --------------------------------------------------------------------------- ground truth per image

MIN_VISIBLE_PIXELS = 3


def part_keypoints(mask: np.ndarray) -> list[tuple[int, float, float, int]]:
    """CUB-style keypoints from a part mask: (part_id, x, y, visible).

    The keypoint is the part's visible pixel nearest to its visible centroid,
    so it always lies inside the part's own mask.  A part with fewer than
    ``MIN_VISIBLE_PIXELS`` visible pixels (occluded or out of frame) is
    ``(part_id, 0, 0, 0)`` as in CUB.
    """
    out = []
    for part in PARTS:
        pid = PART_ID[part]
        ys, xs = np.nonzero(mask == pid)
        if len(xs) < MIN_VISIBLE_PIXELS:
            out.append((pid, 0.0, 0.0, 0))
            continue
        cx, cy = xs.mean(), ys.mean()
        k = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
        out.append((pid, float(xs[k]), float(ys[k]), 1))
    return out


def bounding_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(x, y, width, height) of all visible bird pixels, CUB convention."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0.0, 0.0, float(mask.shape[1]), float(mask.shape[0]))
    return (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))


# --------------------------------------------------------------------------- writing the data set


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def image_nuisance(config: SyntheticConfig, class_index: int, image_index: int) -> Nuisance:
    """The nuisance of one image of the data set, fixed by seed, class and index."""
    stream = 0 if config.set == "target" else 1
    return draw_nuisance(np.random.default_rng([config.seed, stream, 11, class_index, image_index]))


def _render_class(job: tuple[SyntheticConfig, list[Species], int, str]) -> list[dict[str, Any]]:
    config, taxonomy, class_index, out = job
    species = taxonomy[class_index]
    folder = f"{class_index + 1:03d}.{species.name}"
    root = Path(out)
    (root / "images" / folder).mkdir(parents=True, exist_ok=True)
    (root / "masks" / folder).mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(config.images_per_species):
        image, mask = render_bird(species, image_nuisance(config, class_index, i), config.image_size)
        name = f"{species.name}_{i + 1:04d}.png"
        (root / "images" / folder / name).write_bytes(_png_bytes(image))
        (root / "masks" / folder / name).write_bytes(_png_bytes(mask))
        records.append({"path": f"{folder}/{name}", "bbox": bounding_box(mask),
                        "parts": part_keypoints(mask)})
    return records


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def _attribute_names() -> list[str]:
    names = []
    for part in PARTS:
        colour_stem, pattern_stem = ATTRIBUTE_STEMS[part]
        names += [f"{colour_stem}::{c}" for c in COLOURS]
        if pattern_stem:
            names += [f"{pattern_stem}::{p}" for p in PATTERNS]
    names += [f"has_bill_length::{b}" for b in BILL_LENGTHS]
    names += [f"has_tail_shape::{t}" for t in TAIL_SHAPES]
    return names


def _species_attributes(species: Species) -> set[str]:
    present = set()
    for part in PARTS:
        colour_stem, pattern_stem = ATTRIBUTE_STEMS[part]
        state = species.states[part]
        present.add(f"{colour_stem}::{state.colour}")
        if pattern_stem:
            present.add(f"{pattern_stem}::{state.pattern}")
    present.add(f"has_bill_length::{species.genus.bill_length}")
    present.add(f"has_tail_shape::{species.genus.tail_shape}")
    return present


def _train_flags(config: SyntheticConfig, class_index: int) -> np.ndarray:
    n = config.images_per_species
    order = np.random.default_rng([config.seed, 23, class_index]).permutation(n)
    flags = np.zeros(n, dtype=int)
    flags[order[: int(round(config.train_fraction * n))]] = 1
    return flags


def _write_ground_truth(root: Path, taxonomy: list[Species]) -> None:
    with open(root / "traits.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["species_id", "species", "genus", "part", "colour", "pattern", "state", "bill_length",
                         "tail_shape"])
        for k, sp in enumerate(taxonomy):
            for part in PARTS:
                st = sp.states[part]
                writer.writerow([k + 1, sp.name, sp.genus.name, part, st.colour, st.pattern, st.label,
                                 sp.genus.bill_length, sp.genus.tail_shape])
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["species_a", "species_b", "genus", "differing_parts", "n_differing"])
        for a, b in itertools.combinations(taxonomy, 2):
            if a.genus.name == b.genus.name:
                parts = a.differing_parts(b)
                writer.writerow([a.name, b.name, a.genus.name, ";".join(parts), len(parts)])


def synthesize(config: SyntheticConfig, out: Path, workers: int = 1, progress: bool = True) -> dict[str, int]:
    """Render the data set into ``out`` in the CUB_200_2011 layout.

    Args:
        config: what to render.
        out: the data set root (created).
        workers: processes for rendering; the files do not depend on it.
        progress: show a progress bar.

    Returns:
        counts of images, species and genera.
    """
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    taxonomy = build_taxonomy(config)
    jobs = [(config, taxonomy, k, str(out)) for k in range(len(taxonomy))]
    bar = tqdm(total=len(jobs) * config.images_per_species, desc="synthesize", unit="img",
               disable=not progress)
    results: list[list[dict[str, Any]]] = []
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for records in pool.map(_render_class, jobs):
                results.append(records)
                bar.update(len(records))
    else:
        for job in jobs:
            results.append(_render_class(job))
            bar.update(len(results[-1]))
    bar.close()

    images, labels, split, boxes, locs = [], [], [], [], []
    image_id = 0
    for k, records in enumerate(results):
        flags = _train_flags(config, k)
        for i, rec in enumerate(records):
            image_id += 1
            images.append(f"{image_id} {rec['path']}")
            labels.append(f"{image_id} {k + 1}")
            split.append(f"{image_id} {flags[i]}")
            boxes.append(f"{image_id} " + " ".join(f"{b:.1f}" for b in rec["bbox"]))
            locs += [f"{image_id} {pid} {x:.1f} {y:.1f} {vis}" for pid, x, y, vis in rec["parts"]]
    _write_lines(out / "images.txt", images)
    _write_lines(out / "classes.txt", (f"{k + 1} {k + 1:03d}.{sp.name}" for k, sp in enumerate(taxonomy)))
    _write_lines(out / "image_class_labels.txt", labels)
    _write_lines(out / "train_test_split.txt", split)
    _write_lines(out / "bounding_boxes.txt", boxes)
    _write_lines(out / "parts" / "parts.txt", (f"{PART_ID[p]} {p}" for p in PARTS))
    _write_lines(out / "parts" / "part_locs.txt", locs)
    names = _attribute_names()
    _write_lines(out / "attributes" / "attributes.txt", (f"{i + 1} {n}" for i, n in enumerate(names)))
    _write_lines(out / "attributes" / "class_attribute_labels_continuous.txt",
                 (" ".join("100.000000" if n in _species_attributes(sp) else "0.000000" for n in names)
                  for sp in taxonomy))
    _write_ground_truth(out, taxonomy)
    _write_lines(out / "synthetic_config.yaml", (f"{k}: {json.dumps(list(v)) if k == 'class_names' else v}"
                                                 for k, v in asdict(config).items()
                                                 if not (k == "class_names" and v is None)))
    return {"images": image_id, "species": len(taxonomy), "genera": len({s.genus.name for s in taxonomy})}
