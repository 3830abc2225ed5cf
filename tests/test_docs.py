"""Every ```python block of README.md and docs/*.md runs as written.

A page's blocks run in order, in one fresh Python process per page, started in a temporary directory
(a block that writes files writes them there, never into the checkout), with the environment a user
has: no FUSEDLORA_* or TRITON_INTERPRET variables from the test session. Each block starts from an
empty namespace unless it is marked as continuing the block before it.

Markers, in an HTML comment on the line just before the fence (invisible on the rendered page):
    <!-- gpu -->            the block needs CUDA: skipped without it, run with it
    <!-- continue -->       the block runs in the namespace the previous block of the page left
    <!-- gpu continue -->   both
```bash blocks (installs, the benchmark, the test suite itself) are never run here; the README's test
command is checked against .ci/run instead.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKERS = {"gpu", "continue"}
RUN_TIMEOUT_S = 600

# Runs in the child: reads {page: [(label, code, fresh, gpu)]} and runs every page's blocks in order. A
# failing block ends its page (named, with its traceback), not the run: one process imports torch,
# transformers and peft once for all pages, which is most of the cost.
RUNNER = r'''
import json, sys, time, traceback
pages = json.load(open(sys.argv[1], encoding="utf-8"))
cuda = sys.argv[2] == "cuda"  # from the parent, so that a page without torch does not import it
for page, blocks in pages.items():
    print(f"=== PAGE {page}", flush=True)
    namespace, skipped, failed = None, False, False
    for label, code, fresh, gpu in blocks:
        if fresh:
            namespace, skipped = {"__name__": "__main__"}, False
        if (gpu and not cuda) or skipped:
            print(f"skipped (needs CUDA): {label}", flush=True)
            skipped = True  # a block continuing this one cannot run either
            continue
        start = time.perf_counter()
        try:
            exec(compile(code, label, "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED: {label}", flush=True)
            failed = True
            break
        print(f"ok ({time.perf_counter() - start:.1f} s): {label}", flush=True)
    print(f"=== END {page} {'FAILED' if failed else 'OK'}", flush=True)
'''


def code_blocks(path: Path):
    """[(label, code, fresh, gpu)] for the page's ```python blocks; label is 'page:line' of the fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            marks = set()
            found = re.fullmatch(r"<!--\s*(.*?)\s*-->", lines[i - 1].strip()) if i else None
            if found:
                marks = set(found.group(1).split())
                if not marks <= MARKERS:
                    raise ValueError(f"{path.name}:{i}: unknown code-block marker(s) {sorted(marks - MARKERS)}; "
                                     f"known: {sorted(MARKERS)}")
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise ValueError(f"{path.name}:{i + 1}: ```python block is never closed")
            blocks.append((f"{path.relative_to(ROOT) if ROOT in path.parents else path.name}:{i + 1}",
                           "\n".join(lines[i + 1:end]) + "\n", "continue" not in marks, "gpu" in marks))
            i = end
        i += 1
    if blocks and not blocks[0][2]:
        raise ValueError(f"{blocks[0][0]}: the first block of a page has nothing to continue")
    return blocks


def run_pages(pages, workdir: Path):
    """Runs {page: blocks} in one fresh process in workdir; returns {page: (ok, output of its blocks)}."""
    (workdir / "blocks.json").write_text(json.dumps(pages), encoding="utf-8")
    (workdir / "run_blocks.py").write_text(RUNNER, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSEDLORA_") and k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-u", "run_blocks.py", "blocks.json", "cuda" if torch.cuda.is_available() else "cpu"], cwd=workdir, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=RUN_TIMEOUT_S)
    results = {}
    for page in pages:
        _, started, rest = proc.stdout.partition(f"=== PAGE {page}\n")
        body, ended, verdict = rest.partition(f"=== END {page} ")
        if ended:
            results[page] = (verdict.startswith("OK"), body)
        else:  # the process died inside this page, or before it
            results[page] = (False, f"exit status {proc.returncode}, page {'unfinished' if started else 'never started'}:\n"
                                    f"{proc.stdout[-6000:]}")
    return results


@pytest.fixture(scope="module")
def page_results(tmp_path_factory):
    pages = {str(page.relative_to(ROOT)): code_blocks(page) for page in PAGES}
    return run_pages({name: blocks for name, blocks in pages.items() if blocks}, tmp_path_factory.mktemp("docs"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_code_blocks_run(page, page_results):
    name = str(page.relative_to(ROOT))
    if name not in page_results:
        pytest.skip(f"{name} has no ```python block")
    ok, output = page_results[name]
    assert ok, f"a code block of {name} failed:\n{output[-6000:]}"
    assert output.count("ok (") + output.count("skipped (") == len(code_blocks(page)), output


def test_a_broken_block_fails_and_markers_work(tmp_path):
    """The runner itself: a failing block fails its page and is named, and the next page still runs;
    continue shares a namespace, a fresh block does not; a gpu block runs only with CUDA."""
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "```python", "a = 1", "```",
        "<!-- continue -->", "```python", "assert a == 1", "```",
        "```python", "assert 'a' not in globals()", "```",
        "<!-- gpu -->", "```python", "import torch", "assert torch.cuda.is_available()", "```",
        "```python", "raise ValueError('broken block')", "```", "",
    ]), encoding="utf-8")
    blocks = code_blocks(page)
    assert [(fresh, gpu) for _, _, fresh, gpu in blocks] == [
        (True, False), (False, False), (True, False), (True, True), (True, False)]
    workdir = tmp_path / "work"
    workdir.mkdir()
    results = run_pages({"broken": blocks, "good": blocks[:4]}, workdir)
    ok, output = results["broken"]
    assert not ok and "ValueError: broken block" in output and "FAILED: page.md:16" in output, output
    assert output.count("ok (") == (4 if torch.cuda.is_available() else 3), output
    ok, output = results["good"]
    assert ok, output


def test_unknown_marker_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- gpus -->\n```python\npass\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown code-block marker"):
        code_blocks(page)


def test_ci_runs_the_readme_test_command():
    """.ci/run runs exactly the README's Quick start test command: what CI proves is what a user types."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## ")
    quick_start = next(section for section in readme if section.startswith("Quick start\n"))
    commands = [line.strip() for line in quick_start.splitlines() if "python -m pytest" in line]
    assert len(commands) == 1, f"expected one test command in the README's Quick start, found {commands}"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == commands[0], f".ci/run runs {ci[-1]!r}, the README says {commands[0]!r}"


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; maintainers' material belongs in docs/"


def test_benchmark_schema_page_matches_the_code():
    """docs/benchmarks.md lists the JSON row keys in the order benchmarks/suite.py writes them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import suite
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    table = page.split("Each row has these keys, in this order:")[1].split("\n\n")[1]
    documented = [key for line in table.splitlines()[2:]
                  for key in re.findall(r"`([A-Za-z_]+)`", line.split("|")[1])]
    assert documented == [*suite.ROW_KEYS, *suite.EXTRA_KEYS]
    header = re.search(r"\{(\"gpu\".*?), \"rows\"", page).group(1)
    assert re.findall(r'"(\w+)"', header) == list(suite.HEADER_KEYS)
