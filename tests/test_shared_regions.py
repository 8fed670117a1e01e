"""Code copied between scripts on purpose has not drifted (CONVENTIONS: "one method file, top to bottom").

In every top-level *.py of the repository, regions open with `# === shared: NAME (...) ===` and close
with `# === end shared: NAME ===`. For each NAME found in two or more files, the text between the marker
lines must be identical; every region that opens must close.
"""
import ast
import difflib
import re
from pathlib import Path

import pytest

from conftest import ROOT

OPEN = re.compile(r"^# === shared: (\S+)(?: \(.*\))? ===$")
CLOSE = re.compile(r"^# === end shared: (\S+) ===$")


def find_regions(path):
    """({name: text between the markers}, [problems]) for one file: unclosed, nested, duplicated, stray
    or malformed markers are problems."""
    regions, problems = {}, []
    name, start, body = None, 0, []
    for n, line in enumerate(Path(path).read_text().splitlines(keepends=True), 1):
        stripped = line.rstrip("\n")
        opened, closed = OPEN.match(stripped), CLOSE.match(stripped)
        if not (opened or closed) and re.search(r"=== (end )?shared:", stripped):
            problems.append(f"{path}:{n}: malformed marker '{stripped.strip()}' (expected '# === shared: NAME "
                            f"(...) ===' or '# === end shared: NAME ===' at the start of the line)")
        if opened:
            if name is not None:
                problems.append(f"{path}:{n}: region '{opened.group(1)}' opens inside region '{name}' (line {start})")
            name, start, body = opened.group(1), n, []
        elif closed and name is None:
            problems.append(f"{path}:{n}: '{stripped}' closes no open region")
        elif closed and closed.group(1) != name:
            problems.append(f"{path}:{n}: '{stripped}' does not match the open region '{name}' (line {start})")
            body.append(line)
        elif closed:
            if name in regions:
                problems.append(f"{path}:{start}: region '{name}' appears twice in one file")
            else:
                regions[name] = "".join(body)
            name = None
        elif name is not None:
            body.append(line)
    if name is not None:
        problems.append(f"{path}:{start}: region '{name}' is never closed ('# === end shared: {name} ===')")
    return regions, problems


def _diff(a_name, a, b_name, b):
    return "".join(difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True), a_name, b_name))


def check_shared_regions(directory):
    """Problems (strings, unified diffs included) across the top-level *.py files of `directory`."""
    files = sorted(Path(directory).glob("*.py"))
    problems, by_name = [], {}
    for path in files:
        regions, bad = find_regions(path)
        problems += bad
        for name, text in regions.items():
            by_name.setdefault(name, []).append((path.name, text))
    for name, copies in sorted(by_name.items()):
        ref_file, ref = copies[0]
        for other_file, text in copies[1:]:
            if text != ref:
                problems.append(f"shared region '{name}' differs between {ref_file} and {other_file}:\n"
                                + _diff(f"{ref_file} ({name})", ref, f"{other_file} ({name})", text))
    return problems, by_name


# ----- the repository ------------------------------------------------------------------------------

def test_repository_shared_regions_agree():
    problems, _ = check_shared_regions(ROOT)
    assert not problems, "\n".join(problems)


def test_repository_regions_are_found():
    """Guards the check above against markers that no longer match the pattern (nothing found = nothing
    compared)."""
    _, by_name = check_shared_regions(ROOT)
    for name in ("resnet32", "lr_schedule"):
        assert {"ldam_drw.py", "rotation_ssp.py"} <= {f for f, _ in by_name.get(name, [])}, name
    for name in ("class_balance", "losses", "deferred_rule"):
        assert {"ldam_drw.py", "self_training.py"} <= {f for f, _ in by_name.get(name, [])}, name
    assert "class ResNet32" in dict(by_name["resnet32"])["rotation_ssp.py"]
    assert "def ldam_margins" in dict(by_name["class_balance"])["self_training.py"]
    assert "def lr_at" in dict(by_name["lr_schedule"])["rotation_ssp.py"]


# ----- the check itself can fail -------------------------------------------------------------------

REGION = """\
import os

# === shared: helpers (identical in every script) ===
def double(x):
    return {body}
# === end shared: helpers ===


def main():
    pass
"""


def test_drifted_copies_are_reported_with_a_diff(tmp_path):
    (tmp_path / "a.py").write_text(REGION.format(body="2 * x"))
    (tmp_path / "b.py").write_text(REGION.format(body="x + x") + "\n# differs outside the region too\n")
    problems, _ = check_shared_regions(tmp_path)
    assert len(problems) == 1
    assert "shared region 'helpers' differs between a.py and b.py" in problems[0]
    assert "-    return 2 * x" in problems[0] and "+    return x + x" in problems[0]


def test_identical_copies_pass_and_lone_regions_are_not_compared(tmp_path):
    (tmp_path / "a.py").write_text(REGION.format(body="2 * x"))
    (tmp_path / "b.py").write_text("# other code before\n" + REGION.format(body="2 * x").replace("pass", "return 1"))
    (tmp_path / "c.py").write_text(REGION.format(body="3 * x").replace("helpers", "only_here"))
    problems, by_name = check_shared_regions(tmp_path)
    assert problems == [] and len(by_name["helpers"]) == 2 and len(by_name["only_here"]) == 1


