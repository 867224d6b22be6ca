"""The toy world: scenes, their captions, the vocabulary, and a deterministic renderer (numpy only).

A scene is one object (ball, box, cone or ring) with a body colour, a pattern (plain, striped, dotted) in a
pattern colour, a size and a position, on a background setting (sand, grass, snow, a brick wall). `render(scene)`
draws it at 64x64 from the scene alone: the same scene gives the same pixels (numpy's PCG64 generator, plain
supersampling, no Pillow resampling; CPUs whose vectorised sine differs in the last bit can flip a rounding by one
level). Captions name a random subset of the attributes
("a big red striped box on sand"), so short prompts such as "a box" are in the language of the world.

Two distributions are drawn from:
- the *base world*, what the text-to-image model is pretrained on: pattern colours are white or black, stripes
  run horizontally or vertically, and blue striped boxes never occur;
- the *open world*, what the evaluation backbones and the VAE are trained on: any pattern colour and stripe angle,
  nothing held out, because a feature extractor has to tell any two objects apart and a codec has to encode them.

The subject (`SUBJECT`) is a blue box with orange diagonal stripes: no base-world image has its look.

What this module does not hold: models, training, or files on disk (see pretrain.py and subject.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

IMAGE_SIZE = 64
SUPERSAMPLE = 2

NOUNS = ("ball", "box", "cone", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 210, 50),
    "green": (50, 160, 70),
    "blue": (40, 80, 200),
    "purple": (130, 60, 170),
    "pink": (235, 120, 170),
    "brown": (120, 75, 40),
}
NEUTRALS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (25, 25, 25)}
PATTERNS = ("plain", "striped", "dotted")
SIZES = ("small", "medium", "big")  # "medium" is never said: captions only name the extremes
POSITIONS = ("left", "center", "right")  # "center" is never said
SETTINGS = ("sand", "grass", "snow", "bricks")
BASE_STRIPE_ANGLES = (0, 90)
OPEN_STRIPE_ANGLES = (0, 45, 90, 135)

SETTING_PHRASES = {"sand": "on sand", "grass": "on grass", "snow": "in snow", "bricks": "by a brick wall"}
POSITION_PHRASES = {"left": "on the left", "right": "on the right"}
# Rare tokens: in the vocabulary but in no caption, so their embeddings stay as initialised (like "sks" in CLIP).
RARE_TOKENS = ("sks", "zwx", "qlv", "vrn")
ATTRIBUTES = ("size", "colour", "pattern", "position", "setting")

_SIZE_RADIUS = {"small": 0.15, "medium": 0.21, "big": 0.27}  # fraction of the image side
_POSITION_X = {"left": 0.3, "center": 0.5, "right": 0.7}


@dataclass(frozen=True)
class Scene:
    """Everything that decides a picture. `seed` drives the small jitters (colour shade, placement, texture)."""

    noun: str
    colour: str
    pattern: str = "plain"
    pattern_colour: str = "white"
    stripe_angle: int = 0
    size: str = "medium"
    position: str = "center"
    setting: str = "sand"
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {"noun": NOUNS, "colour": COLOURS, "pattern": PATTERNS, "pattern_colour": {**COLOURS, **NEUTRALS},
                  "stripe_angle": OPEN_STRIPE_ANGLES, "size": SIZES, "position": POSITIONS, "setting": SETTINGS}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Scene.{name}: {getattr(self, name)!r} is not one of {list(allowed)}.")

    @property
    def look(self) -> tuple:
        """The object's appearance, whatever the setting, placement and seed."""
        detail = (self.pattern_colour, self.stripe_angle if self.pattern == "striped" else None)
        return (self.noun, self.colour, self.pattern) + (detail if self.pattern != "plain" else ())


SUBJECT = Scene(noun="box", colour="blue", pattern="striped", pattern_colour="orange", stripe_angle=45)


def vocabulary() -> list[str]:
    """Every word of every caption, plus the rare identifier tokens, in a fixed order."""
    words = ["a", "the", "on", "in", "by", "brick", "wall", "left", "right", "small", "big"]
    words += [*NOUNS, *COLOURS, *PATTERNS, "sand", "grass", "snow", *RARE_TOKENS]
    assert len(set(words)) == len(words)
    return words


