"""The version matrix: the kernel tests under every Triton minor setup.py admits, and the PEFT-interop
tests at the oldest peft and transformers it admits.

    python tests/compat/matrix.py                 every row, every test file of the row (by hand)
    python tests/compat/matrix.py --ci            the oldest row of each kind, a few files (tests/test_compat.py)
    python tests/compat/matrix.py --triton 3.6,3.9 --kinds triton
    python tests/compat/matrix.py --json out.json

Each row is a virtual environment made with --system-site-packages (torch, pytest and the rest come
from the machine; a CPU torch, never one pip would pull) with the row's versions installed on top:
- triton rows: one row per Triton minor from setup.py's floor to the newest on the package index, the
  latest patch of each, and numpy < 2.4 where that Triton's interpreter needs it (before 3.7 it fails
  on numpy 2.4 with "only 0-dimensional arrays can be converted to Python scalars", triton #9171);
- the peft row: setup.py's peft and transformers floors, with the `kernels` release that transformers
  declares (a machine may hold a newer one, on which an old transformers fails at import).
The tests run through the Triton interpreter from the repository root, with a folder holding only a
`fusedlora` link on PYTHONPATH (the repository root must stay off sys.path: its kernels/ would shadow
the PyPI package `kernels`). Environments and the wheels of the packages a row names live under --cache (default
.ci/cache/compat, gitignored), so a rerun on one machine downloads nothing; an environment is rebuilt
when its row's versions change.

Prints one line per row (versions, passed/failed/skipped, seconds). Exits 1 if a row's tests failed, 3
if pip could not build a row's environment (no package index, say) and no row failed, 0 otherwise.
"""
import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The kernel tests: every launcher and plan through the interpreter, the fast launch against Triton's
# binder on the sm_90 host path (test_fast_launch) and the sm_90 build check (test_gpu_compile), whose
# Triton internals are the ones that move between releases.
TRITON_TESTS = ["test_lora_linear.py", "test_lora_add.py", "test_multi_lora.py", "test_dropout.py",
                "test_bad_input.py", "test_dora.py", "test_planner.py", "test_multi_planner.py",
                "test_specialization.py", "test_dot_precision.py", "test_call_plans.py", "test_call_plans_train.py",
                "test_plan_keys.py", "test_signature.py", "test_fast_launch.py", "test_configs.py",
                "test_multi_dora.py", "test_moe_routing.py", "test_moe_kernels.py", "test_moe_lora.py",
                "test_gpu_compile.py"]
# Everything that builds a PEFT model or a transformers one. Not PEFT's own suite (test_peft_suite.py):
# its floors (1200 tests, 290 served) are set for peft 0.21.2, and peft 0.18.0's suite selects 924, of
# which 418 fail with and without patch_peft under transformers 5.4 (its fixtures patch
# transformers.utils.hub._is_offline_mode, which 5.4 lacks); run by hand it had 0 regressions.
PEFT_TESTS = ["test_peft_interop.py", "test_peft_layers.py", "test_peft_decisions.py", "test_dora_peft.py",
              "test_stale_weights.py", "test_adapter_io.py", "test_qlora.py", "test_modules.py", "test_pool.py",
              "test_compile_models.py", "test_serve.py", "test_train_bench.py", "test_pool_dora.py",
              "test_pool_updates.py", "test_peft_mixed_dora.py", "test_peft_experts.py", "test_expert_lora.py",
              "test_experts_forward.py"]
# What CI runs (tests/test_compat.py): lora_linear and multi_lora_linear, and patch_peft's model-level
# checks, at the floors. A few minutes on 2 cores; the rest of each file runs in the main suite.
CI_TESTS = {"triton": ["test_lora_linear.py::test_matches_reference", "test_multi_lora.py::test_matches_reference"],
            "peft": ["test_peft_interop.py", "test_adapter_io.py"]}
NUMPY_BEFORE_2_4 = (3, 7)  # Triton minors below this need numpy < 2.4 in the interpreter
SETUP_FAILED = 3  # the exit status when pip could not build a row's environment, and no row failed its tests
SUMMARY_RE = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def floors(setup_py: Path = ROOT / "setup.py") -> dict:
    """{package: floor} of every `name>=version` requirement in setup.py (install_requires and extras)."""
    found = {}
    for node in ast.walk(ast.parse(setup_py.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9][0-9.]*)(?:,.*)?", node.value)
            if match:
                name, version = match.groups()
                if found.setdefault(name, version) != version:
                    raise ValueError(f"setup.py declares two floors for {name}: {found[name]} and {version}")
    return found


