"""The environment knobs: defaults, spellings, and the error a bad value gets (fusedlora/core/knobs.py)."""
import pytest

from fusedlora.core import knobs


@pytest.mark.parametrize("read,name,values", [(knobs.backend, "FUSEDLORA_BACKEND", knobs.BACKENDS),
                                              (knobs.plan, "FUSEDLORA_PLAN", knobs.PLANS)])
def test_choices(read, name, values, monkeypatch):
    monkeypatch.delenv(name, raising=False)
    assert read() == "auto"
    for raw, want in (("", "auto"), ("  ", "auto"), *((f" {v.upper()} ", v) for v in values)):
        monkeypatch.setenv(name, raw)
        assert read() == want
    monkeypatch.setenv(name, "fastest")
    with pytest.raises(ValueError, match=rf"{name} must be one of .*got 'fastest'"):
        read()


def test_debug(monkeypatch):
    monkeypatch.delenv("FUSEDLORA_DEBUG", raising=False)
    assert knobs.debug() is False
    for raw, want in (("1", True), (" True", True), ("on", True), ("0", False), ("", False), ("no", False)):
        monkeypatch.setenv("FUSEDLORA_DEBUG", raw)
        assert knobs.debug() is want
    monkeypatch.setenv("FUSEDLORA_DEBUG", "2")
    with pytest.raises(ValueError, match="FUSEDLORA_DEBUG must be"):
        knobs.debug()