# --------------------------------------------------------------------------------------------------------------
# Sampling scenes and captions


def is_base_world(scene: Scene) -> bool:
    """True when the text-to-image model's pretraining distribution can produce the scene."""
    if scene.pattern != "plain" and scene.pattern_colour not in NEUTRALS:
        return False
    if scene.pattern == "striped" and scene.stripe_angle not in BASE_STRIPE_ANGLES:
        return False
    return not (scene.noun == SUBJECT.noun and scene.colour == SUBJECT.colour and scene.pattern == SUBJECT.pattern)


def sample_scene(rng: np.random.Generator, world: str = "base") -> Scene:
    """A random scene of the base world (pretraining the text-to-image model) or the open world (backbones)."""
    if world not in ("base", "open"):
        raise ValueError(f"world must be 'base' or 'open', got {world!r}.")
    while True:
        colour = _pick(rng, tuple(COLOURS))
        if world == "base":
            pattern_colour = _pick(rng, tuple(NEUTRALS))
            angle = _pick(rng, BASE_STRIPE_ANGLES)
        else:
            pattern_colour = _pick(rng, tuple(c for c in (*COLOURS, *NEUTRALS) if c != colour))
            angle = _pick(rng, OPEN_STRIPE_ANGLES)
        scene = Scene(noun=_pick(rng, NOUNS), colour=colour, pattern=_pick(rng, PATTERNS),
                      pattern_colour=pattern_colour, stripe_angle=angle, size=_pick(rng, SIZES),
                      position=_pick(rng, POSITIONS), setting=_pick(rng, SETTINGS), seed=int(rng.integers(2**31)))
        if world == "open" or is_base_world(scene):
            return scene


