"""The `opcm` command: argument parsing and exit codes only.

Exit codes: 0 success, 2 bad input (one readable line; details with -v),
1 internal failure (with a hint to report it), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from typing import Sequence

from ._version import __version__
from .errors import InputError, OpcmError

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors are bad input too
        self.print_usage(sys.stderr)
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message}\n")


def _merge_options(p: argparse.ArgumentParser, outputs: bool = True) -> None:
    g = p.add_argument_group("merge options")
    g.add_argument("--method", default=None, help="opcm (default), task_arithmetic, ties or average; "
                   "a continued merge defaults to the method recorded in MERGED")
    g.add_argument("--alpha", type=float, default=None, help="OPCM split-rank threshold in (0, 1] (default 0.5)")
    g.add_argument("--lam", type=float, default=None, help="scaling λ of task_arithmetic and ties (default 0.3, the paper's value for 8 tasks; it uses 0.1 for 14 and 20)")
    g.add_argument("--keep", type=float, default=None, help="ties: fraction of entries kept per row (0.2)")
    g.add_argument("--compat", default=None, choices=["paper", "fusionbench", "release"],
                   help="opcm: paper (default: the paper's math), fusionbench (as FusionBench's OPCM: parameters "
                        "owned by non-leaf modules are not merged) or release (also keeps P's diagonal, as the "
                        "code behind the paper's Table 1)")
    g.add_argument("--memory-budget", default="1GiB", metavar="SIZE",
                   help="bound on the working set, e.g. 512MB, 2GiB (default 1GiB)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to compute (default auto)")
    g.add_argument("--backend", default="auto", choices=["auto", "native", "torch"],
                   help="kernels: native (compiled, after a self-test), torch (plain torch ops) or auto (default)")
    g.add_argument("--gpu-memory-budget", default=None, metavar="SIZE",
                   help="bound on GPU memory with --device cuda (default: 80%% of the free memory)")
    g.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="where the groups of a pass run: this process (default) or tasks on a Ray cluster")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to join with --executor ray (default: $RAY_ADDRESS, else a local instance)")
    g.add_argument("--project", action="append", default=[], metavar="REGEX",
                   help="force tensors whose name matches REGEX to be projected (repeatable)")
    g.add_argument("--average", action="append", default=[], metavar="REGEX",
                   help="force tensors whose name matches REGEX to be averaged (repeatable)")
    g.add_argument("--allow-duplicate", action="store_true", help="allow merging a model that is already merged")
    g.add_argument("--allow-param-change", action="store_true",
                   help="allow continuing a merge with another method or other parameters")
    if outputs:  # `opcm watch` always continues its OUT and logs JSON lines
        g.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
        g.add_argument("--json", action="store_true", help="print the report(s) as JSON on stdout")
    g.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def _options(a: argparse.Namespace) -> dict:
    opts = dict(
        method=a.method, memory_budget=a.memory_budget, device=a.device, backend=a.backend,
        gpu_memory_budget=a.gpu_memory_budget, executor=a.executor, ray_address=a.ray_address,
        progress=not a.no_progress, allow_duplicate=a.allow_duplicate, allow_param_change=a.allow_param_change,
        projected=a.project, averaged=a.average,
    )
    for name in ("alpha", "lam", "keep", "compat"):
        v = getattr(a, name)
        if v is not None:
            opts[name] = v
    return opts


def _print_reports(reports, as_json: bool) -> None:
    if as_json:
        data = [r.to_dict() for r in reports]
        print(json.dumps(data if len(data) > 1 else data[0], indent=2, sort_keys=True))
    else:
        for r in reports:
            print(r.summary())
            for w in r.warnings:
                print(f"  warning: {w}", file=sys.stderr)


def _cmd_merge(a: argparse.Namespace) -> int:
    from .api import merge_sequence

    reports = merge_sequence(a.base, a.models, a.out, overwrite=a.overwrite, **_options(a))
    _print_reports(reports, a.json)
    return EXIT_OK


def _cmd_step(a: argparse.Namespace) -> int:
    if not a.allow_duplicate:  # before torch is imported: a duplicate is refused in a fraction of a step
        from .precheck import duplicate_error

        err = duplicate_error(a.base, a.merged, a.new, out=a.out, progress=not a.no_progress)
        if err is not None:
            raise err
    from .api import merge_stream

    report = merge_stream(a.base, a.merged, a.new, a.out, overwrite=a.overwrite, **_options(a))
    _print_reports([report], a.json)
    return EXIT_OK


def _cmd_watch(a: argparse.Namespace) -> int:
    from .watch import main as watch_main

    return watch_main(a, _options(a))


def _cmd_doctor(a: argparse.Namespace) -> int:
    from .doctor import format_report, report

    d = report()
    print(json.dumps(d, indent=2, sort_keys=True, default=str) if a.json else format_report(d))
    return EXIT_OK


def _cmd_info(a: argparse.Namespace) -> int:
    from .api import state_of
    from .io import CheckpointReader

    with CheckpointReader(a.checkpoint) as r:
        state = state_of(r, a.checkpoint)
        n_params = sum(_prod(r.info(k).shape) for k in r.keys())
        info = {
            "path": str(a.checkpoint),
            "tensors": len(r.keys()),
            "parameters": n_params,
            "bytes": r.total_bytes,
            "shards": [f for f, _ in r.layout],
            "state": None if state is None else {
                "method": state.method, "params": state.params, "step": state.step, "lambda": state.lam,
                "norms": state.norms, "mean_norm": state.mean_norm, "base": state.base,
                "models": state.models, "written_by": f"opcm-ext {state.version}",
            },
        }
        if a.tensors:
            info["tensor_list"] = [
                {"name": k, "dtype": str(r.info(k).dtype).replace("torch.", ""), "shape": list(r.info(k).shape)}
                for k in r.keys()
            ]
    if a.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return EXIT_OK
    print(f"{info['path']}: {info['tensors']} tensors, {info['parameters']:,} parameters, "
          f"{info['bytes'] / 2**20:.1f} MiB in {len(info['shards'])} file(s)")
    if state is None:
        print("  no opcm-ext merge state (not written by opcm-ext)")
    else:
        print(f"  method: {state.method} {json.dumps(state.params, sort_keys=True)}")
        print(f"  step: {state.step}   lambda: {state.lam:.6g}   mean norm: {state.mean_norm:.6g}")
        print(f"  base: {state.base.get('name')} ({state.base.get('hash')})")
        for i, (m, n) in enumerate(zip(state.models, state.norms), start=1):
            print(f"  {i:3d}. {m.get('name')}  norm={n:.6g}  ({m.get('hash')})")
        print(f"  written by opcm-ext {state.version}")
    for t in info.get("tensor_list", []):
        print(f"  {t['name']}  {t['dtype']}  {t['shape']}")
    return EXIT_OK


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="opcm", description="Continual model merging with OPCM, streaming checkpoints from disk.")
    p.add_argument("--version", action="version", version=f"opcm-ext {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more detail on errors and progress")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("merge", help="merge models in order into OUT (starts a new merge)")
    m.add_argument("base", help="the pre-trained checkpoint (HF folder or .safetensors)")
    m.add_argument("models", nargs="+", help="fine-tuned checkpoints, in merge order")
    m.add_argument("-o", "--out", required=True, help="output folder (or .safetensors file)")
    _merge_options(m)
    m.set_defaults(func=_cmd_merge)

    s = sub.add_parser("step", help="fold one new model into an existing merged checkpoint")
    s.add_argument("base")
    s.add_argument("merged", help="the merged checkpoint written by opcm")
    s.add_argument("new", help="the new fine-tuned checkpoint")
    s.add_argument("-o", "--out", default=None, help="output (default: replace MERGED atomically)")
    _merge_options(s)
    s.set_defaults(func=_cmd_step)

    w = sub.add_parser("watch", help="merge each checkpoint that appears in INBOX, in arrival order")
    from .watch import add_arguments as _watch_arguments

    _watch_arguments(w)
    _merge_options(w, outputs=False)
    w.set_defaults(func=_cmd_watch)

    d = sub.add_parser("doctor", help="versions, libraries and which backend each device would use, and why")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_cmd_doctor)

    i = sub.add_parser("info", help="show a checkpoint's merge state and provenance")
    i.add_argument("checkpoint")
    i.add_argument("--tensors", action="store_true", help="also list every tensor")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_info)

    try:
        from .evaluation.cli import add_subcommands
    except ImportError:  # evaluation extras not importable: the merge commands still work
        add_subcommands = None
    if add_subcommands is not None:
        add_subcommands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `opcm` command."""
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="opcm: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return int(a.func(a) or 0)
    except InputError as exc:
        print(f"opcm: error: {exc}", file=sys.stderr)
        if a.verbose:
            traceback.print_exc()
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("opcm: interrupted; the previous output is unchanged.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OpcmError, Exception) as exc:  # internal failure: say so, ask for a report
        print(f"opcm: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if a.verbose:
            traceback.print_exc()
        else:
            print("opcm: this is a bug or an environment problem; rerun with -v and report the output at the "
                  "project's issue tracker. The previous output is unchanged.", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
