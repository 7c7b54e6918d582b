"""nnU-Net's and this package's console commands in processes forked from one that has imported them already.

An nnU-Net command spends about 6 s importing torch and nnU-Net before it reads its arguments (2 cores,
2026-12-07), and the suite runs nearly a hundred of them (`pemma`'s, which import lazily, 1-6 s). Each pytest
worker starts one server process that imports the commands' modules once; every command then runs in a child
forked from it. The child is the command as its console script runs it: its `__main__` holds the entry point,
which is how this package's trainers recognise `nnUNetv2_train` (`trainers.common.run_by_nnunetv2_train`), with the
command's arguments, environment and working directory, its stdout and stderr in files, and its exit code or
signal as a process's. Nothing of nnU-Net is
replaced: the same functions run on the same arguments. The child ends as the interpreter would (non-daemon
threads joined, exit handlers run, output flushed) but without freeing every object, which would copy the server's
memory page by page (1.4 s of a 1.5 s `nnUNetv2_predict -h`).

Commands that the suite's own processes start (`pemma reproduce`'s ~35 jobs, the benchmark scripts' and
gpu_check.sh's) find clients under the commands' names: `WarmCommands.python` is the interpreter of a venv made of
links to this one, whose bin folder holds small scripts that hand their arguments, environment, working directory,
stdout and stderr to the server over a Unix socket, forward the signals that would end the command, and exit with
its code (or run the real console script when the server does not answer).

The server forks only while it runs a single thread (checked before each fork); otherwise, if it cannot start, or
when tests run in one process (whose commands take every core), commands run as plain subprocesses.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ENTRY_POINTS = {  # as the console scripts of nnunetv2's and this package's setup import them
    "nnUNetv2_train": ("nnunetv2.run.run_training", "run_training_entry"),
    "nnUNetv2_predict": ("nnunetv2.inference.predict_from_raw_data", "predict_entry_point"),
    "nnUNetv2_plan_and_preprocess": ("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
                                     "plan_and_preprocess_entry"),
    "nnUNetv2_plan_experiment": ("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
                                 "plan_experiment_entry"),
    "pemma": ("nnunetv2_pemma.cli", "main"),
}
PRELOAD = ("nnunetv2_pemma.plans", "nnunetv2_pemma.data.hecktor", "nnunetv2_pemma.data.phantom")
"""What `pemma`'s subcommands import when they run (they import lazily): imported once in the server."""

SERVER = r"""
import atexit, gc, importlib, json, os, select, socket, struct, sys, threading, traceback, types

# the console script's import path: its own folder first, not the working directory (`-c` puts "" there, which a
# command started in a source checkout would resolve to the checkout instead of the installed package)
sys.path[0] = os.path.dirname(sys.executable)
spec = json.loads(sys.argv[1])
entries = {name: getattr(importlib.import_module(module), function)
           for name, (module, function) in spec["entry_points"].items()}
for module in spec["preload"]:
    importlib.import_module(module)
gc.freeze()  # the children's garbage collections leave the imported objects alone (and their memory shared)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(spec["socket"])
listener.listen(16)


def threads():
    return len(os.listdir("/proc/self/task"))


def become(request, out, err):
    # in the forked child: the command as its console script runs it, writing to OUT and ERR
    listener.close()
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)
    os.environ.clear()
    os.environ.update(request["env"])
    if os.environ.get("PYTHONUNBUFFERED"):  # what the interpreter would have read at its start
        sys.stdout.reconfigure(write_through=True)
        sys.stderr.reconfigure(write_through=True)
    os.chdir(request["cwd"])
    sys.argv = request["argv"]
    main = types.ModuleType("__main__")  # what the console script's __main__ holds
    entry = entries[request["command"]]
    setattr(main, entry.__name__, entry)
    sys.modules["__main__"] = main
    try:
        code = entry()
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):  # as sys.exit: a non-integer is printed, exit code 1
        print(code, file=sys.stderr)
        code = 1
    # the interpreter's exit without its freeing of every object (which copies the server's memory page by page,
    # ~1.4 s): wait for threads, run the exit handlers, flush
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def handle(request, out, err, reply):
    # in a child of the server, which waits for the command so that the server keeps serving: reply the command's
    # pid, then its exit code (negative: the signal that ended it)
    pid = os.fork()
    if pid == 0:
        become(request, out, err)
    reply(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    reply(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def from_pipe(request):
    # the pytest worker's own command: output to the files it names, replies on this process's stdout
    out = os.open(request["stdout"], os.O_WRONLY | os.O_TRUNC)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_TRUNC)
    handle(request, out, err, lambda data: os.write(1, data))


def from_socket(connection):
    # a client in the warm venv's bin folder: its stdout and stderr come with the request
    header, fds, _, _ = socket.recv_fds(connection, 4, 2)
    size, payload = struct.unpack("!I", header)[0], b""
    while len(payload) < size:
        payload += connection.recv(size - len(payload))
    handle(json.loads(payload), fds[0], fds[1], connection.sendall)


os.write(1, f"ready {threads()}\n".encode())
handlers, pending = set(), b""
while True:
    readable, _, _ = select.select([0, listener], [], [], 1.0)
    handlers = {pid for pid in handlers if os.waitpid(pid, os.WNOHANG)[0] == 0}
    if listener in readable:
        connection, _ = listener.accept()
        if threads() == 1:  # otherwise the client runs the command as a plain process
            pid = os.fork()
            if pid == 0:
                from_socket(connection)
            handlers.add(pid)
        connection.close()
    if 0 in readable:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if threads() != 1:
                os.write(1, b"busy\n")
                continue
            pid = os.fork()
            if pid == 0:
                from_pipe(json.loads(line))
            handlers.add(pid)
"""

