"""What a run writes: the JSON record, a markdown table (headline rows first) and a PNG plot.

The plot needs matplotlib, which the GPU machine lacks: without it the plot is skipped with a message
and everything else is written.
"""
import json
import re
from pathlib import Path

PLOT_PROVIDERS = ("peft", "addmm", "compile", "fusedlora")  # base is the floor: ratio 1 by definition


def stem(gpu, size="headline"):
    """File name stem of a result: the GPU's name, then '-full' or '-plans' for those sizes."""
    return re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-") + ("" if size == "headline" else f"-{size}")


def fmt(value, spec):
    return "–" if value is None else format(value, spec)


def mib(value):
    """MiB for people: three significant digits below 100 (the CPU run's tiny tensors), whole above."""
    return fmt(value, ".3g" if value is not None and value < 100 else ".0f")


def times(value):
    return "–" if value is None else f"{value:.2f}×"


def table(head, body):
    """A markdown table from a list of header cells and a list of rows of cells."""
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + \
        ["| " + " | ".join(str(cell) for cell in cells) + " |" for cells in body]


def _groups(rows):
    """{(case, M, K, N, r, dtype, adapters): {provider: row}}, the base row filed under every r of its
    (case, M, K, N, dtype)."""
    groups, bases = {}, {}
    for row in rows:
        if row["provider"] == "base":
            bases[(row["case"], row["M"], row["K"], row["N"], row["dtype"])] = row
        else:
            key = (row["case"], row["M"], row["K"], row["N"], row["r"], row["dtype"], row["adapters"])
            groups.setdefault(key, {})[row["provider"]] = row
    for (case, M, K, N, r, dtype, adapters), group in groups.items():
        if (case, M, K, N, dtype) in bases:
            group["base"] = bases[case, M, K, N, dtype]
    return groups


def _speedup(group, other):
    """How many times faster fusedlora is than `other` in this group (None without both timings)."""
    slow, fast = group.get(other, {}).get("ms"), group["fusedlora"]["ms"]
    return slow / fast if slow is not None and fast else None


def headline(rows):
    """Per case, one line per (M, K, N, r, dtype, adapters): fusedlora's overhead over the floor and
    its speed-up over every other provider, then peak and saved memory against PEFT's."""
    groups = {key: group for key, group in _groups(rows).items() if "fusedlora" in group}
    out = []
    for case in dict.fromkeys(key[0] for key in groups):
        keys = [key for key in groups if key[0] == case]
        present = dict.fromkeys(p for key in keys for p in groups[key])
        others = [p for p in present if p not in ("base", "fusedlora")]
        head = ["M", "K→N", "r", "dtype", "adapters", "base ms", "fusedlora ms", "overhead over base",
                *(f"speed-up over {p}" for p in others),
                "peak MiB fusedlora / peft", "saved MiB fusedlora / peft"]
        body = []
        for key in keys:
            _, M, K, N, r, dtype, adapters = key
            group = groups[key]
            fused, peft = group["fusedlora"], group.get("peft", {})
            overhead = None if fused["ratio_to_base"] is None else fused["ratio_to_base"] - 1
            body.append([M, f"{K}→{N}", r, dtype, adapters, fmt(group.get("base", {}).get("ms"), ".4f"),
                         fmt(fused["ms"], ".4f"), fmt(overhead, "+.1%"),
                         *(times(_speedup(group, p)) for p in others),
                         f"{mib(fused['peak_mb'])} / {mib(peft.get('peak_mb'))}",
                         f"{mib(fused['saved_mb'])} / {mib(peft.get('saved_mb'))}"])
        out += [f"### {case}", "", *table(head, body), ""]
    return out


