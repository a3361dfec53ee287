"""The example zoo shipped with the package: a small CLIP vision tower and its fine-tuned copies.

``Zoo()`` opens the shipped zoo (``opcm_ext/zoo/models``); ``Zoo(path)`` one rebuilt elsewhere with
``python -m opcm_ext.zoo.build --out PATH``. See ``docs/zoo.md``.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch

from opcm_ext.errors import CheckpointError

__all__ = ["Zoo", "default_zoo_dir", "write_preprocessor_config"]

_MEAN = [0.5, 0.5, 0.5]
_STD = [0.5, 0.5, 0.5]


def default_zoo_dir() -> Path:
    """Where the shipped zoo lives inside the installed package."""
    return Path(__file__).resolve().with_name("models")


def write_preprocessor_config(folder: Path) -> None:
    """A CLIP image-processor config for 16x16 images, so generic CLIP tools read the zoo's models."""
    from opcm_ext.zoo.tasks import IMAGE_SIZE

    cfg = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": IMAGE_SIZE},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": _MEAN,
        "image_std": _STD,
        "do_convert_rgb": True,
    }
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


class Zoo:
    """Paths, fixed heads and held-out test sets of a zoo folder, and accuracy of any checkpoint on its tasks."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_zoo_dir()
        missing = [p.name for p in (self.root / "base", self.root / "heads.safetensors",
                                    self.root / "test_sets.safetensors") if not p.exists()]
        if missing:
            raise CheckpointError(
                f"{self.root} is not a complete zoo (missing: {', '.join(missing)}); "
                "rebuild it with `python -m opcm_ext.zoo.build --out DIR`")

    @cached_property
    def info(self) -> dict:
        """The zoo.json written by the build (tasks, build options, measured accuracies)."""
        p = self.root / "zoo.json"
        return json.loads(p.read_text()) if p.exists() else {}

    @cached_property
    def _heads(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.root / "heads.safetensors"))

    @cached_property
    def _tests(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.root / "test_sets.safetensors"))

    @property
    def tasks(self) -> list[str]:
        """Task names in the zoo's canonical order."""
        if self.info.get("tasks"):
            return [t["name"] for t in self.info["tasks"]]
        from opcm_ext.zoo.tasks import TASK_NAMES

        return [t for t in TASK_NAMES if t in self._heads]

    @property
    def base(self) -> Path:
        """The pre-trained model folder."""
        return self.root / "base"

    def model(self, task: str) -> Path:
        """The folder of the model fine-tuned on ``task``."""
        self._check(task)
        return self.root / task

    @property
    def models(self) -> dict[str, Path]:
        return {t: self.model(t) for t in self.tasks}

    def head(self, task: str) -> torch.Tensor:
        """Task's fixed head: (num_classes, projection_dim), unit rows."""
        self._check(task)
        return self._heads[task].float()

    def test_set(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out (pixels uint8 (N, 3, H, W), labels int64 (N,))."""
        self._check(task)
        return self._tests[f"{task}.pixels"], self._tests[f"{task}.labels"]

    def _check(self, task: str) -> None:
        if task not in self._heads:
            raise CheckpointError(f"the zoo at {self.root} has no task {task!r}; it has: {', '.join(self.tasks)}")

    def evaluator(self, *, device: str = "cpu", batch_size: int = 1000) -> "ZooEvaluator":
        return ZooEvaluator(self, device=device, batch_size=batch_size)

    def accuracy(self, checkpoint: str | Path, task: str) -> float:
        """Accuracy of ``checkpoint`` on ``task`` with the task's fixed head."""
        return self.evaluator().evaluate(checkpoint, [task])[task]


class ZooEvaluator:
    """``evaluate(checkpoint, tasks) -> {task: accuracy}`` over the zoo's shipped test sets."""

    def __init__(self, zoo: Zoo, *, device: str = "cpu", batch_size: int = 1000):
        from opcm_ext.evaluation.clip_eval import EncoderLoader, resolve_device

        self.zoo = zoo
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self._loader = EncoderLoader(device=self.device)

    def evaluate(self, checkpoint: str | Path, tasks: list[str]) -> dict[str, float]:
        from opcm_ext.evaluation.clip_eval import accuracy_from_tensors

        encoder = self._loader.load(checkpoint)
        out = {}
        for t in tasks:
            pixels, labels = self.zoo.test_set(t)
            x = (pixels.float() / 255.0 - 0.5) / 0.5
            out[t] = accuracy_from_tensors(encoder, x, labels, self.zoo.head(t),
                                           batch_size=self.batch_size, device=self.device)
        return out