CLIENT = """#!{python} -S
# {name}, forked from a pytest worker's warm process (tests/warm_commands.py); a plain process if that does not serve
import json, os, signal, socket, struct, sys

REAL = {real!r}
try:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.connect({socket!r})
    payload = json.dumps({{"command": {name!r}, "argv": [REAL, *sys.argv[1:]], "env": dict(os.environ),
                          "cwd": os.getcwd()}}).encode()
    socket.send_fds(server, [struct.pack("!I", len(payload))], [1, 2])
    server.sendall(payload)
    replies = server.makefile("rb")
    first = replies.readline()
except OSError:
    first = b""
if not first:
    os.execv(REAL, [REAL, *sys.argv[1:]])
pid = int(first)
for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # what would end the command ends it
    signal.signal(number, lambda number, frame: os.kill(pid, number))
code = replies.readline()
if not code:
    sys.exit("{name}: the warm process that ran it ended first")
code = int(code)
if code < 0:  # ended by a signal: so is this process
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


class WarmCommands:
    """The server of one pytest worker; `run` is subprocess.run for the commands of ENTRY_POINTS, and
    `python` the interpreter of a venv whose processes find those commands forked from the server too.

    For one-thread commands only (OMP_NUM_THREADS=1, as the suite runs them beside another worker): OpenBLAS
    starts its thread pool when numpy is imported, sized by that variable, and a process with a second thread
    must not fork."""

    def __init__(self, enabled: bool) -> None:
        self._server: subprocess.Popen | None = None
        self._failed = not enabled
        self._folder: Path | None = None

    def _start(self) -> bool:
        if self._server is None and not self._failed:
            self._folder = Path(tempfile.mkdtemp(prefix="pemma-warm-"))
            atexit.register(shutil.rmtree, self._folder, True)
            spec = {"entry_points": ENTRY_POINTS, "preload": PRELOAD, "socket": str(self._folder / "socket")}
            self._server = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(spec)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tempfile.gettempdir(),
                                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                                            bufsize=0)  # unbuffered replies: select sees each line
            atexit.register(self._server.kill)
            ready = self._server.stdout.readline().decode().split()
            if ready != ["ready", "1"]:  # it died, or importing started threads: forking would not be safe
                self._server.kill()
                self._server, self._failed = None, True
            else:
                self._write_venv()
        return self._server is not None

    def _write_venv(self) -> None:
        """A venv of links to the one running the tests (`sys.prefix`: the same packages) whose bin folder holds,
        under the console scripts' names, clients of the server."""
        venv = self._folder / "venv"
        (venv / "bin").mkdir(parents=True)
        if sys.prefix == sys.base_prefix:  # not a venv: there is nothing to link
            return
        shutil.copy(Path(sys.prefix) / "pyvenv.cfg", venv / "pyvenv.cfg")
        for folder in ("lib", "lib64"):
            if (Path(sys.prefix) / folder).exists():
                (venv / folder).symlink_to(Path(sys.prefix) / folder)
        (venv / "bin" / "python").symlink_to(sys.executable)
        for name in ENTRY_POINTS:
            real = Path(sys.executable).parent / name
            client = venv / "bin" / name
            client.write_text(CLIENT.format(python=sys.executable, name=name, real=str(real),
                                            socket=str(self._folder / "socket")))
            client.chmod(0o755)

    @property
    def python(self) -> str:
        """The interpreter for a process whose own nnU-Net and pemma commands should be forked from the server (it
        finds them beside itself, as `pemma reproduce` and the benchmarks do, or on a PATH that starts with its
        folder); this one when the server does not serve."""
        if self._start() and (self._folder / "venv" / "bin" / "nnUNetv2_train").exists():
            return str(self._folder / "venv" / "bin" / "python")
        return sys.executable

    def with_warm_children(self, argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """ARGV (`python ...`, `bash ...` or a console script of this venv) and ENV for a process whose own nnU-Net
        and pemma commands are forked from the server: run by the warm venv's interpreter, its bin folder first on
        PATH."""
        python = self.python
        if python == sys.executable:
            return argv, env
        env = {**env, "PATH": f"{Path(python).parent}:{env.get('PATH', '')}"}
        if argv[0] == "bash":
            return argv, env
        if argv[0] == "python":
            return [python, *argv[1:]], env
        return [python, str(Path(sys.executable).parent / argv[0]), *argv[1:]], env

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