def markdown(result):
    """The whole record as markdown: provenance, headline tables, then every row."""
    rows = result["rows"]
    lines = [f"# fusedlora benchmark: {result['gpu']}", "",
             f"torch {result['torch']}, triton {result['triton']}, commit {result['commit']}, "
             f"{result['date']}.",
             ""]
    if all(row["ms"] is None for row in rows):
        lines += ["No timings: this run had no CUDA GPU. Every provider was checked against a float64 "
                  "reference through the Triton interpreter on tiny shapes; timings need a GPU.", ""]
    lines += ["## Headline", "",
              "host µs (all rows) = host time of one call with the GPU idle: Python, dispatch and launches. "
              "overhead over base = fusedlora's median time over the base GEMM's, minus one; speed-up over X "
              "= X's median time over fusedlora's. Peak: CUDA memory a call allocates above what it started "
              "with. Saved: tensors autograd keeps for backward, parameters and input excluded.", ""]
    lines += headline(rows)
    head = ["case", "provider", "M", "K", "N", "r", "dtype", "adapters", "ms", "TFLOP/s", "× base", "host µs",
            "peak MiB", "saved MiB", "rel err"]
    body = [[row["case"], row["provider"], row["M"], row["K"], row["N"], fmt(row["r"], "d"), row["dtype"],
             fmt(row["adapters"], "d"), fmt(row["ms"], ".4f"), fmt(row["tflops"], ".1f"),
             fmt(row["ratio_to_base"], ".3f"), fmt(row.get("host_us"), ".0f"), mib(row["peak_mb"]),
             mib(row["saved_mb"]), fmt(row["rel_err"], ".1e")]
            for row in rows]
    lines += ["## All rows", "", *table(head, body)]
    return "\n".join(lines) + "\n"


def _series(rows, case, across, fixed):
    """{provider: sorted [(x, ratio_to_base)]} for one case, varying `across` ('M' or 'r') with the other
    keys held at `fixed`."""
    series = {}
    for row in rows:
        if (row["case"] == case and row["provider"] in PLOT_PROVIDERS and row["ratio_to_base"] is not None
                and all(row[k] == v for k, v in fixed.items())):
            series.setdefault(row["provider"], []).append((row[across], row["ratio_to_base"]))
    return {p: sorted(points) for p, points in series.items()}


def plot(result, path):
    """Overhead over the floor against M and against r, per provider and case. Returns a message."""
    rows = [row for row in result["rows"] if row["ratio_to_base"] is not None and row["provider"] != "base"]
    if not rows:
        return "plot skipped: no timings to plot"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib); JSON and markdown written"
    cases = list(dict.fromkeys(row["case"] for row in rows))
    fig, axes = plt.subplots(len(cases), 2, figsize=(11, 3.6 * len(cases)), squeeze=False)
    for ax_row, case in zip(axes, cases):
        first = next(row for row in rows if row["case"] == case)
        shape = dict(K=first["K"], N=first["N"], dtype=first["dtype"], adapters=first["adapters"])
        ranks = sorted({row["r"] for row in rows if row["case"] == case})
        ms = sorted({row["M"] for row in rows if row["case"] == case})
        r_fixed = 16 if 16 in ranks else ranks[0]
        panels = ((ax_row[0], "M", dict(shape, r=r_fixed)), (ax_row[1], "r", dict(shape, M=ms[-1])))
        for ax, across, fixed in panels:
            for provider, points in _series(rows, case, across, fixed).items():
                ax.plot(*zip(*points), marker="o", label=provider)
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(across)
            ax.set_ylabel("time / base GEMM")
            held = ", ".join(f"{k}={v}" for k, v in fixed.items() if k != "adapters")
            ax.set_title(f"{case}: {held}", fontsize=9)
            ax.legend(fontsize=8)
    fig.suptitle(f"{result['gpu']} (commit {result['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def write(result, out_dir, name):
    """<out_dir>/<name>.json, .md and .png; returns the lines to print."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown(result))
    return [f"wrote {json_path}", f"wrote {md_path}", plot(result, out_dir / f"{name}.png")]
