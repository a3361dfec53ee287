"""Local image-classification test sets and CLIP preprocessing (PIL + numpy; no torchvision).

A task's dataset is a local folder, either
- an ImageFolder tree: ``<dir>/<class>/<image>`` or ``<dir>/<split>/<class>/<image>``; class
  names are the folder names (sorted, '_' shown as a space) unless ``classnames.txt`` (one per
  line, in sorted-folder order) sits next to the class folders or in ``<dir>``; or
- a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``DatasetDict`` with a
  ``test`` split, or a single ``Dataset``); class names come from its ``ClassLabel`` feature.
  Reading it needs the optional ``datasets`` package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from opcm_ext.errors import ConfigError, InputError

__all__ = ["IMAGE_EXTENSIONS", "DatasetError", "ImageDataset", "ImageFolderDataset", "HFDiskDataset",
           "open_dataset", "is_dataset_folder", "ClipPreprocessor", "PreprocessedSet", "preprocess"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DatasetError(InputError):
    """A dataset folder is missing, empty, or in a layout we cannot read."""


class ImageDataset:
    """Indexable (PIL image, label) pairs with class names."""

    classnames: list[str]
    source: str

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def load(self, i: int):  # pragma: no cover - interface
        raise NotImplementedError


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _read_classnames(path: Path, n: int) -> list[str] | None:
    for f in (path / "classnames.txt", path.parent / "classnames.txt"):
        if f.exists():
            names = [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
            if len(names) != n:
                raise DatasetError(f"{f}: {len(names)} class names for {n} class folders")
            return names
    return None


class ImageFolderDataset(ImageDataset):
    """``root/<class>/<image files>``; labels follow the sorted class folder names."""

    def __init__(self, root: str | Path):
        root = Path(root)
        self.source = str(root)
        dirs = _class_dirs(root)
        if not dirs:
            raise DatasetError(f"{root}: no class folders (expected {root}/<class>/<image>)")
        self.samples: list[tuple[Path, int]] = []
        for label, d in enumerate(dirs):
            self.samples.extend((f, label) for f in sorted(d.iterdir()) if _is_image(f))
        if not self.samples:
            raise DatasetError(f"{root}: the class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.classnames = _read_classnames(root, len(dirs)) or [d.name.replace("_", " ") for d in dirs]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            return im.convert("RGB"), label


class HFDiskDataset(ImageDataset):
    """A ``datasets.load_from_disk`` folder; picks the image and ClassLabel columns."""

    def __init__(self, path: str | Path, split: str = "test"):
        try:
            import datasets
        except ImportError as exc:
            raise DatasetError(f"{path} is a Hugging Face datasets folder; reading it needs the optional "
                               "`datasets` package (pip install datasets), or convert it to an ImageFolder tree") from exc
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DatasetError(f"{path}: no {split!r} split (it has: {', '.join(ds)})")
            ds = ds[split]
        self.source = f"{path} [{split}]"
        feats = ds.features
        image_col = next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
        label_col = next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
        if image_col is None or label_col is None:
            raise DatasetError(f"{path}: needs an Image column and a ClassLabel column (features: {dict(feats)})")
        self.ds, self.image_col, self.label_col = ds, image_col, label_col
        self.classnames = [n.replace("_", " ") for n in feats[label_col].names]

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, i: int):
        row = self.ds[int(i)]
        return row[self.image_col].convert("RGB"), int(row[self.label_col])


def _is_hf_folder(p: Path) -> bool:
    return (p / "dataset_dict.json").exists() or (p / "state.json").exists()


def is_dataset_folder(path: str | Path, split: str = "test") -> bool:
    """Whether ``path`` looks like a readable dataset folder (without opening every file)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if _is_hf_folder(p):
        return True
    root = p / split if (p / split).is_dir() else p
    return any(d.is_dir() for d in root.iterdir())


def open_dataset(path: str | Path, split: str = "test") -> ImageDataset:
    """Open a task's test set folder (ImageFolder tree, with or without a split level, or HF ``save_to_disk``)."""
    p = Path(path)
    if not p.is_dir():
        raise DatasetError(f"{p}: no such dataset folder")
    if _is_hf_folder(p):
        return HFDiskDataset(p, split)
    if (p / split).is_dir():
        return ImageFolderDataset(p / split)
    return ImageFolderDataset(p)


def _size_pair(v, what: str) -> tuple[int, int] | int:
    if isinstance(v, int):
        return v
    if isinstance(v, dict):
        if "shortest_edge" in v:
            return int(v["shortest_edge"])
        if "height" in v and "width" in v:
            return int(v["height"]), int(v["width"])
    raise ConfigError(f"unsupported {what} in preprocessor_config.json: {v!r}")


