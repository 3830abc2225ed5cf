"""The PEFT-suite plugin's verdict (tests/peft_suite/verdict.py): a test that fails both patched and
unpatched is PEFT's only when it fails the same way."""
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent / "peft_suite"))
from verdict import failure, intended, judge, normalise  # noqa: E402


def report(message=None):
    crash = None if message is None else SimpleNamespace(message=message)
    return SimpleNamespace(failed=message is not None, longrepr=SimpleNamespace(reprcrash=crash))


def record(patched, unpatched):
    return dict(failed=patched is not None, failed_unpatched=unpatched is not None, error="trace",
                failure=failure([report(), report(patched)]), failure_unpatched=failure([report(unpatched)]))


def test_numbers_and_addresses_do_not_make_another_failure():
    assert normalise("AssertionError: 3 of 100 differ (max 1.5e-03) at <Foo 0x7f3a2b>") == \
        normalise("AssertionError: 7 of 100 differ (max 2.25e-01) at <Foo 0x7f9910>")
    assert normalise("ValueError: float32 x") == "ValueError: float32 x"  # digits inside names stay


def test_verdicts():
    assert judge(record(None, None)) is None
    assert judge(record("OSError: no Hub at 127.0.0.1:9", "OSError: no Hub at 127.0.0.1:9")) is None
    assert judge(record("AssertionError: tensors differ", None)) == "trace"
    changed = judge(record("RuntimeError: shape mismatch", "OSError: no Hub at 127.0.0.1:9"))
    assert "differently" in changed and "RuntimeError" in changed and "OSError" in changed


def test_a_difference_by_design_is_no_regression_only_as_designed():
    """PEFT's test that adapter_names= with a DoRA adapter raises fails patched by design (patch_peft
    serves that batch): not a regression when it fails exactly so; any other failure of it still is."""
    node = "tests/test_custom_models.py::TestMixedAdapterBatches::test_mixed_adapter_batches_lora_with_dora_raises"
    by_design = record("Failed: DID NOT RAISE <class 'ValueError'>", None)
    assert judge(by_design, node) is None and intended(by_design, node)
    assert judge(by_design, node.replace("with_dora_raises", "other")) == "trace"
    assert judge(record("AssertionError: tensors differ", None), node) == "trace"
