"""A pytest plugin that runs PEFT's own tests against models patched by fusedlora.patch_peft.

Loaded with `-p fusedlora_peft_plugin` into a pytest run over the tests/ of PEFT's sdist (see
tests/test_peft_suite.py). It
- applies patch_peft after every get_peft_model, PeftModel.from_pretrained,
  PeftMixedModel.from_pretrained, inject_adapter_in_model and BaseTuner.inject_adapter, as a user
  would after building a model;
- keeps the LoRA tests whose models have LoRA Linear layers (selected()), deselecting the rest;
- runs every test patched, and a test that fails patched once more unpatched, in the same process:
  the same failure on both (exception type and message, numbers and addresses aside) is PEFT's (or the
  environment's: no Hub here); a failure on the patched run alone, or another failure than the
  unpatched run's, is a regression of ours (verdict.py);
- records per test whether any patched layer served a call through the kernels, and the fallback
  reasons of the calls that did not, and writes everything as JSON to $FUSEDLORA_PEFT_REPORT.
Works under pytest-xdist: the per-test record travels with the test's reports.

Every run of a test (patched, and unpatched when it reruns) starts from the same seeds. Many of PEFT's
tests build their models from the global RNG without seeding it, so without this a test's data, and
with it the verdict, would depend on which tests ran before it in the same process. That matters for
PEFT's mixed-batch tests: they compare a single-adapter forward with a mixed-batch forward using
torch.allclose's default tolerance (rtol 1e-5, atol 1e-8). Patched, those two forwards run different
kernels (the single-adapter GEMM and the multi-adapter kernels), which round differently within
fp32's bounds; on about one data draw in a dozen that tolerance is tighter than two correct fp32
summation orders agree (seeds 0 to 11 of that test class: one failed). tests/test_peft_interop.py
checks mixed batches against a float64 reference with the oracle's bound instead.
"""
import json
import os
import random
import re
import sys
import types

import pytest
import torch

if not torch.cuda.is_available():  # the kernels run in the interpreter, which must be on before triton loads
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("FUSEDLORA_BACKEND", "triton")

import triton.runtime.interpreter as interpreter  # noqa: E402

import fusedlora  # noqa: E402
from fusedlora.peft import patch as peft_patch  # noqa: E402
from verdict import failure, intended, judge  # noqa: E402

if not torch.cuda.is_available():  # refuse tl.dot shapes the GPU refuses, as tests/conftest.py does
    interpreter.interpreter_builder.codegen_fns["min_dot_size"] = (
        lambda lhs, rhs: (1, 1, 32 if lhs.scalar.primitive_bitwidth == 8 else 16))


def _stub_missing(name: str, **attrs) -> None:
    """PEFT's test helpers import diffusers and datasets at module level, for tests other than these:
    a stand-in module lets them import without installing either."""
    try:
        __import__(name)
    except ImportError:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


_stub_missing("diffusers", StableDiffusionPipeline=None)
_stub_missing("datasets", load_dataset=None)

# test_custom_models.py: the parametrized model tests of every LoRA case whose model has a LoRA
# Linear or Conv1D layer (DoRA and the other variants included: they exercise the fallback), and the
# LoRA tests of the classes that test several adapters, mixed batches, gradients and custom layers.
# FUSEDLORA_PEFT_SELECTION=quick narrows the first part to a representative set of cases (half the
# tests, three quarters of the time). Conv2d, Conv3d, Embedding and MHA layers are never patched.
_CASES = {
    "all": r"Vanilla MLP \d+ LoRA|Embedding \+ transformers Conv1D \d+ (LoRA|DoRA)|MLP 2 using nn\.Parameter LoRA"
           r"|BD-LoRA|(Conv2d|Conv3d|MHA) 2 LoRA-",
    "quick": r"Vanilla MLP [1456] LoRA-|Vanilla MLP 7 LoRA with DoRA|Vanilla MLP 1 LoRA with lora_b bias"
             r"|Embedding \+ transformers Conv1D [13] LoRA-|Embedding \+ transformers Conv1D 1 (DoRA|LoRA trainable)"
             r"|MLP 2 using nn\.Parameter LoRA|BD-LoRA both|Conv2d 2 LoRA-",
}
_LORA_CLASSES = re.compile(r"::(TestMultipleActiveAdapters|TestMixedAdapterBatches|TestRequiresGrad"
                           r"|TestDynamicDispatch|TestLayerRepr|TestMultiRankAdapter)::.*(lora|LoRA|Lora)")


def selected(nodeid: str, selection: str = "all") -> bool:
    if "test_mixed.py::" in nodeid:
        return True  # every test there mixes LoRA with other tuners, or other tuners alone (cheap)
    if "test_custom_models.py::" not in nodeid:
        return False
    if "::TestPeftCustomModel::" in nodeid:
        return "-LoraConfig-" in nodeid and re.search(r"\[.*(" + _CASES[selection] + ")", nodeid) is not None
    return bool(_LORA_CLASSES.search(nodeid))


# ---- patching ----------------------------------------------------------------------------------

_state = {"patching": True, "hits": 0, "reasons": set()}


def _patch(model):
    if _state["patching"] and isinstance(model, torch.nn.Module):
        fusedlora.patch_peft(model)
    return model


