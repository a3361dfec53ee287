"""A fork server that runs ``opcm`` (``opcm_ext.cli.main``) many times without paying its imports each time.

The crash, bad-input and disk-full tests run the real CLI hundreds of times; a new interpreter
per run would spend seconds importing torch and transformers. ``Zygote()`` starts this file as a
program once; the program imports everything, prints "ready", and forks one child per job it
reads from stdin.

A job: ``argv``; ``log`` (stdout, and stderr unless ``err`` names another file); optional
``fault``/``fault_log`` (as OPCM_FAULT_AT/OPCM_FAULT_LOG), ``no_exchange`` (the rename-aside swap,
as on a filesystem without RENAME_EXCHANGE) and ``fill`` = (fault point name, file): at that point
a filler file takes all the free space of its disk, as another program writing there would.
The program also adds the fault point ``pass1.scratch_put`` after each tensor a pass keeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

__all__ = ["Zygote"]


class Zygote:
    """The client: ``run(jobs)`` forks one ``opcm`` per job and returns their exit codes (-9: SIGKILL)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=tempfile.gettempdir())
        self._ready = False

    def run(self, jobs: list[dict], parallel: int = 2) -> list[int]:
        """Run ``opcm`` once per job, ``parallel`` at a time; their exit codes in job order."""
        if not self._ready:
            assert self.proc.stdout.readline().strip() == "ready", "the zygote did not start"
            self._ready = True
        self.proc.stdin.write(json.dumps({"jobs": jobs, "parallel": parallel}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)

    def close(self) -> None:
        """Stop the server."""
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _fill_disk_at(at: str, path: str) -> None:
    """From fault point ``at`` on, a file at ``path`` takes all the free space of its disk."""
    from opcm_ext import _faults

    real_point = _faults.point

    def point(name: str) -> None:
        if name == at and not os.path.exists(path):
            f = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                while os.write(f, bytes(1 << 16)):
                    pass
            except OSError:  # ENOSPC: the disk is full now
                pass
            finally:
                os.close(f)
        real_point(name)

    _faults.point = point


def _child(job: dict) -> None:
    import traceback

    import opcm_ext.cli as cli
    from opcm_ext import _faults
    from opcm_ext.io import transaction

    for fd, path in ((1, job["log"]), (2, job.get("err", job["log"]))):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(f, fd)
        os.close(f)
    if job.get("no_exchange"):
        transaction._renameat2 = None
    if job.get("fill"):
        _fill_disk_at(*job["fill"])
    _faults._configure(job.get("fault"), job.get("fault_log"))
    try:
        rc = cli.main(job["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        rc = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _serve() -> None:
    from pathlib import Path

    import transformers

    import opcm_ext.api  # noqa: F401  (everything a step imports, before forking)
    import opcm_ext.cli as cli
    import opcm_ext.plan
    from opcm_ext import _faults
    from opcm_ext.io import scratch

    # warm the lazy imports classify() does (transformers, CLIP on the meta device: no compute)
    with tempfile.TemporaryDirectory() as d:
        transformers.CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                      num_attention_heads=2).save_pretrained(d)
        opcm_ext.plan._module_types(Path(d))
    cli.build_parser()

    put = scratch.ScratchStore.put

    def put_then_point(self, key, t, **region):
        put(self, key, t, **region)
        _faults.point("pass1.scratch_put")

    scratch.ScratchStore.put = put_then_point

    print("ready", flush=True)
    for line in sys.stdin:
        batch = json.loads(line)
        jobs, parallel = batch["jobs"], batch["parallel"]
        todo, running, codes = list(range(len(jobs))), {}, [None] * len(jobs)
        while todo or running:
            while todo and len(running) < parallel:
                i = todo.pop(0)
                pid = os.fork()
                if pid == 0:
                    _child(jobs[i])
                running[pid] = i
            pid, status = os.wait()
            codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
        print(json.dumps(codes), flush=True)


if __name__ == "__main__":
    _serve()
