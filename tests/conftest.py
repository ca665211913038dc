"""Suite-wide settings and one guard.

THREADS torch threads in every test process and, through OMP_NUM_THREADS, in the subprocesses it
starts, so in-process and subprocess runs reduce in the same order: 2, or the cores' share of each
pytest-xdist worker (1 on 2 cores: two workers with 2 OpenMP threads each on 2 cores wait on each
other's descheduled threads; the toy test took 845 s instead of 55 s).

The guard: no test reads or writes the checkout's own pipeline outputs (data/, runs/, results/,
logs/, .snakemake/, .dvc/tmp/); each works in its own temp dir, so the suite passes the same before
and after `make run` and leaves a finished tier as it was. The session fails, naming the paths, if
anything under them was created, deleted or modified (size or mtime) while it ran."""
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

import project_copy

THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = (*project_copy.OUTPUTS, ".dvc/tmp")   # what a finished tier holds, and DVC's scratch


def snapshot(root: Path = ROOT) -> dict[str, tuple]:
    """{relative path: (kind, size, mtime_ns)} of everything under the checkout's output folders
    (symlinks as links: a data/ linked to a dataset elsewhere is not walked)."""
    out = {}
    for name in OUTPUTS:
        top = root / name
        if not os.path.lexists(top):
            continue
        for path in [top, *top.rglob("*")] if not top.is_symlink() else [top]:
            st = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            out[str(path.relative_to(root))] = (kind, st.st_size if kind == "file" else 0, st.st_mtime_ns)
    return out


def changes(before: dict, after: dict) -> list[str]:
    return ([f"created  {p}" for p in sorted(after.keys() - before.keys())] +
            [f"deleted  {p}" for p in sorted(before.keys() - after.keys())] +
            [f"modified {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]])


@pytest.fixture(scope="session", autouse=True)
def _cwd_outside_the_checkout(tmp_path_factory):
    """In-process stages run with a temp dir as their cwd, as the subprocess ones do: nothing that
    looks for a project from the cwd (DVCLive opens the DVC repository it finds there) finds the checkout."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


def pytest_collection_modifyitems(config, items):
    """Files holding `slow` tests first, the rest by test count: under pytest-xdist a file is one work
    unit (make test: --dist loadfile), so the longest start first and none is left alone at the end."""
    slow, count = Counter(), Counter(it.path for it in items)
    for it in items:
        slow[it.path] += it.get_closest_marker("slow") is not None
    items.sort(key=lambda it: (-slow[it.path], -count[it.path]))   # stable: a file's own order kept


def _controller(session) -> bool:
    return not hasattr(session.config, "workerinput")   # pytest-xdist workers leave the check to the controller


def pytest_sessionstart(session):
    if _controller(session):
        session.config._checkout_before = snapshot()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_checkout_before", None)
    if before is not None:
        session.config._checkout_changes = changes(before, snapshot())
        if session.config._checkout_changes:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    diff = getattr(config, "_checkout_changes", None)
    if diff:
        terminalreporter.write_line(f"the tests changed the checkout's own outputs ({', '.join(OUTPUTS)}; every "
                                    f"test must work in a temp dir), {len(diff)} paths:", red=True)
        for line in diff[:40]:
            terminalreporter.write_line("  " + line)
