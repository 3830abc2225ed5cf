"""A cosmic-ray filter: the mutants of a run are those of the named definitions, one per replacement kept.

    python tests/mutation/scope.py SESSION CONFIG

CONFIG's `[cosmic-ray.filters.scope] definitions` lists top-level functions and classes of its
module-path (a class takes its methods along); a mutant whose first line lies outside all of them is
marked skipped, so that a mutation run covers one part of a file (the call-plan builders of
fusedlora/plans/single.py, not the launch sequences the kernel tests cover). No list: the whole
module. A name the module does not define is an error, so a rename cannot empty the scope silently.

cosmic-ray replaces a binary operator by each of the 11 others and a comparison by each of the 7
others; most of those are the same mutant for a test (a float `a + b` made `a | b`, `a ^ b`, `a << b`
all raise TypeError). A run keeps the replacements mutmut makes, the inverse operation and, for an
order, the boundary and the negation (KEPT), which leaves about a third of them. `all-operators = true`
in the section keeps every replacement.
"""
import ast
import sys
from pathlib import Path

from cosmic_ray.config import load_config
from cosmic_ray.tools.filters.filter_app import FilterApp
from cosmic_ray.work_item import WorkerOutcome, WorkResult

KEPT = {
    "ReplaceBinaryOperator": ("Add_Sub", "Sub_Add", "Mul_Div", "Div_Mul", "FloorDiv_Div", "Mod_Div", "Pow_Mul",
                              "LShift_RShift", "RShift_LShift", "BitAnd_BitOr", "BitOr_BitAnd", "BitXor_BitAnd"),
    "ReplaceComparisonOperator": ("Eq_NotEq", "NotEq_Eq", "Is_IsNot", "IsNot_Is", "Lt_LtE", "Lt_GtE", "LtE_Lt",
                                  "LtE_Gt", "Gt_GtE", "Gt_LtE", "GtE_Gt", "GtE_Lt"),
}


def kept(operator: str) -> bool:
    """Whether a run keeps the mutants of this cosmic-ray operator ("core/ReplaceBinaryOperator_Add_Sub")."""
    family, _, replacement = operator.split("/")[-1].partition("_")
    return family not in KEPT or replacement in KEPT[family]


def line_ranges(path: Path, names) -> list:
    """[(first, last)] lines of the top-level definitions `names` of the module at path, decorators
    included."""
    tree = ast.parse(path.read_text(), str(path))
    found = {node.name: (min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno)
             for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"{path} defines no {missing} (scope of the mutation run)")
    return [found[n] for n in names]


class ScopeFilter(FilterApp):
    def description(self):
        return __doc__

    def add_args(self, parser):
        parser.add_argument("config", help="the cosmic-ray config of the session")

    def filter(self, work_db, args):
        config = load_config(args.config)
        scope = config.sub("filters", "scope")
        names = scope.get("definitions")
        ranges = line_ranges(Path(config["module-path"]), names) if names else [(1, float("inf"))]
        every = scope.get("all-operators", False)
        for reason, test in (("outside the scope", lambda m: not any(a <= m.start_pos[0] <= b for a, b in ranges)),
                             ("a replacement left out", lambda m: not every and not kept(m.operator_name))):
            jobs = [item.job_id for item in work_db.pending_work_items if any(test(m) for m in item.mutations)]
            if jobs:
                work_db.set_multiple_results(jobs, WorkResult(output=reason, worker_outcome=WorkerOutcome.SKIPPED))


if __name__ == "__main__":
    sys.exit(ScopeFilter().main())
