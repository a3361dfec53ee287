"""The zoo's tasks: scikit-learn's 8x8 digits under distinct transformations, one fixed head each.

The zoo's stand-in for CLIP's text encoder is a table of *concepts* (every class name any task
uses), each with a fixed random unit embedding (``build.concept_table``). Pre-training aligns
images of generically augmented upright digits with the digit concepts, as CLIP's pre-training
aligns images with text; a task's head is then the concept embeddings of its class names, fixed
and never trained, so the base model has a real (but weak) zero-shot accuracy on the transformed
digit tasks and chance accuracy on ``parity``, whose classes it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["IMAGE_SIZE", "PATCH_SIZE", "DIGITS", "CONCEPTS", "ZooTaskSpec", "TASKS", "TASK_NAMES", "upscale",
           "pretrain_augment"]

IMAGE_SIZE = 16
PATCH_SIZE = 4
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CONCEPTS: tuple[str, ...] = DIGITS + ("even", "odd")

# A fixed permutation of the 4x4 grid of 4x4-pixel patches (written out so that the task does not
# depend on numpy's generator stream staying the same across versions).
_PATCH_PERM = (13, 2, 9, 14, 6, 0, 11, 4, 15, 8, 3, 10, 1, 7, 12, 5)


def upscale(images8: np.ndarray) -> np.ndarray:
    """(N, 8, 8) grey in [0, 1] -> (N, 16, 16) by pixel doubling."""
    return np.kron(images8, np.ones((1, 2, 2), dtype=images8.dtype))


def _grey(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[:, None], 3, axis=1)


def _tint(g: np.ndarray, ink, background) -> np.ndarray:
    ink = np.asarray(ink, dtype=np.float32)[None, :, None, None]
    bg = np.asarray(background, dtype=np.float32)[None, :, None, None]
    return bg * (1.0 - g[:, None]) + ink * g[:, None]


def _shuffle_patches(g: np.ndarray) -> np.ndarray:
    n, p = g.shape[0], PATCH_SIZE
    k = IMAGE_SIZE // p
    blocks = g.reshape(n, k, p, k, p).transpose(0, 1, 3, 2, 4).reshape(n, k * k, p, p)
    blocks = blocks[:, list(_PATCH_PERM)]
    return blocks.reshape(n, k, k, p, p).transpose(0, 1, 3, 2, 4).reshape(n, IMAGE_SIZE, IMAGE_SIZE)


@dataclass(frozen=True)
class ZooTaskSpec:
    """One task: how its images are made from upscaled digits, and what its classes are."""

    name: str
    description: str
    classnames: tuple[str, ...]
    make: Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def _same_labels(fn):
    def make(g, y, rng):
        return fn(g, rng).astype(np.float32), y.astype(np.int64)

    return make


TASKS: tuple[ZooTaskSpec, ...] = (
    ZooTaskSpec("rotated", "digits rotated by 90 degrees clockwise", DIGITS,
                _same_labels(lambda g, rng: _grey(np.rot90(g, k=-1, axes=(1, 2))))),
    ZooTaskSpec("upside_down", "digits rotated by 180 degrees (a 6 looks like a 9)", DIGITS,
                _same_labels(lambda g, rng: _grey(np.rot90(g, k=2, axes=(1, 2))))),
    ZooTaskSpec("mirrored", "digits mirrored left to right", DIGITS,
                _same_labels(lambda g, rng: _grey(g[:, :, ::-1]))),
    ZooTaskSpec("inverted", "dark ink on a white background", DIGITS,
                _same_labels(lambda g, rng: _grey(1.0 - g))),
    ZooTaskSpec("shuffled", "the 16 image patches moved by one fixed permutation", DIGITS,
                _same_labels(lambda g, rng: _grey(_shuffle_patches(g)))),
    ZooTaskSpec("noisy", "strong Gaussian pixel noise (sigma 0.5)", DIGITS,
                _same_labels(lambda g, rng: _grey(np.clip(g + rng.normal(0.0, 0.5, g.shape), 0.0, 1.0)))),
    ZooTaskSpec("colored", "orange ink on a light blue background, low contrast", DIGITS,
                _same_labels(lambda g, rng: _tint(g, (0.95, 0.55, 0.1), (0.35, 0.55, 0.85)))),
    ZooTaskSpec("parity", "upright digits, label = even or odd (classes never seen in pre-training)",
                ("even", "odd"), lambda g, y, rng: (_grey(g).astype(np.float32), (y % 2).astype(np.int64))),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)


def pretrain_augment(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Generic augmentations for pre-training: shifts, contrast, mild noise, random ink/background tints."""
    n = g.shape[0]
    out = np.zeros_like(g)
    shifts = rng.integers(-2, 3, size=(n, 2))
    for i in range(n):
        out[i] = np.roll(g[i], tuple(shifts[i]), axis=(0, 1))
    out = out * rng.uniform(0.6, 1.0, size=(n, 1, 1))
    out = np.clip(out + rng.normal(0.0, 0.08, out.shape), 0.0, 1.0)
    ink = rng.uniform(0.5, 1.0, size=(n, 3)).astype(np.float32)
    bg = rng.uniform(0.0, 0.3, size=(n, 3)).astype(np.float32)
    rgb = bg[:, :, None, None] * (1.0 - out[:, None]) + ink[:, :, None, None] * out[:, None]
    return rgb.astype(np.float32)
