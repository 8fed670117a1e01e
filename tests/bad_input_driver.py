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


def run_case(module, script, argv):
    with tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:
            os.dup2(err.fileno(), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.argv = [script, *argv]
            os._exit(exit_code(module.main, argv))
        _, status = os.waitpid(pid, 0)
        err.seek(0)
        return [os.waitstatus_to_exitcode(status), err.read()]


def main():
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    cases = json.load(sys.stdin)
    if len(sys.argv) > 1:
        cases = {case: [sys.argv[1], argv] for case, argv in cases.items()}
    modules = {script: importlib.import_module(script.removesuffix(".py")) for script, _ in cases.values()}
    print(json.dumps({case: run_case(modules[script], script, argv) for case, (script, argv) in cases.items()}))


if __name__ == "__main__":
    main()