def test_whitespace_drift_is_drift(tmp_path):
    (tmp_path / "a.py").write_text(REGION.format(body="2 * x"))
    (tmp_path / "b.py").write_text(REGION.format(body="2 * x  "))
    problems, _ = check_shared_regions(tmp_path)
    assert len(problems) == 1 and "helpers" in problems[0]


@pytest.mark.parametrize("text,message", [
    (REGION.format(body="2 * x").replace("# === end shared: helpers ===\n", ""), "never closed"),
    (REGION.format(body="2 * x").replace("end shared: helpers", "end shared: helper"), "does not match"),
    ("# === end shared: helpers ===\n", "closes no open region"),
    (REGION.format(body="2 * x").replace("# === end shared: helpers ===", "    # === end shared: helpers ==="),
     "malformed marker"),
    (REGION.format(body="2 * x") * 2, "appears twice"),
    (REGION.format(body="2 * x").replace("def double", "# === shared: inner ===\ndef double"), "opens inside"),
])
def test_unbalanced_markers_are_reported(tmp_path, text, message):
    (tmp_path / "a.py").write_text(text)
    problems, _ = check_shared_regions(tmp_path)
    assert any(message in p for p in problems), problems



# ----- the shared command-line flags (CONVENTIONS: "shared flags first, same names, order") ----------

SHARED_FLAGS = ["--dataset", "--data-root", "--download", "--rho", "--imb-type", "--gpu", "--epochs", "--batch-size",
                "--lr", "--wd", "--seed", "--data-seed", "--out", "--resume", "--amp", "--val-frac"]
FLAG = re.compile(r'add_argument\("(--[a-z0-9-]+)"')


def check_shared_flags(path):
    """Problems with one script's flags: the block after '# --- shared flags' must name shared flags only,
    in the shared order (a script may leave out the ones that do not apply), and the method's own flags
    after '# --- this method ---' must not reuse a shared name."""
    text = Path(path).read_text()
    if "# --- shared flags" not in text:
        return []
    shared_part, _, method_part = text.split("# --- shared flags", 1)[1].partition("# --- this method ---")
    names = FLAG.findall(shared_part)
    problems = [f"{path}: '{n}' is not a shared flag" for n in names if n not in SHARED_FLAGS]
    order = [SHARED_FLAGS.index(n) for n in names if n in SHARED_FLAGS]
    if order != sorted(order):
        problems.append(f"{path}: shared flags out of order: {' '.join(names)}")
    problems += [f"{path}: method flag '{n}' reuses a shared name" for n in FLAG.findall(method_part) if n in SHARED_FLAGS]
    return problems


def test_repository_shared_flags_keep_names_and_order():
    scripts = [p for p in sorted(ROOT.glob("*.py")) if "# --- shared flags" in p.read_text()]
    assert len(scripts) >= 5
    problems = [p for s in scripts for p in check_shared_flags(s)]
    assert not problems, "\n".join(problems)


def test_flag_check_catches_order_and_reuse(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('    # --- shared flags\n    p.add_argument("--seed")\n    p.add_argument("--gpu")\n'
                   '    p.add_argument("--temperature")\n    # --- this method ---\n    p.add_argument("--lr")\n')
    problems = check_shared_flags(bad)
    assert any("out of order" in p for p in problems) and any("'--temperature' is not" in p for p in problems)
    assert any("'--lr' reuses" in p for p in problems)


# ----- run machinery and data code live once (run_lt.py, datasets_lt.py) ---------------------------------

def machinery_copies(directory):
    """Top-level functions and classes of the method files that share a name with a function or class of
    run_lt.py or datasets_lt.py: code that lives once there and was written again. A script's own
    run-level steps (resume_run, open_run, end_epoch, finish_run) call the shared ones and may keep the name."""
    defined = lambda path: {n.name for n in ast.parse(Path(path).read_text()).body
                            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    shared = (defined(Path(directory) / "run_lt.py") | defined(Path(directory) / "datasets_lt.py")) - \
        {"resume_run", "open_run", "end_epoch", "finish_run", "main"}
    return [f"{p.name}: {name}" for p in sorted(Path(directory).glob("*.py"))
            if p.name not in ("run_lt.py", "datasets_lt.py") for name in sorted(defined(p) & shared)]


def test_method_files_do_not_copy_run_lt_or_datasets_lt():
    problems = machinery_copies(ROOT)
    assert not problems, "defined again instead of imported:\n" + "\n".join(problems)


def test_machinery_check_catches_a_copy(tmp_path):
    for name in ("run_lt.py", "datasets_lt.py"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "m.py").write_text("def load_backbone(model, arch, path):\n    pass\n\n\ndef resume_run(args):\n"
                                   "    pass\n\n\nclass ListBatches:\n    pass\n")
    assert machinery_copies(tmp_path) == ["m.py: ListBatches", "m.py: load_backbone"]
