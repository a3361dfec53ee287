"""The evaluation subcommands of ``opcm``: demo, eval, reproduce, heads, plot.

``add_subcommands(subparsers)`` registers them on the main CLI's argparse subparsers; each handler
returns an exit code, and user errors raise ``opcm_ext.errors.InputError`` subclasses (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opcm_ext.errors import ConfigError

__all__ = ["add_subcommands"]

_METHODS = ("opcm", "task_arithmetic", "ties", "average")


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in _METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {', '.join(_METHODS)}")
    return names


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _lam(text: str) -> float:
    import math

    v = float(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _head_options(parser) -> None:
    """--class-names and --heads, shared by eval and reproduce."""
    parser.add_argument("--class-names", choices=["fusionbench", "dataset"], default="fusionbench",
                        help="fusionbench (default): the curated class names and templates FusionBench trained the "
                             "public checkpoints with, for the paper's 20 tasks (checked against each test set's "
                             "class count); dataset: the test set's folder / ClassLabel names")
    parser.add_argument("--heads", default=None, metavar="FILE",
                        help="precomputed zero-shot heads: a .safetensors file with one (classes, dim) tensor per "
                             "task (`opcm heads` writes one); replaces building them from the CLIP text tower")


def add_subcommands(sub) -> None:
    """Register ``demo``, ``eval``, ``reproduce``, ``heads`` and ``plot`` on an argparse subparsers object."""
    d = sub.add_parser("demo", help="merge the shipped example zoo with OPCM and the baselines; table + plots",
                       description="Merge the example zoo (a small CLIP vision model fine-tuned on 8 digit tasks) "
                                   "with OPCM, continual Task Arithmetic, TIES and averaging over several task "
                                   "orders; print a Table-1-style table and write report.json and PNG plots.")
    d.add_argument("--out", default="opcm-demo", help="folder for report.json and the plots (default: ./opcm-demo)")
    d.add_argument("--orders", type=_positive, default=None, help="number of shuffled task orders (default: 3)")
    d.add_argument("--seed", type=int, default=0, help="seed of the order shuffles (default: 0)")
    d.add_argument("--methods", type=_methods, default=None, help=f"comma list (default: {','.join(_METHODS)})")
    d.add_argument("--tasks", default=None, help="comma list of zoo tasks (default: all)")
    d.add_argument("--zoo", default=None, help="a zoo folder rebuilt with python -m opcm_ext.zoo.build (default: shipped)")
    d.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu; the zoo is tiny)")
    d.add_argument("--threads", type=_positive, default=None,
                   help="torch CPU threads (default: the cores idle now, from the load average)")
    d.add_argument("--keep-checkpoints", default=None, metavar="DIR",
                   help="keep every intermediate merged checkpoint under DIR (default: temporary)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    d.set_defaults(func=_cmd_demo)

    e = sub.add_parser("eval", help="accuracy of one checkpoint on zoo tasks or on CLIP test-set folders",
                       description="Evaluate one checkpoint. Zoo tasks: `opcm eval CKPT --zoo-tasks all`. Real CLIP "
                                   "checkpoints: `opcm eval CKPT --clip-model CLIP_DIR --datasets DIR --tasks mnist,svhn`.")
    e.add_argument("checkpoint", help="HF model folder or .safetensors file")
    e.add_argument("--zoo-tasks", default=None, help="'all' or a comma list of the zoo's tasks")
    e.add_argument("--zoo", default=None, help="zoo folder (default: shipped)")
    e.add_argument("--clip-model", default=None, help="pre-trained full CLIP model folder (zero-shot heads, projection)")
    e.add_argument("--datasets", default=None, help="folder holding one test-set folder per task")
    e.add_argument("--tasks", default=None, help="comma list of task names (dataset folder names), or 8/14/20")
    e.add_argument("--split", default="test")
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=_positive, default=128)
    e.add_argument("--workers", type=int, default=0, help="image decoding worker processes")
    e.add_argument("--max-examples", type=_positive, default=None, help="evaluate on a subset per task")
    e.add_argument("--json", action="store_true", help="print {task: accuracy} as JSON")
    e.add_argument("--no-progress", action="store_true")
    _head_options(e)
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser("reproduce", help="the paper's Table 1 from local public checkpoints and test sets",
                       description="Continual merging of the public fine-tuned CLIP checkpoints (named like "
                                   "clip-vit-base-patch32_<task>) over shuffled orders, evaluated with zero-shot "
                                   "heads after every step; prints Table 1's rows for OPCM and the baselines. "
                                   "Nothing is downloaded.")
    r.add_argument("--checkpoints", required=True,
                   help="folder with <model>/ (pre-trained full CLIP) and <model>_<task>/ (fine-tuned) folders")
    r.add_argument("--datasets", required=True, help="folder with one test-set folder per task")
    r.add_argument("--tasks", default="8", help="8, 14, 20 (the paper's sets) or a comma list (default: 8)")
    r.add_argument("--orders", type=_positive, default=10, help="shuffled task orders (default: 10, as the paper)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--methods", type=_methods, default=None, help=f"comma list (default: {','.join(_METHODS)})")
    r.add_argument("--lam", type=_lam, default=None,
                   help="λ of continual Task Arithmetic and TIES (default: the paper's, by task count: 0.3 for 8 "
                        "tasks, 0.1 for 14 and 20, from its appendix C.1.1; TIES uses Task Arithmetic's λ)")
    r.add_argument("--compat", default=None, choices=["paper", "fusionbench", "release"],
                   help="OPCM's mode (default paper); release: as the code behind the paper's Table 1")
    r.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="each merge step's working-set bound, as `opcm merge` (default 1GiB; --compat "
                        "fusionbench/release also hold 4 bytes per parameter: raise it for ViT-L/14)")
    r.add_argument("--model-name", default=None, help="checkpoint name prefix (default: inferred, e.g. clip-vit-base-patch32)")
    r.add_argument("--base", default=None, help="pre-trained full CLIP model folder (default: CHECKPOINTS/<model>)")
    r.add_argument("--out", default=None, help="folder for report.json and plots")
    r.add_argument("--device", default="auto")
    r.add_argument("--batch-size", type=_positive, default=128)
    r.add_argument("--workers", type=int, default=0, help="image decoding worker processes")
    r.add_argument("--max-examples", type=_positive, default=None, help="a subset per test set (quick checks)")
    r.add_argument("--cache-dir", default=None, help="keep preprocessed test sets here (uint8 .npy memmaps)")
    r.add_argument("--keep-checkpoints", default=None, metavar="DIR",
                   help="keep every intermediate merged checkpoint under DIR (default: temporary)")
    r.add_argument("--work-dir", default=None, help="where temporary checkpoints go (default: system temp)")
    r.add_argument("--split", default="test")
    r.add_argument("--no-progress", action="store_true")
    _head_options(r)
    r.set_defaults(func=_cmd_reproduce)

    h = sub.add_parser("heads", help="precompute zero-shot heads of the paper's tasks into a .safetensors file",
                       description="Build each task's zero-shot head from FusionBench's curated class names and "
                                   "templates through a pre-trained CLIP model's text tower (no test set needed); "
                                   "use the file with `opcm reproduce --heads` or `opcm eval --heads`.")
    h.add_argument("--clip-model", required=True, help="pre-trained full CLIP model folder (text tower, tokenizer)")
    h.add_argument("--tasks", default="20", help="8, 14, 20 (the paper's sets) or a comma list (default: 20)")
    h.add_argument("-o", "--out", required=True, help="output .safetensors file")
    h.add_argument("--device", default="auto")
    h.set_defaults(func=_cmd_heads)

    p = sub.add_parser("plot", help="draw the figures of a saved report.json")
    p.add_argument("report", help="report.json (or the folder holding it)")
    p.add_argument("--out", default=None, help="output folder (default: the report's folder)")
    p.add_argument("--table", action="store_true", help="also print the table")
    p.set_defaults(func=_cmd_plot)


def _cmd_demo(a) -> int:
    from opcm_ext.demo import DEMO_ORDERS, run_demo

    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()] if a.tasks else None
    run_demo(a.out, orders=a.orders or DEMO_ORDERS, methods=a.methods, seed=a.seed, zoo=a.zoo, tasks=tasks,
             progress=not a.no_progress, device=a.device, threads=a.threads or "idle", keep_dir=a.keep_checkpoints)
    return 0


def _cmd_eval(a) -> int:
    ckpt = Path(a.checkpoint)
    if a.zoo_tasks is not None and (a.datasets or a.clip_model):
        raise ConfigError("give either --zoo-tasks or --clip-model/--datasets/--tasks, not both")
    if a.zoo_tasks is not None:
        from opcm_ext.zoo import Zoo

        z = Zoo(a.zoo)
        tasks = z.tasks if a.zoo_tasks == "all" else [t.strip() for t in a.zoo_tasks.split(",") if t.strip()]
        acc = z.evaluator(device=a.device).evaluate(ckpt, tasks)
    else:
        if not (a.clip_model and a.datasets and a.tasks):
            raise ConfigError("evaluating on test-set folders needs --clip-model, --datasets and --tasks "
                              "(or use --zoo-tasks for the example zoo)")
        from opcm_ext.evaluation.reproduce import ClipTaskEvaluator, MissingInputsError, _find, _spellings, resolve_tasks

        tasks = resolve_tasks(a.tasks)
        root = Path(a.datasets)
        data, missing = {}, []
        for t in tasks:
            d = _find(root, _spellings(t)) if root.is_dir() else None
            (missing.append(str(root / t)) if d is None else data.__setitem__(t, d))
        if missing:
            raise MissingInputsError("missing dataset folder(s):\n  - " + "\n  - ".join(missing))
        import tempfile

        with tempfile.TemporaryDirectory(prefix="opcm-eval-") as tmp:  # test sets memmapped, not held in RAM
            ev = ClipTaskEvaluator(a.clip_model, data, device=a.device, batch_size=a.batch_size, workers=a.workers,
                                   max_examples=a.max_examples, split=a.split, progress=not a.no_progress,
                                   cache_dir=tmp, class_names=a.class_names, heads=a.heads)
            acc = ev.evaluate(ckpt, tasks)
            del ev
    if a.json:
        print(json.dumps(acc, indent=1))
    else:
        w = max(len(t) for t in acc)
        for t, v in acc.items():
            print(f"{t:<{w}}  {100 * v:6.2f}")
        print(f"{'mean':<{w}}  {100 * sum(acc.values()) / len(acc):6.2f}")
    return 0


def _cmd_reproduce(a) -> int:
    from opcm_ext.evaluation.report import format_final_accuracies, format_table, save_report
    from opcm_ext.evaluation.reproduce import run_reproduce

    report = run_reproduce(a.checkpoints, a.datasets, tasks=a.tasks, num_orders=a.orders, seed=a.seed,
                           methods=a.methods, model_name=a.model_name, base=a.base, device=a.device,
                           batch_size=a.batch_size, workers=a.workers, max_examples=a.max_examples,
                           cache_dir=a.cache_dir, keep_dir=a.keep_checkpoints, work_dir=a.work_dir,
                           progress=not a.no_progress, split=a.split, lam=a.lam, class_names=a.class_names,
                           heads=a.heads, compat=a.compat, memory_budget=a.memory_budget)
    lam = report.get("meta", {}).get("lam", {})
    print(format_table(report, title=f"Table 1 ({Path(report['base']).name}): {len(report['tasks'])} tasks, "
                                     f"{len(report['orders'])} orders (seed {a.seed}); baselines' λ = "
                                     f"{lam.get('value')} ({lam.get('source')})"))
    print()
    print(format_final_accuracies(report))
    if a.out:
        from opcm_ext.plots import plot_report

        out = Path(a.out)
        save_report(report, out / "report.json")
        files = plot_report(report, out)
        print(f"wrote {out / 'report.json'}" + "".join(f", {f.name}" for f in files), file=sys.stderr)
    return 0


def _cmd_heads(a) -> int:
    from opcm_ext.evaluation.clip_eval import resolve_device
    from opcm_ext.evaluation.heads import build_task_heads
    from opcm_ext.evaluation.prompts import prompts_for, save_heads
    from opcm_ext.evaluation.reproduce import resolve_tasks

    tasks = resolve_tasks(a.tasks)
    heads = build_task_heads(a.clip_model, tasks, device=resolve_device(a.device))
    meta = {"clip_model": str(a.clip_model), "sources": {t: prompts_for(t).source for t in tasks}}
    out = save_heads(heads, a.out, meta=meta)
    for t, h in heads.items():
        print(f"{t:<20} {h.shape[0]:>4} classes x {h.shape[1]}")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _cmd_plot(a) -> int:
    from opcm_ext.evaluation.report import format_table, load_report
    from opcm_ext.plots import plot_report

    src = Path(a.report)
    report = load_report(src)
    out = Path(a.out) if a.out else (src if src.is_dir() else src.parent)
    files = plot_report(report, out)
    if a.table:
        print(format_table(report))
    for f in files:
        print(f)
    return 0