class ClipPreprocessor:
    """CLIPImageProcessor's steps: RGB, resize (shortest edge, bicubic), center crop, rescale, normalize."""

    def __init__(self, size=224, crop_size=224, mean=(0.48145466, 0.4578275, 0.40821073),
                 std=(0.26862954, 0.26130258, 0.27577711), resample: int = 3, do_resize: bool = True,
                 do_center_crop: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True):
        self.size = _size_pair(size, "size")
        crop = _size_pair(crop_size, "crop_size")
        self.crop = (crop, crop) if isinstance(crop, int) else crop
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.resample, self.do_resize, self.do_center_crop = resample, do_resize, do_center_crop
        self.rescale_factor, self.do_normalize = rescale_factor, do_normalize

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "ClipPreprocessor":
        """Read ``preprocessor_config.json`` from a model folder (CLIP defaults when it has none)."""
        f = Path(path) / "preprocessor_config.json"
        if not f.exists():
            cfg_file = Path(path) / "config.json"
            if cfg_file.exists():
                raw = json.loads(cfg_file.read_text())
                size = (raw.get("vision_config") or raw).get("image_size", 224)
                return cls(size=size, crop_size=size)
            return cls()
        c = json.loads(f.read_text())
        kw = {}
        for src, dst in (("size", "size"), ("crop_size", "crop_size"), ("image_mean", "mean"), ("image_std", "std"),
                         ("resample", "resample"), ("do_resize", "do_resize"), ("do_center_crop", "do_center_crop"),
                         ("rescale_factor", "rescale_factor"), ("do_normalize", "do_normalize")):
            if src in c and c[src] is not None:
                kw[dst] = c[src]
        if c.get("do_rescale") is False:
            kw["rescale_factor"] = 1.0
        return cls(**kw)

    def to_uint8(self, image) -> np.ndarray:
        """PIL image -> (3, H, W) uint8 after resize and crop (the part worth caching)."""
        from PIL import Image

        im = image.convert("RGB")
        if self.do_resize:
            w, h = im.size
            if isinstance(self.size, int):
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = self.size, int(self.size * long / short)
                nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
            else:
                nh, nw = self.size
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), resample=Image.Resampling(self.resample))
        arr = np.asarray(im, dtype=np.uint8)
        if self.do_center_crop:
            ch, cw = self.crop
            h, w = arr.shape[:2]
            if h < ch or w < cw:  # pad like transformers' center_crop
                ph, pw = max(ch - h, 0), max(cw - w, 0)
                arr = np.pad(arr, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
                h, w = arr.shape[:2]
            top, left = int((h - ch) / 2), int((w - cw) / 2)
            arr = arr[top:top + ch, left:left + cw]
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def normalize(self, batch_u8: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> float pixel_values."""
        x = batch_u8.float() * self.rescale_factor
        return (x - self.mean) / self.std if self.do_normalize else x


class PreprocessedSet:
    """A test set after resize and crop: uint8 pixels (in memory, or a memmap in a cache folder) and labels."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, classnames: Sequence[str], source: str):
        self.pixels, self.labels, self.classnames, self.source = pixels, labels, list(classnames), source

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, preprocessor: ClipPreprocessor, batch_size: int):
        for i in range(0, len(self.labels), batch_size):
            x = torch.from_numpy(np.array(self.pixels[i:i + batch_size]))  # a writable copy of the slice
            yield preprocessor.normalize(x), torch.from_numpy(np.asarray(self.labels[i:i + batch_size]))


class _Loaded(torch.utils.data.Dataset):
    def __init__(self, ds: ImageDataset, pre: ClipPreprocessor, indices: Sequence[int]):
        self.ds, self.pre, self.indices = ds, pre, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, label = self.ds.load(self.indices[i])
        return torch.from_numpy(self.pre.to_uint8(image)), label


def preprocess(ds: ImageDataset, pre: ClipPreprocessor, *, cache_file: str | Path | None = None,
               max_examples: int | None = None, workers: int = 0, progress: bool = False,
               desc: str = "preprocess") -> PreprocessedSet:
    """Decode, resize and crop every test image once; memmapped to ``cache_file`` when given."""
    n = len(ds) if max_examples is None else min(len(ds), max_examples)
    if max_examples is not None and n < len(ds):  # a spread-out, deterministic subset, every class kept in order
        indices = [int(i) for i in np.linspace(0, len(ds) - 1, n).round()]
    else:
        indices = list(range(n))
    ch, cw = pre.crop if pre.do_center_crop else (None, None)
    loader = torch.utils.data.DataLoader(_Loaded(ds, pre, indices), batch_size=64, num_workers=workers)
    pixels = None
    labels = np.zeros(n, dtype=np.int64)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        import sys

        bar = tqdm(total=n, desc=desc, unit="img", file=sys.stderr, leave=False, dynamic_ncols=True)
    pos = 0
    for x, y in loader:
        if pixels is None:
            shape = (n, *x.shape[1:])
            if ch is None and any(t.shape != x.shape[1:] for t in x):
                raise DatasetError(f"{ds.source}: images differ in size and the preprocessor does not crop")
            pixels = (np.lib.format.open_memmap(str(cache_file), mode="w+", dtype=np.uint8, shape=shape)
                      if cache_file is not None else np.empty(shape, dtype=np.uint8))
        pixels[pos:pos + len(y)] = x.numpy()
        labels[pos:pos + len(y)] = y.numpy()
        pos += len(y)
        if bar is not None:
            bar.update(len(y))
    if bar is not None:
        bar.close()
    if pixels is None:
        raise DatasetError(f"{ds.source}: empty test set")
    return PreprocessedSet(pixels, labels, ds.classnames, ds.source)