def _install():
    import peft
    import peft.mapping
    import peft.mapping_func
    from peft import PeftMixedModel, PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    get_peft_model = peft.mapping_func.get_peft_model
    inject_adapter_in_model = peft.mapping.inject_adapter_in_model

    def patched_get_peft_model(*args, **kwargs):
        return _patch(get_peft_model(*args, **kwargs))

    def patched_inject_adapter_in_model(*args, **kwargs):
        return _patch(inject_adapter_in_model(*args, **kwargs))

    for module in (peft, peft.mapping_func):
        module.get_peft_model = patched_get_peft_model
    for module in (peft, peft.mapping):
        module.inject_adapter_in_model = patched_inject_adapter_in_model

    for cls in (PeftModel, PeftMixedModel):
        def from_pretrained(klass, *args, _original=cls.from_pretrained.__func__, **kwargs):
            return _patch(_original(klass, *args, **kwargs))
        cls.from_pretrained = classmethod(from_pretrained)

    inject_adapter = BaseTuner.inject_adapter

    def patched_inject_adapter(self, model, *args, **kwargs):
        result = inject_adapter(self, model, *args, **kwargs)
        _patch(model)
        return result

    BaseTuner.inject_adapter = patched_inject_adapter

    # What a patched layer did: a call served by the kernels, or a fallback and its reason.
    served, mixed, report = peft_patch.served_forward, peft_patch.mixed_batch_forward, peft_patch._Reporter.__call__

    def count(fn):
        def wrapper(*args, **kwargs):
            _state["hits"] += 1
            return fn(*args, **kwargs)
        return wrapper

    def record(self, layer_name, reason, costly):
        _state["reasons"].add(reason)
        return report(self, layer_name, reason, costly)

    peft_patch.served_forward, peft_patch.mixed_batch_forward = count(served), count(mixed)
    peft_patch.dora_forward = count(peft_patch.dora_forward)
    # The patched forward's fast path (one plain adapter over an nn.Linear, decided once per layer
    # state) calls fused_call directly, without served_forward.
    peft_patch.fused_call = count(peft_patch.fused_call)
    peft_patch._Reporter.__call__ = record


def reason_kind(reason: str) -> str:
    """A fallback reason without the names in it (adapters, layers), so that reasons count together."""
    return re.sub(r"'[^']*'|\[[^\]]*\]", "…", reason)


# ---- hooks -------------------------------------------------------------------------------------

def pytest_configure(config):
    _install()


def pytest_collection_modifyitems(config, items):
    selection = os.environ.get("FUSEDLORA_PEFT_SELECTION", "all")
    keep = [item for item in items if selected(item.nodeid, selection)]
    config.hook.pytest_deselected(items=[item for item in items if not selected(item.nodeid, selection)])
    items[:] = keep


SEED = 0


def _seeded_run(item, nextitem):
    from _pytest.runner import runtestprotocol

    random.seed(SEED)
    torch.manual_seed(SEED)
    try:
        import numpy
        numpy.random.seed(SEED)
    except ImportError:
        pass
    return runtestprotocol(item, nextitem=nextitem, log=False)


def _failed(reports) -> bool:
    return any(r.failed for r in reports)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    _state.update(patching=True, hits=0, reasons=set())
    reports = _seeded_run(item, nextitem)
    record = {"hits": _state["hits"], "reasons": sorted(_state["reasons"]), "failed": _failed(reports),
              "skipped": not _failed(reports) and any(r.skipped for r in reports)}
    if record["failed"]:
        _state["patching"] = False
        try:
            plain = _seeded_run(item, nextitem)
        finally:
            _state["patching"] = True
        record["failed_unpatched"] = _failed(plain)
        record["failure"], record["failure_unpatched"] = failure(reports), failure(plain)
        record["error"] = next(str(r.longrepr)[-2000:] for r in reports if r.failed)
    for report in reports:
        report.user_properties.append(("fusedlora", record))
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


_records = {}  # nodeid -> record, in the process that writes the report


def pytest_runtest_logreport(report):
    for key, record in report.user_properties:
        if key == "fusedlora":
            _records[report.nodeid] = record


def summary(records) -> dict:
    """Counts over the tests: outcomes patched, regressions (verdict.judge), how
    many tests had a call served by the kernels, and per fallback reason how many of the others hit it."""
    out = {"tests": len(records), "passed": 0, "skipped": 0, "failed_both": 0, "by_design": {}, "regressions": {},
           "fused": 0, "not_fused": {}, "no_patched_call": 0}
    for nodeid, r in sorted(records.items()):
        why = judge(r, nodeid)
        if not r["failed"]:
            out["skipped" if r["skipped"] else "passed"] += 1
        elif intended(r, nodeid):
            out["by_design"][nodeid] = intended(r, nodeid)
        elif why is None:
            out["failed_both"] += 1
        else:
            out["regressions"][nodeid] = why
        if r["hits"]:
            out["fused"] += 1
        elif r["reasons"]:
            for kind in {reason_kind(reason) for reason in r["reasons"]}:
                out["not_fused"][kind] = out["not_fused"].get(kind, 0) + 1
        else:
            out["no_patched_call"] += 1
    return out


def pytest_sessionfinish(session):
    path = os.environ.get("FUSEDLORA_PEFT_REPORT")
    if path and not hasattr(session.config, "workerinput"):  # the xdist controller, or a plain run
        with open(path, "w") as f:
            json.dump({**summary(_records), "records": _records}, f, indent=1, sort_keys=True)
