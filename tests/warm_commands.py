"""nnU-Net's console commands in processes forked from one that has imported them already.

An nnU-Net command spends about 6 s importing torch and nnU-Net before it reads its arguments (2 cores,
2026-12-07), and the suite runs nearly a hundred of them. Each pytest worker starts one server process that imports
the commands' modules once; every command then runs in a child forked from it. The child is the command as its
console script runs it: its `__main__` holds the entry point, which is how this package's trainers recognise
`nnUNetv2_train` (`trainers.common.run_by_nnunetv2_train`), with the command's arguments, environment and working
directory, its stdout and stderr in files, and its exit code or signal as a process's. Nothing of nnU-Net is
replaced: the same functions run on the same arguments.

The server forks only while it runs a single thread (checked before each fork); otherwise, if it cannot start, or
when tests run in one process (whose commands take every core), commands run as plain subprocesses.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ENTRY_POINTS = {  # as the console scripts of nnunetv2's setup import them
    "nnUNetv2_train": ("nnunetv2.run.run_training", "run_training_entry"),
    "nnUNetv2_predict": ("nnunetv2.inference.predict_from_raw_data", "predict_entry_point"),
    "nnUNetv2_plan_and_preprocess": ("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
                                     "plan_and_preprocess_entry"),
    "nnUNetv2_plan_experiment": ("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
                                 "plan_experiment_entry"),
}

SERVER = r"""
import importlib, json, os, sys, traceback, types

# the console script's import path: its own folder first, not the working directory (`-c` puts "" there, which a
# command started in a source checkout would resolve to the checkout instead of the installed package)
sys.path[0] = os.path.dirname(sys.executable)
entries = {name: getattr(importlib.import_module(module), function)
           for name, (module, function) in json.loads(sys.argv[1]).items()}
requests, replies = sys.stdin.buffer, sys.stdout.buffer


def threads():
    return len(os.listdir("/proc/self/task"))


def run(request):
    out = os.open(request["stdout"], os.O_WRONLY | os.O_TRUNC)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = request["argv"]
    main = types.ModuleType("__main__")  # what the console script's __main__ holds
    entry = entries[request["command"]]
    setattr(main, entry.__name__, entry)
    sys.modules["__main__"] = main
    try:
        sys.exit(entry())  # as the console script: a non-integer exit value is printed, with exit code 1
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(1)


replies.write(f"ready {threads()}\n".encode())
replies.flush()
for line in requests:
    request = json.loads(line)
    if threads() != 1:
        replies.write(b"busy\n")
        replies.flush()
        continue
    pid = os.fork()
    if pid == 0:
        run(request)
    replies.write(f"{pid}\n".encode())
    replies.flush()
    _, status = os.waitpid(pid, 0)
    replies.write(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    replies.flush()
"""


class WarmCommands:
    """The server of one pytest worker; `run` is subprocess.run for the commands of ENTRY_POINTS.

    For one-thread commands only (OMP_NUM_THREADS=1, as the suite runs them beside another worker): OpenBLAS
    starts its thread pool when numpy is imported, sized by that variable, and a process with a second thread
    must not fork."""

    def __init__(self, enabled: bool) -> None:
        self._server: subprocess.Popen | None = None
        self._failed = not enabled

    def _start(self) -> bool:
        if self._server is None and not self._failed:
            self._server = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(ENTRY_POINTS)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tempfile.gettempdir(),
                                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                                            bufsize=0)  # unbuffered replies: select sees each line
            atexit.register(self._server.kill)
            ready = self._server.stdout.readline().decode().split()
            if ready != ["ready", "1"]:  # it died, or importing started threads: forking would not be safe
                self._server.kill()
                self._server, self._failed = None, True
        return self._server is not None

    def run(self, argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        if argv[0] not in ENTRY_POINTS or not self._start():
            return _plain(argv, env, timeout)
        with tempfile.TemporaryDirectory() as folder:
            stdout, stderr = Path(folder) / "stdout", Path(folder) / "stderr"
            stdout.touch()
            stderr.touch()
            request = {"command": argv[0], "argv": argv, "env": env, "cwd": os.getcwd(), "stdout": str(stdout),
                       "stderr": str(stderr)}
            self._server.stdin.write((json.dumps(request) + "\n").encode())
            self._server.stdin.flush()
            first = self._server.stdout.readline().decode().strip()
            if first == "busy":
                return _plain(argv, env, timeout)
            pid = int(first)
            ready, _, _ = select.select([self._server.stdout], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                self._server.stdout.readline()
                raise subprocess.TimeoutExpired(argv, timeout, stdout.read_text(), stderr.read_text())
            code = int(self._server.stdout.readline())
            return subprocess.CompletedProcess(argv, code, stdout.read_text(errors="replace"),
                                               stderr.read_text(errors="replace"))


def _plain(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / argv[0]
    cmd = [str(exe), *argv[1:]] if exe.exists() else argv
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