def restage(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same object (same look) in a new setting, size, position and seed: another view of it."""
    return replace(scene, size=_pick(rng, SIZES), position=_pick(rng, POSITIONS), setting=_pick(rng, SETTINGS),
                   seed=int(rng.integers(2**31)))


def _pick(rng: np.random.Generator, options: tuple):
    return options[int(rng.integers(len(options)))]


def caption(scene: Scene, mention: frozenset[str] | set[str] = frozenset(ATTRIBUTES)) -> str:
    """The scene described with the attributes in `mention`; unsaid values (medium, center) are left out."""
    words = ["a"]
    if "size" in mention and scene.size != "medium":
        words.append(scene.size)
    if "colour" in mention:
        words.append(scene.colour)
    if "pattern" in mention:
        words.append(scene.pattern)
    words.append(scene.noun)
    if "position" in mention and scene.position in POSITION_PHRASES:
        words.append(POSITION_PHRASES[scene.position])
    if "setting" in mention:
        words.append(SETTING_PHRASES[scene.setting])
    return " ".join(words)


def sample_caption(scene: Scene, rng: np.random.Generator, keep: float = 0.6, bare: float = 0.1) -> str:
    """A caption naming each attribute with probability `keep`; with probability `bare` only the noun."""
    if rng.random() < bare:
        return caption(scene, frozenset())
    return caption(scene, frozenset(a for a in ATTRIBUTES if rng.random() < keep))


# --------------------------------------------------------------------------------------------------------------
# Rendering


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image of `size` x `size` pixels."""
    return Image.fromarray(render_array(scene, size))


def render_array(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8 pixels of the scene; drawn at twice the size and averaged down for smooth edges."""
    rng = np.random.default_rng(scene.seed)
    big = size * SUPERSAMPLE
    canvas = _background(scene.setting, big, rng)
    cx = _POSITION_X[scene.position] + rng.uniform(-0.04, 0.04)
    cy = 0.56 + rng.uniform(-0.05, 0.05)
    radius = _SIZE_RADIUS[scene.size] * (1 + rng.uniform(-0.06, 0.06))
    ys, xs = (np.mgrid[0:big, 0:big] + 0.5) / big
    u, v = (xs - cx) / radius, (ys - cy) / radius
    _draw_shadow(canvas, u, v)
    inside = _shape_mask(scene.noun, u, v, 1.0)
    edge = inside & ~_shape_mask(scene.noun, u, v, 0.9)
    body = _shade(np.array(COLOURS[scene.colour], float) + rng.uniform(-12, 12, 3), scene.noun, u, v)
    marks = _pattern_mask(scene, u, v)
    pattern_rgb = np.array({**COLOURS, **NEUTRALS}[scene.pattern_colour], float)
    obj = np.where(marks[..., None], _shade(pattern_rgb, scene.noun, u, v), body)
    obj = np.where(edge[..., None], obj * 0.55, obj)
    canvas = np.where(inside[..., None], obj, canvas)
    small = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def _shape_mask(noun: str, u: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    u, v = u / scale, v / scale
    if noun == "ball":
        return u * u + v * v <= 1.0
    if noun == "box":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if noun == "cone":
        return (v >= -1.0) & (v <= 0.9) & (np.abs(u) <= (v + 1.0) * 0.5)
    if noun == "ring":
        # In unscaled units the hole grows as the outline shrinks, so the edge band runs along both rims.
        r2 = (u * u + v * v) * scale * scale
        return (r2 <= scale * scale) & (r2 >= (0.55 / scale) ** 2)
    raise ValueError(f"unknown noun {noun!r}")


def _shade(rgb: np.ndarray, noun: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Light from the upper left: balls and cones get a gradient, flat boxes and rings a faint one."""
    strength = 0.28 if noun in ("ball", "cone") else 0.1
    light = 1.0 + strength * np.clip(-(u + v) / 2, -1, 1)
    return np.clip(rgb[None, None, :] * light[..., None], 0, 255)


def _pattern_mask(scene: Scene, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if scene.pattern == "striped":
        theta = np.deg2rad(scene.stripe_angle)
        w = u * np.sin(theta) + v * np.cos(theta)  # angle 0: horizontal bands
        return np.floor(w * 3.0 + 0.25) % 2 == 0
    if scene.pattern == "dotted":
        du, dv = (u * 2.2) % 1.0 - 0.5, (v * 2.2) % 1.0 - 0.5
        return du * du + dv * dv <= 0.2**2
    return np.zeros(u.shape, dtype=bool)


def _draw_shadow(canvas: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    shadow = ((u / 1.0) ** 2 + ((v - 0.95) / 0.18) ** 2) <= 1.0
    canvas[shadow] *= 0.7


def _background(setting: str, size: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0.0, 1.0, (size, size))
    if setting == "sand":
        base = np.array([222.0, 196.0, 140.0])
        speckle = (rng.random((size, size)) < 0.04)[..., None] * -45.0
        return np.clip(base + 8.0 * noise[..., None] + speckle, 0, 255)
    if setting == "grass":
        blades = rng.normal(0.0, 1.0, size)[None, :] * 18.0  # columns of light and dark blades
        base = np.array([70.0, 145.0, 55.0])
        return np.clip(base + (blades + 10.0 * noise)[..., None] * np.array([0.5, 1.0, 0.4]), 0, 255)
    if setting == "snow":
        base = np.array([236.0, 240.0, 248.0])
        drift = np.sin(np.linspace(0, 3 * np.pi, size) + rng.uniform(0, 2 * np.pi))[:, None] * 6.0
        return np.clip(base + (drift + 3.0 * noise)[..., None] * np.array([1.0, 1.0, 0.6]), 0, 255)
    if setting == "bricks":
        return _bricks(size, rng, noise)
    raise ValueError(f"unknown setting {setting!r}")


def _bricks(size: int, rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
    row_h = size // 8
    ys, xs = np.mgrid[0:size, 0:size]
    row = ys // row_h
    offset = (row % 2) * (row_h * 1.2) + rng.integers(0, row_h * 2)
    mortar = (ys % row_h < 2) | (((xs + offset) % (row_h * 2.4)).astype(int) < 2)
    brick = np.array([165.0, 70.0, 50.0]) + 10.0 * noise[..., None]
    return np.clip(np.where(mortar[..., None], np.array([205.0, 200.0, 190.0]), brick), 0, 255)
