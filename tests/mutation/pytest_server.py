"""pytest runs forked from a process that has already imported the third-party packages the tests import.

A mutation run starts pytest once per mutant. A fresh `python -m pytest` spends most of its time
importing torch, triton, transformers and peft (~20 s on a busy 2-core machine) before the first
test; a fork of a process that holds them starts the tests in about a second. The server imports
none of fusedlora and none of the tests: each run imports them from the files as they are on disk
then (a mutant), exactly as a fresh process would, and writes no bytecode (a mutant and the original
of the same size, written within one second, would otherwise share a stale .pyc).

    python tests/mutation/pytest_server.py serve SOCKET          in the repository root; runs until killed
    python tests/mutation/pytest_server.py run SOCKET [ARGS...]  pytest ARGS in a fork; its exit status

`run` passes its stdout and stderr to the fork, which runs in the server's directory and environment;
without a server listening on SOCKET it runs `python -m pytest ARGS` itself. When `run` dies (a
timeout kills it), the server kills the fork and everything it started.
"""
import array
import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys

PRELOAD = ("torch", "triton", "triton.runtime.interpreter", "pytest", "numpy", "safetensors", "transformers",
           "peft", "transformers.models.llama", "hypothesis")


def _preload() -> None:
    """The modules above and pytest's plugins (what pytest.main would import first), each if installed."""
    from importlib.metadata import entry_points
    names = list(PRELOAD) + [e.value.split(":")[0] for e in entry_points(group="pytest11")]
    for name in names:
        try:
            __import__(name)
        except ImportError:
            pass


def serve(path: str) -> None:
    root = os.getcwd()
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    sys.dont_write_bytecode = True
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # and neither do the processes the tests start
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # what tests/conftest.py sets before triton's first import
    _preload()
    gc.freeze()  # the forks' collections then skip what the server holds (seconds per run otherwise)
    ours = [m for m, mod in list(sys.modules.items()) if m.split(".")[0] == "fusedlora"
            or str(getattr(mod, "__file__", None)).startswith(root + os.sep) and mod is not sys.modules[__name__]]
    assert not ours, f"the server must not hold the code under test: {ours[:5]}"
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    signal.signal(signal.SIGTERM, _terminate)
    print(f"pytest server: listening on {path}", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            _serve_one(server, conn)


_running = []  # the fork running now, if any


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def _terminate(signum, frame):
    for pid in _running:
        _kill(pid)
    sys.exit(0)


def _serve_one(server, conn) -> None:
    fds = array.array("i")
    message, ancillary, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(2 * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    args = json.loads(message.decode())
    pid = os.fork()
    if pid == 0:
        server.close()
        conn.close()
        os.setsid()  # a group of its own: killed with everything it starts
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for fd, target in zip(fds, (1, 2)):
            os.dup2(fd, target)
        code = 3
        try:
            import pytest
            code = int(pytest.main(args))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    for fd in fds:
        os.close(fd)
    _running[:] = [pid]
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                conn.sendall(str(os.waitstatus_to_exitcode(status)).encode())
                return
            ready, _, _ = select.select([conn], [], [], 0.2)
            if ready and not conn.recv(1, socket.MSG_PEEK):  # the client is gone
                _kill(pid)
                return
    finally:
        _running.clear()


def run(path: str, args) -> int:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
    except OSError:
        client.close()
        return subprocess.call([sys.executable, "-m", "pytest", *args])
    with client:
        socket.send_fds(client, [json.dumps(list(args)).encode()], [sys.stdout.fileno(), sys.stderr.fileno()])
        reply = b""
        while chunk := client.recv(64):
            reply += chunk
    return int(reply) if reply else 3


if __name__ == "__main__":
    command, socket_path, *rest = sys.argv[1:]
    if command == "serve":
        serve(socket_path)
    elif command == "run":
        sys.exit(run(socket_path, rest))
    else:
        sys.exit(f"unknown command {command!r}: serve or run")
