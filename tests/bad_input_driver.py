"""Helper of tests/test_bad_inputs.py: import one script once, then run each case's command line in a
process forked from this one (its own exit code and stderr, as a fresh `python script.py ...` would give).

    python tests/bad_input_driver.py ldam_drw.py < {"case": [argv...], ...}    → {"case": [code, stderr]}
    python tests/bad_input_driver.py < {"case": ["ldam_drw.py", [argv...]], ...}   (several scripts, one import)

A case [script, argv, k] is killed (SIGKILL) at its k-th os.replace, the moment a run file would appear: what
it wrote before lies complete on disk, the k-th file is a whole temp file not yet renamed. With k = 0 the run
goes on and its stderr ends with the line "replaced: N", its number of such moments.
"""
import importlib
import json
import os
import signal
import sys
import tempfile

from forkrun import exit_code

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_case(module, script, argv, threads, kill_at=None):
    """Fork a process that runs one case on `threads` threads; returns (pid, the file its stderr goes to)."""
    err = tempfile.TemporaryFile("w+")
    pid = os.fork()
    if pid == 0:
        import torch
        torch.set_num_threads(threads)
        os.dup2(err.fileno(), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv = [script, *argv]
        if kill_at is not None:
            count, replace = [0], os.replace

            def replace_or_die(src, dst):
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                replace(src, dst)
            os.replace = replace_or_die
        code = exit_code(module.main, argv)
        if kill_at == 0:
            print(f"replaced: {count[0]}", file=sys.stderr, flush=True)
        os._exit(code)
    return pid, err


def run_cases(modules, cases, parallel=os.cpu_count() or 1):
    """{case: [script, argv]} → {case: [exit code, stderr]}, `parallel` cases at a time (each its own process,
    its own --out: they share nothing)."""
    todo, running, results = list(cases.items()), {}, {}
    while todo or running:
        while todo and len(running) < parallel:
            case, (script, argv, *kill_at) = todo.pop(0)
            pid, err = start_case(modules[script], script, argv, max(1, (os.cpu_count() or 1) // parallel), *kill_at)
            running[pid] = case, err
        pid, status = os.wait()
        case, err = running.pop(pid)
        err.seek(0)
        results[case] = [os.waitstatus_to_exitcode(status), err.read()]
        err.close()
    return results


def main():
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    cases = json.load(sys.stdin)
    if len(sys.argv) > 1:
        cases = {case: [sys.argv[1], argv] for case, argv in cases.items()}
    modules = {script: importlib.import_module(script.removesuffix(".py")) for script, *_ in cases.values()}
    print(json.dumps(run_cases(modules, cases)))


if __name__ == "__main__":
    main()
