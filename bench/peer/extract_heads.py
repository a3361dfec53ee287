"""Regenerate opcm_ext/evaluation/fusionbench_heads.json from FusionBench (run INSIDE the peer venv).

FusionBench keeps, per task, a curated list of class names and a list of prompt templates (Python
lambdas) in ``fusion_bench/tasks/clip_classification/<module>.py``; the public fine-tuned CLIP
checkpoints of the paper were trained against heads built from exactly these. This script reads
them through FusionBench's own ``get_classnames_and_templates`` and writes them as plain data: each
template is rendered with a placeholder and stored as a ``{}`` format string.

    .venv-peer/bin/python bench/peer/extract_heads.py [--out opcm_ext/evaluation/fusionbench_heads.json]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The paper's 20 tasks, in its order, spelled as FusionBench's task factory knows them.
TASKS = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd",
         "oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100",
         "cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2")
# The git commit of the tag v0.2.33 in the FusionBench repository (the installed package's sources
# are identical to that tag's files).
COMMIT_V0_2_33 = "2d147c0c2296403c53d03eca6b59fc07ecf15fb1"
_MARK = "\x00"


def _template_string(fn) -> str:
    text = fn(_MARK)
    if text.count(_MARK) != 1 or "{" in text or "}" in text:
        raise SystemExit(f"template {fn} does not render to one placeholder: {text!r}")
    if fn("AbC") != text.replace(_MARK, "AbC"):
        raise SystemExit(f"template {fn} transforms the class name; it cannot be stored as a format string")
    return text.replace(_MARK, "{}")


def main(argv: list[str] | None = None) -> int:
    """Write the JSON file."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "opcm_ext" / "evaluation" / "fusionbench_heads.json"))
    a = p.parse_args(argv)

    from importlib.metadata import version

    from fusion_bench.tasks.clip_classification import CLIPTemplateFactory, get_classnames_and_templates

    fb_version = version("fusion-bench")
    tasks = {}
    for task in TASKS:
        names, templates = get_classnames_and_templates(task)
        info = CLIPTemplateFactory._dataset_mapping[task]
        name = info if isinstance(info, str) else info["module"]  # '.mnist' or already a full module name
        module = importlib.import_module("fusion_bench.tasks.clip_classification" + name if name.startswith(".")
                                         else name)
        path = Path(inspect.getfile(module))
        rel = "fusion_bench/" + path.relative_to(Path(inspect.getfile(importlib.import_module("fusion_bench"))).parent).as_posix()
        tasks[task] = {"source": rel, "classnames": [str(n) for n in names],
                       "templates": [_template_string(t) for t in templates]}
    doc = {
        "format": "opcm-ext/zero-shot-prompts",
        "version": 1,
        "source": {
            "repository": "tanganke/fusion_bench",
            "package": f"fusion-bench {fb_version}",
            "tag": f"v{fb_version}",
            "commit": COMMIT_V0_2_33 if fb_version == "0.2.33" else None,
            "what": "class names and prompt templates of fusion_bench/tasks/clip_classification, read through "
                    "get_classnames_and_templates(task); each template lambda rendered as a '{}' format string",
            "generated_by": "bench/peer/extract_heads.py",
        },
        "tasks": tasks,
    }
    Path(a.out).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {a.out}: {len(tasks)} tasks", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