def version_tuple(text: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def pip(python, *args, check=True):
    cmd = [str(python), "-m", "pip", *args, "--disable-pip-version-check"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(done.stdout or '')[-2000:]}{(done.stderr or '')[-3000:]}")
    return done


def triton_minors(floor: str, cache: Path) -> list:
    """Every Triton minor from `floor` on, as the newest patch of each: from the package index, or, when
    it cannot be reached, from the wheels already in the cache."""
    done = pip(sys.executable, "index", "versions", "triton", check=False)
    line = next((l for l in done.stdout.splitlines() if l.startswith("Available versions:")), None)
    if line is not None:
        versions = [v.strip() for v in line.split(":", 1)[1].split(",")]
    else:
        versions = [p.name.split("-")[1] for p in (cache / "wheels").glob("triton-*.whl")]
        if not versions:
            raise RuntimeError(f"the package index cannot be reached and {cache / 'wheels'} holds no triton wheel:\n"
                               + done.stderr[-1000:])
    newest = {}
    for v in versions:
        if re.fullmatch(r"\d+\.\d+\.\d+", v) and version_tuple(v) >= version_tuple(floor):
            minor = version_tuple(v)[:2]
            if version_tuple(v) > version_tuple(newest.get(minor, "0")):
                newest[minor] = v
    return [newest[m] for m in sorted(newest)]


def triton_wheel(version: str, cache: Path) -> Path:
    """The triton wheel for this Python, downloaded once into the cache."""
    wheels = cache / "wheels"
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for path in wheels.glob(f"triton-{version}-{tag}-*.whl"):
        return path
    wheels.mkdir(parents=True, exist_ok=True)
    pip(sys.executable, "download", "--no-deps", "-q", "-d", str(wheels), f"triton=={version}")
    return next(wheels.glob(f"triton-{version}-{tag}-*.whl"))


def environment(name: str, requirements: list, cache: Path) -> Path:
    """A venv over the machine's site-packages with `requirements` installed on top; reused while the
    requirements stay the same. Returns its python."""
    venv = cache / "venvs" / name
    python = venv / "bin" / "python"
    stamp = venv / "fusedlora-requirements.json"
    if stamp.exists() and json.loads(stamp.read_text()) == requirements and python.exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    import torch  # the machine's torch, pinned so that no requirement pulls another build
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    install(python, constraints, requirements, cache)
    # transformers imports the `kernels` package whenever it is installed, and an older transformers
    # fails at import on a newer kernels (5.0 and 5.3 on kernels 0.19: "Either a revision or a version
    # must be specified"): install the range the row's transformers declares for it.
    spec = ""
    if any(r.startswith("transformers") for r in requirements):
        spec = subprocess.run([str(python), "-c", KERNELS_SPEC], capture_output=True, text=True).stdout.strip()
    if spec:
        install(python, constraints, [spec], cache)
    stamp.write_text(json.dumps(requirements))
    return python


def install(python: Path, constraints: Path, requirements: list, cache: Path) -> None:
    """pip install, the named packages' wheels kept in the cache (pip's own HTTP cache does not keep
    them on every machine): a rebuilt environment asks the index, but downloads nothing it has. Their
    dependencies mostly come from the machine's site-packages."""
    wheels = cache / "wheels"
    for spec in requirements:
        if not spec.endswith(".whl"):
            pip(python, "download", "-q", "--no-deps", "-c", str(constraints), "-d", str(wheels), spec)
    pip(python, "install", "-q", "-c", str(constraints), "--find-links", str(wheels), *requirements)


# The `kernels` requirement the installed transformers declares (under one of its extras), or nothing.
KERNELS_SPEC = ("import importlib.metadata as m, re\ntry:\n    rs = m.requires('transformers') or []\n"
                "except m.PackageNotFoundError:\n    rs = []\n"
                "print(next((r.split(';')[0].replace(' ', '') for r in rs if re.match(r'kernels\\b', r)), ''))")


def rows_for(args, cache: Path) -> list:
    """(name, kind, requirements, test files) of every row asked for."""
    declared = floors()
    rows = []
    if "triton" in args.kinds:
        versions = triton_minors(declared["triton"], cache)
        if args.ci:
            versions = versions[:1]
        elif args.triton:
            wanted = {tuple(int(p) for p in m.split(".")[:2]) for m in args.triton.split(",")}
            versions = [v for v in versions if version_tuple(v)[:2] in wanted]
            missing = wanted - {version_tuple(v)[:2] for v in versions}
            if missing:
                raise SystemExit(f"--triton: no admitted Triton release for {sorted(missing)} (floor "
                                 f"{declared['triton']})")
        for version in versions:
            requirements = [str(triton_wheel(version, cache))]
            if version_tuple(version)[:2] < NUMPY_BEFORE_2_4:
                requirements.append("numpy<2.4")
            tests = CI_TESTS["triton"] if args.ci else TRITON_TESTS
            rows.append((f"triton-{version}", "triton", requirements, tests))
    if "peft" in args.kinds:
        requirements = [f"peft=={declared['peft']}", f"transformers=={declared['transformers']}"]
        tests = CI_TESTS["peft"] if args.ci else PEFT_TESTS
        rows.append((f"peft-{declared['peft']}-transformers-{declared['transformers']}", "peft", requirements,
                     tests))
    return rows


PROBE = ("import os, numpy, torch, triton, peft, transformers, fusedlora; print(f'torch {torch.__version__} | "
         "triton {triton.__version__} | numpy {numpy.__version__} | peft {peft.__version__} | transformers "
         "{transformers.__version__} | fusedlora from {os.path.realpath(fusedlora.__file__)}')")


def run_row(name: str, kind: str, requirements: list, tests: list, cache: Path, jobs: int) -> dict:
    t0 = time.monotonic()
    result = dict(row=name, kind=kind, requirements=[Path(r).name if r.endswith(".whl") else r for r in requirements],
                  tests=tests, ok=False)
    try:
        python = environment(name, requirements, cache)
    except RuntimeError as e:  # pip could not build it (no package index, say)
        result.update(versions="", error=str(e), setup_failed=True, seconds=round(time.monotonic() - t0))
        return result
    with tempfile.TemporaryDirectory() as path_dir:
        (Path(path_dir) / "fusedlora").symlink_to(ROOT / "fusedlora")
        # Nothing of a calling test session (tests/test_compat.py runs this inside pytest).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FUSEDLORA_", "PYTEST_"))
               and k not in ("TRITON_INTERPRET", "PYTHONPATH")}
        env.update(PYTHONPATH=path_dir, PYTHONUNBUFFERED="1")
        probe = subprocess.run([str(python), "-c", PROBE], cwd=path_dir, env=env, capture_output=True, text=True)
        result["versions"] = probe.stdout.strip()
        if probe.returncode != 0 or f"from {ROOT / 'fusedlora'}" not in probe.stdout:
            result.update(error="the row's environment does not import fusedlora from this checkout:\n"
                          + probe.stdout[-1000:] + probe.stderr[-2000:], seconds=round(time.monotonic() - t0))
            return result
        cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-n", str(jobs)] if jobs > 1 else []),
               *[f"tests/{t}" for t in tests]]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {kind_: int(n) for n, kind_ in SUMMARY_RE.findall(last)}
    result.update(passed=counts.get("passed", 0), failed=counts.get("failed", 0),
                  errors=counts.get("error", 0) + counts.get("errors", 0), skipped=counts.get("skipped", 0),
                  exit=done.returncode, seconds=round(time.monotonic() - t0))
    result["ok"] = done.returncode == 0 and result["passed"] > 0
    if not result["ok"]:
        result["error"] = done.stdout[-6000:] + done.stderr[-2000:]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help="the oldest row of each kind, CI's few test files")
    parser.add_argument("--kinds", default="triton,peft", help="comma-separated: triton, peft")
    parser.add_argument("--triton", default="", help="comma-separated Triton minors (default: every admitted one)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".ci" / "cache" / "compat")
    parser.add_argument("--jobs", type=int, default=2, help="pytest-xdist workers per row (1: none)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    args.kinds = {k.strip() for k in args.kinds.split(",") if k.strip()}
    if not args.kinds or args.kinds - {"triton", "peft"}:
        parser.error(f"--kinds takes triton and/or peft, got {sorted(args.kinds)}")
    cache = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    try:  # as in a checkout: fusedlora/kernels -> ../kernels (a fresh clone has no such link)
        (ROOT / "fusedlora" / "kernels").symlink_to("../kernels")
    except FileExistsError:
        pass
    t0 = time.monotonic()
    results = []
    try:
        rows = rows_for(args, cache)
    except RuntimeError as e:  # the Triton wheels could not be listed or downloaded
        print(f"=== no row could be set up:\n{e}")
        return SETUP_FAILED
    for name, kind, requirements, tests in rows:
        print(f"=== {name}: {' '.join(tests)}", flush=True)
        result = run_row(name, kind, requirements, tests, cache, args.jobs)
        results.append(result)
        if not result["ok"]:
            print(result.get("error", ""), flush=True)
        print(line(result), flush=True)
    print(f"=== summary ({round(time.monotonic() - t0)} s)")
    for result in results:
        print(line(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if any(not r["ok"] and not r.get("setup_failed") for r in results):
        return 1
    return SETUP_FAILED if any(r.get("setup_failed") for r in results) else 0


def line(result: dict) -> str:
    verdict = "ok  " if result["ok"] else "FAIL"
    counts = (f"{result.get('passed', 0)} passed, {result.get('failed', 0)} failed, {result.get('errors', 0)} "
              f"errors, {result.get('skipped', 0)} skipped")
    return f"{verdict} {result['row']:34} {counts}, {result['seconds']} s | {result['versions'].split(' | fusedlora')[0]}"


if __name__ == "__main__":
    sys.exit(main())
