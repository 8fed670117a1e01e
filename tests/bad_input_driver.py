"""Helper of tests/test_bad_inputs.py: import one script once, then run each case's command line in a
process forked from this one (its own exit code and stderr, as a fresh `python script.py ...` would give).

    python tests/bad_input_driver.py ldam_drw.py < {"case": [argv...], ...}    → {"case": [code, stderr]}
    python tests/bad_input_driver.py < {"case": ["ldam_drw.py", [argv...]], ...}   (several scripts, one import)
"""
import importlib
import json
import os
import sys
import tempfile

from forkrun import exit_code

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_case(module, script, argv, threads):
    """Fork a process that runs one case on `threads` threads; returns (pid, the file its stderr goes to)."""
    err = tempfile.TemporaryFile("w+")
    pid = os.fork()
    if pid == 0:
        import torch
        torch.set_num_threads(threads)
        os.dup2(err.fileno(), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv = [script, *argv]
        os._exit(exit_code(module.main, argv))
    return pid, err


def run_cases(modules, cases, parallel=os.cpu_count() or 1):
    """{case: [script, argv]} → {case: [exit code, stderr]}, `parallel` cases at a time (each its own process,
    its own --out: they share nothing)."""
    todo, running, results = list(cases.items()), {}, {}
    while todo or running:
        while todo and len(running) < parallel:
            case, (script, argv) = todo.pop(0)
            pid, err = start_case(modules[script], script, argv, max(1, (os.cpu_count() or 1) // parallel))
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
    modules = {script: importlib.import_module(script.removesuffix(".py")) for script, _ in cases.values()}
    print(json.dumps(run_cases(modules, cases)))


if __name__ == "__main__":
    main()
