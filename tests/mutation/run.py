"""Mutation testing of the call-plan caches with cosmic-ray, one module (config) at a time.

    python tests/mutation/run.py [NAME ...] [--out DIR] [--survivors]

NAME is a config in tests/mutation/ (NAME.toml: the module, the definitions in scope, the test command);
without one, every config runs. The run works on a copy of the working tree (git's tracked and
untracked files) in a temporary directory, which cosmic-ray mutates in place, one mutant at a time,
so the tree itself is never changed and stays usable. The tests run through tests/mutation/pytest_server.py
(pytest forked from a process that holds torch, triton, transformers and peft). Sessions are kept
in DIR (default .mutation/): NAME.sqlite, and NAME-survivors.txt with each survivor's diff.
--survivors runs again only the mutants that survived in DIR's sessions (after tests were added).
"""
import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOCKET = ".pytest-server.sock"  # relative to the copy: the test commands name it


def copy_tree(dest: Path) -> Path:
    """The working tree's files into dest, fusedlora.kernels linked as the install maps it; returns the
    directory to put on PYTHONPATH (it holds only `fusedlora`, so the copy's kernels/ cannot shadow the
    PyPI package `kernels`)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    if not (dest / "fusedlora" / "kernels").exists():
        (dest / "fusedlora" / "kernels").symlink_to("../kernels")
    path = dest / ".pythonpath"
    path.mkdir()
    (path / "fusedlora").symlink_to(dest / "fusedlora")
    return path


def start_server(copy: Path, env: dict) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, str(HERE / "pytest_server.py"), "serve", SOCKET], cwd=copy, env=env,
                              stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    if "listening" not in line:
        server.kill()
        raise SystemExit(f"the pytest server did not start: {line!r}")
    return server


def results(session: Path):
    """[(job_id, outcome, diff, output)] of a session; outcome: killed, timeout, survived, incompetent,
    pending, the reason a mutant was skipped (scope.py's), or the worker's outcome."""
    from cosmic_ray.work_db import WorkDB, use_db
    rows = []
    with use_db(str(session), WorkDB.Mode.open) as db:
        done = dict(db.results)
        for item in db.work_items:
            result = done.get(item.job_id)
            if result is None:
                outcome = "pending"
            elif result.worker_outcome.value == "skipped":
                outcome = result.output
            elif result.worker_outcome.value != "normal":
                outcome = result.worker_outcome.value
            elif result.test_outcome.value == "killed" and result.output == "timeout":
                outcome = "timeout"
            else:
                outcome = result.test_outcome.value
            rows.append((item.job_id, outcome, result.diff if result else None, result.output if result else None))
    return rows


def summary(name: str, session: Path, seconds: float) -> str:
    rows = results(session)
    count = collections.Counter(outcome for _, outcome, _, _ in rows)
    scoped = len(rows) - count["outside the scope"]
    run = scoped - count["a replacement left out"]
    tested = count["killed"] + count["timeout"] + count["survived"]
    score = (count["killed"] + count["timeout"]) / tested if tested else float("nan")
    with open(session.with_name(f"{name}-survivors.txt"), "w") as f:
        for job, outcome, diff, _ in rows:
            if outcome == "survived":
                f.write(f"# {job}\n{diff}\n")
    return (f"{name}: {scoped} mutants in scope, {run} run ({scoped - run} replacements left out): "
            f"{count['killed']} killed, {count['timeout']} timeouts, {count['survived']} survived, "
            f"{run - tested} other ({count['incompetent']} incompetent, {count['pending']} pending); "
            f"score {score:.1%} ({seconds / 60:.0f} min)")


def forget_survivors(session: Path) -> int:
    """Marks a session's survivors pending again; returns how many."""
    import sqlite3
    survivors = [job for job, outcome, _, _ in results(session) if outcome == "survived"]
    with sqlite3.connect(session) as db:
        db.executemany("DELETE FROM work_results WHERE job_id = ?", [(job,) for job in survivors])
    return len(survivors)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="configs in tests/mutation/ (default: all)")
    parser.add_argument("--out", default=str(ROOT / ".mutation"), help="where the sessions are kept")
    parser.add_argument("--survivors", action="store_true", help="run again only the survivors of the sessions")
    args = parser.parse_args()
    names = args.names or sorted(p.stem for p in HERE.glob("*.toml"))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    with tempfile.TemporaryDirectory(prefix="fusedlora-mutation-") as tmp:
        copy = Path(tmp)
        pythonpath = copy_tree(copy)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(pythonpath), os.environ.get("PYTHONPATH")])),
                   PYTHONDONTWRITEBYTECODE="1")
        server = start_server(copy, env)
        try:
            for name in names:
                config, session = copy / HERE.relative_to(ROOT) / f"{name}.toml", out / f"{name}.sqlite"
                start = time.time()

                def cosmic(*argv):
                    return subprocess.run(argv, cwd=copy, env=env).returncode == 0

                if args.survivors:
                    print(f"{name}: {forget_survivors(session)} survivors to run again", flush=True)
                elif not (cosmic("cosmic-ray", "init", "--force", str(config), str(session))
                          and cosmic(sys.executable, str(HERE / "scope.py"), str(session), str(config))
                          and cosmic("cosmic-ray", "baseline", str(config))):  # the selection passes unmutated
                    lines.append(f"{name}: not run (the session could not be made, or its tests fail unmutated)")
                    print(lines[-1], flush=True)
                    continue
                cosmic("cosmic-ray", "exec", str(config), str(session))
                lines.append(summary(name, session, time.time() - start))
                print(lines[-1], flush=True)
        finally:
            server.terminate()  # it ends the run in progress, if any
            server.wait()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
