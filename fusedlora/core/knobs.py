"""Every environment variable fusedlora reads: its name, its values, how it is parsed, its error.

    FUSEDLORA_BACKEND  auto (default) | triton | torch
        Which implementation serves a call (fusedlora/core/backend.py): auto takes the Triton kernels
        for CUDA tensors and the PyTorch backend elsewhere.
    FUSEDLORA_PLAN     auto (default) | fused | split | decode
        Forces an execution plan on every call (fusedlora/plans/planner.py says what each means for
        the single- and the multi-adapter op); auto lets the planner choose from the shapes.
    FUSEDLORA_DEBUG    0 (default) | 1
        1 checks the values of adapter ids and ranks on CUDA too: a host sync per call.

Values are case-insensitive and may carry spaces; empty means the default; anything else is a
ValueError naming the variable and its values. Each is read from os.environ on every call, so that a
test or a user can switch it at run time; a value spelled as listed is then one lookup in a constant
table, and only other spellings are stripped and lowered. No cache that fills at run time: torch.compile
traces these reads (an lru_cache in a traced function draws a dynamo warning).
"""
import os

BACKEND = "FUSEDLORA_BACKEND"
PLAN = "FUSEDLORA_PLAN"
DEBUG = "FUSEDLORA_DEBUG"

BACKENDS = ("auto", "triton", "torch")
PLANS = ("auto", "fused", "split", "decode")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_EXACT_BACKEND, _EXACT_PLAN = {v: v for v in BACKENDS}, {v: v for v in PLANS}


def _choice(name: str, raw: str, values: tuple) -> str:
    choice = raw.strip().lower()
    if not choice:
        return values[0]
    if choice not in values:
        raise ValueError(f"{name} must be one of {values}, got {raw!r}")
    return choice


def backend() -> str:
    """FUSEDLORA_BACKEND: one of BACKENDS."""
    raw = os.environ.get(BACKEND)
    return "auto" if raw is None else _EXACT_BACKEND.get(raw) or _choice(BACKEND, raw, BACKENDS)


def plan() -> str:
    """FUSEDLORA_PLAN: one of PLANS."""
    raw = os.environ.get(PLAN)
    return "auto" if raw is None else _EXACT_PLAN.get(raw) or _choice(PLAN, raw, PLANS)


def debug() -> bool:
    """FUSEDLORA_DEBUG: whether to check on the device what would need a host sync."""
    raw = os.environ.get(DEBUG)
    if raw is None:
        return False
    flag = raw.strip().lower()
    if flag in _TRUE:
        return True
    if flag in _FALSE or not flag:
        return False
    raise ValueError(f"{DEBUG} must be one of {_FALSE[0]!r} or {_TRUE[0]!r} (or true/false, yes/no, on/off), "
                     f"got {raw!r}")


# The raw values of FUSEDLORA_BACKEND and FUSEDLORA_PLAN, for the keys of call plans
# (fusedlora/core/specialization.py): a changed setting is a new key, so it takes
# effect on the next call as it does for every other. CPython's os.environ keeps its encoded entries in a dict (`_data`):
# reading that directly costs ~0.1 µs against ~1.2 µs for os.environ.get of an unset variable (2-core
# CPU), and sees every change made through os.environ (as os.environ.get does). Elsewhere, the get.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEYS = tuple(os.environ.encodekey(name) for name in (BACKEND, PLAN))
except AttributeError:
    _ENV_DATA = None


def call_state() -> tuple:
    """What the settings that choose a single-adapter call's path are set to, unparsed (a cache key)."""
    if _ENV_DATA is not None:
        data, (backend_key, plan_key) = _ENV_DATA, _ENV_KEYS
        return data.get(backend_key), data.get(plan_key)
    return os.environ.get(BACKEND), os.environ.get(PLAN)

