"""The verdict on one PEFT test run patched and, when it failed, unpatched (no side effects on import,
so that tests/test_peft_suite_verdict.py can check it without loading the plugin)."""
import re
from typing import Optional

# Numbers (counts, values, shapes) and addresses differ between two runs of one failure.
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
_NUMBER = re.compile(r"(?<![\w.])[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def normalise(message: str) -> str:
    return _NUMBER.sub("#", _ADDRESS.sub("0x#", message)).strip()


def failure(reports) -> Optional[str]:
    """The first failed report's exception type and message, normalised; None when none failed."""
    for r in reports:
        if r.failed:
            crash = getattr(r.longrepr, "reprcrash", None)
            text = crash.message if crash is not None else str(r.longrepr).strip().splitlines()[-1]
            return normalise(text)
    return None


# PEFT tests whose patched run differs from PEFT's by design: {test function: (the one failure the
# patched run may show, normalised, and why)}. Any other failure of these tests is judged as usual.
INTENDED = {
    "test_mixed_adapter_batches_lora_with_dora_raises": (
        "Failed: DID NOT RAISE <class 'ValueError'>",
        "patch_peft serves adapter_names= batches with DoRA adapters, which PEFT refuses"),
}


def intended(record: dict, nodeid: str) -> Optional[str]:
    """Why the record's patched failure is by design (INTENDED), or None."""
    test = nodeid.rpartition("::")[2].partition("[")[0]
    failure_by_design, why = INTENDED.get(test, (None, None))
    if record["failed"] and not record.get("failed_unpatched") and record.get("failure") == failure_by_design:
        return why
    return None


def judge(record: dict, nodeid: str = "") -> Optional[str]:
    """Why the record is a regression of ours, or None: it failed patched and passed unpatched (unless
    by design, INTENDED), or it failed both ways with another failure (a bug of the fused path hiding
    behind one of PEFT's)."""
    if not record["failed"]:
        return None
    if not record["failed_unpatched"]:
        return None if intended(record, nodeid) else record.get("error", "")
    if record.get("failure") != record.get("failure_unpatched"):
        return (f"fails patched and unpatched, differently:\n  patched:   {record.get('failure')}\n"
                f"  unpatched: {record.get('failure_unpatched')}")
    return None
