"""DVC remotes: a minimal DVC + Snakemake pipeline in a temp git repo is reproduced, pushed to a
local remote, cloned fresh and pulled; every artifact comes back, `dvc status` is clean, and
Snakemake sees nothing to rerun although `dvc pull` gave the files new mtimes (inputs produced by
DVC are ancient(), as in workflow/rules). Also: pulling from a missing remote, or one without the
objects, fails with a clear message."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ENV = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="t",
           GIT_COMMITTER_EMAIL="t@x", DVC_NO_ANALYTICS="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")

DVC_YAML = """stages:
  prep:
    cmd: python -c "open('data/prep.txt','w').write('x'*1000)"
    outs: [data/prep.txt]
  train:
    cmd: python -c "open('runs/w.bin','wb').write(open('data/prep.txt','rb').read()*3)"
    deps: [data/prep.txt]
    outs: [runs/w.bin]
  table:
    cmd: python -c "open('results/t.csv','w').write('table,row,our_fid\\n2,a,%d\\n' % len(open('runs/w.bin','rb').read()))"
    deps: [runs/w.bin]
    outs: [results/t.csv]
"""
SNAKEFILE = """rule all:
    input: "results/t.csv"
rule prep:
    output: "data/prep.txt"
    shell: "python -c \\"open('data/prep.txt','w').write('x'*1000)\\""
rule train:
    input: ancient("data/prep.txt")
    output: "runs/w.bin"
    shell: "python -c \\"open('runs/w.bin','wb').write(open('data/prep.txt','rb').read()*3)\\""
rule table:
    input: ancient("runs/w.bin")
    output: "results/t.csv"
    shell: "python -c \\"open('results/t.csv','w').write('table,row,our_fid\\\\n2,a,%d\\\\n' % len(open('runs/w.bin','rb').read()))\\""
"""
ARTIFACTS = ("data/prep.txt", "runs/w.bin", "results/t.csv")


def sh(*cmd, cwd, check=True):
    r = subprocess.run(list(map(str, cmd)), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, cmd))}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture
def repo(tmp_path):
    if not shutil.which("git"):
        pytest.skip("git not installed")
    src = tmp_path / "src"
    for d in ("data", "runs", "results"):
        (src / d).mkdir(parents=True)
    (src / "dvc.yaml").write_text(DVC_YAML)
    (src / "Snakefile").write_text(SNAKEFILE)
    sh("git", "init", "-q", cwd=src)
    sh("dvc", "init", "-q", cwd=src)
    sh("dvc", "repro", "-q", cwd=src)
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "-d", "local", remote, cwd=src)
    (src / ".gitignore").write_text(".snakemake/\n")
    sh("git", "add", "-A", cwd=src)
    sh("git", "commit", "-q", "-m", "pipeline", cwd=src)
    return src, remote


@pytest.mark.slow
def test_push_clone_pull_up_to_date(repo, tmp_path):
    src, remote = repo
    sh("dvc", "push", "-q", cwd=src)
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", src, clone, cwd=tmp_path)
    assert not (clone / "runs" / "w.bin").exists()
    time.sleep(1.1)  # pulled files get mtimes visibly newer than the git checkout
    sh("dvc", "pull", "-q", cwd=clone)
    for a in ARTIFACTS:
        assert (clone / a).read_bytes() == (src / a).read_bytes(), a
    st = sh("dvc", "status", cwd=clone)
    assert "up to date" in st.stdout, st.stdout
    # worst case for Snakemake's mtime check: an upstream artifact newer than its consumers
    os.utime(clone / "data" / "prep.txt")
    r = sh(sys.executable, "-m", "snakemake", "-n", "--cores", "1", cwd=clone)
    assert "Nothing to be done" in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.slow
def test_pull_from_missing_or_empty_remote_fails_clearly(repo, tmp_path):
    src, remote = repo
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", src, clone, cwd=tmp_path)
    r = sh("dvc", "pull", cwd=clone, check=False)          # remote never pushed: no objects
    assert r.returncode != 0
    assert "missing" in (r.stdout + r.stderr).lower() or "failed" in (r.stdout + r.stderr).lower()
    sh("dvc", "remote", "modify", "local", "url", tmp_path / "does-not-exist", cwd=clone)
    r = sh("dvc", "pull", cwd=clone, check=False)
    assert r.returncode != 0
