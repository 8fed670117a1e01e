"""`python tests/forkrun.py SCRIPT.py ARGS...` behaves as `python SCRIPT.py ARGS...` (same stdin/stdout/stderr,
working directory, environment and exit code), but the script runs in a process forked from a server that
imported torch and every script once, so a test pays for torch's import once per session, not once per run.

    python tests/forkrun.py --serve SOCKET        the server (tests/conftest.py starts one per session)
    FORKRUN_SOCKET=SOCKET python tests/forkrun.py ldam_drw.py --epochs 1 ...

The forked process is a fresh run in all that a script can see: the server only imports (it runs no torch
op, so no thread pool exists to be inherited), and it refuses to serve if importing printed a warning
that a fresh run would print and a forked one would not. Without FORKRUN_SOCKET, for anything but a
top-level script of the project, or when the server cannot be reached, this execs the real interpreter.
"""
import json
import os
import signal
import socket
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(f for f in os.listdir(ROOT) if f.endswith(".py") and not f.startswith("bench"))



def exit_code(main, argv):
    """Run main(argv) and return the exit code `python script.py argv` would end with: sys.exit's code
    (a message instead of a code is printed and gives 1), 1 and the traceback for any other exception."""
    code = 0
    try:
        main(argv)
    except SystemExit as e:                              # what the interpreter does with sys.exit(code)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code

def _child(conn, module):
    """In the forked process: take over the client's fds, cwd and environment, run module.main."""
    import io
    import threading
    fds, msg = _recv(conn)
    request = json.loads(msg)
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", line_buffering=True,
                                  write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", line_buffering=True,
                                  write_through=True)
    sys.argv = request["argv"]
    if "OMP_NUM_THREADS" in os.environ:                  # read at import by a fresh interpreter
        import torch
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")

    def watch():                                         # the client was killed (a timeout, say): stop too
        try:
            conn.recv(1)
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True).start()
    code = exit_code(module.main, sys.argv[1:])
    try:
        conn.sendall(json.dumps({"code": code}).encode() + b"\n")
    except OSError:
        pass
    os._exit(code)


def _recv(conn):
    msg, fds, flags, _ = socket.recv_fds(conn, 1 << 20, 3)
    while not msg.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            raise EOFError
        msg += more
    return fds, msg


def serve(path):
    import importlib
    import warnings
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    with warnings.catch_warnings(record=True) as caught:
        modules = {s: importlib.import_module(s[:-3]) for s in SCRIPTS}
    if caught:
        sys.exit(f"forkrun: importing the scripts warned ({caught[0].message}); not serving")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        script = conn.recv(256).decode()                 # the script's name, then the request with the fds
        conn.sendall(b"ok")
        pid = os.fork()
        if pid == 0:                                     # a grandchild runs it, so the server reaps at once
            server.close()
            if os.fork() == 0:
                _child(conn, modules[script])
            os._exit(0)
        conn.close()
        os.waitpid(pid, 0)


def run(argv):
    path = os.environ.get("FORKRUN_SOCKET")
    script = os.path.basename(argv[0]) if argv else ""
    if not path or script not in SCRIPTS or os.path.dirname(os.path.abspath(argv[0])) != ROOT:
        os.execv(sys.executable, [sys.executable, *argv])
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
        conn.sendall(script.encode())
        assert conn.recv(2) == b"ok"
    except OSError:
        os.execv(sys.executable, [sys.executable, *argv])
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
    replies = conn.makefile("rb")
    pid = json.loads(replies.readline())["pid"]          # it runs; a signal to this process is meant for it
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
    line = replies.readline()
    if not line:                                         # killed by a signal before it could report
        sys.exit(1)
    sys.exit(json.loads(line)["code"])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2])
    else:
        run(sys.argv[1:])
