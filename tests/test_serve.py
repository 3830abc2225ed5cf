"""The serving benchmark on CPU: tiny, through the kernels in the interpreter. Its logit check passes
for fusedlora and fails for a broken pool, the static-cache decode loop (what a CUDA graph captures)
runs, greedy tokens equal PEFT's in float32, and no throughput is printed."""
import json
import math
import pathlib
import sys

import pytest
import torch
from conftest import CUDA
from moe_models import needs_expert_floors

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import serve  # noqa: E402

pytestmark = pytest.mark.skipif(CUDA, reason="on a GPU the benchmark is run for its numbers, not as a test")


def test_serving_benchmark_runs_tiny_on_cpu(capsys, tmp_path):
    assert serve.main(["--out", str(tmp_path), "--cases", "main"]) == 0
    out = capsys.readouterr().out
    assert "Throughput needs a GPU" in out and "tokens/s" not in out
    result = json.loads((tmp_path / "serve-cpu-check.json").read_text())
    assert result["ok"] and result["logit_check"]["ok"]
    rows = {row["provider"]: row for row in result["logit_check"]["rows"]}
    assert set(rows) == {"peft", "fusedlora", "fusedlora-static"}
    assert rows["fusedlora-static"]["positions"] == "decode"
    for row in rows.values():
        assert row["max_rel_err"] <= result["logit_check"]["absolute_bound"]
    # In float32 the rounding differences are ~1e-7 of the logits: every greedy choice must agree.
    agreement = {row["provider"]: row["tokens_equal_to_peft"] for row in result["providers"]}
    assert agreement == {"peft": None, "fusedlora": 1.0, "fusedlora-static": 1.0}
    assert "fusedlora-static  greedy tokens equal to PEFT's in 100.0% of positions" in out


def test_dora_and_rl_cases_check_against_float64_on_cpu(capsys, tmp_path):
    """The DoRA mixed batch (DoRA and plain adapters and a base row; PEFT runs each adapter alone) and the
    RL loop (updates from memory, then a batch) on the tiny model through the kernels: both checks pass,
    every provider has its row (the update latency a GPU-only number), no timing is printed, and
    greedy tokens equal PEFT's in float32."""
    assert serve.main(["--out", str(tmp_path), "--cases", "dora,rl"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" not in out and " ms" not in out
    result = json.loads((tmp_path / "serve-cpu-check-dora-rl.json").read_text())
    assert result["ok"] and "logit_check" not in result
    for case in ("dora", "rl"):
        check = result[case]["check"]
        assert check["ok"] and [row["provider"] for row in check["rows"]] == [f"{case}/peft", f"{case}/fusedlora"]
        assert all(row["max_rel_err"] <= check["absolute_bound"] for row in check["rows"])
    rows = {row["provider"]: row for row in result["providers"]}
    assert list(rows) == ["dora/peft-per-adapter", "dora/fusedlora", "rl/peft-set-state-dict", "rl/fusedlora",
                          "rl/peft-reload"]
    assert all(row["seconds"] is None for row in rows.values())
    assert all(rows[f"rl/{name}"]["update_s"] is None for name in ("fusedlora", "peft-set-state-dict", "peft-reload"))
    assert {name: row["tokens_equal_to_peft"] for name, row in rows.items()} == {
        "dora/peft-per-adapter": None, "dora/fusedlora": 1.0, "rl/peft-set-state-dict": None, "rl/fusedlora": 1.0,
        "rl/peft-reload": 1.0}


def test_dora_check_fails_when_a_scale_is_wrong(monkeypatch):
    """One DoRA adapter's scale in one layer off by 5% (a stale or wrong g): the pool's rows fail the
    DoRA check, PEFT's pass. The check is under test: the PyTorch backend is faster."""
    import serve_dora
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    setup = serve_dora.DoraSetup(serve.parse([]))
    layer = setup.pool.layers["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.col_scale[setup.pool._loaded["a0"].slot].mul_(1.05)  # derived, not in what the layers watch
        sequences = torch.cat([setup.prompts, setup.prompts[:, :3]], 1)
        check = serve_dora.check(setup, sequences, setup.names, "dora")
    assert {row["provider"]: row["ok"] for row in check["rows"]} == {"dora/peft": True, "dora/fusedlora": False}


@pytest.fixture(scope="module")
def tiny():
    return serve.Setup(serve.parse([]))


def test_logit_check_fails_when_a_layer_serves_the_wrong_update(tiny, monkeypatch):
    """Every adapter's update in one layer (layer 0's q_proj) flipped in sign: PEFT still passes, the
    pool's rows fail, through the full forward and through the static-cache decode loop. The check is
    under test, not the kernels (the end-to-end test runs those): the PyTorch backend is faster."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    layer = tiny.pool.layers["model.layers.0.self_attn.q_proj"]
    sequences = torch.cat([tiny.prompts, tiny.prompts[:, :3]], 1)  # any tokens serve teacher forcing
    with torch.no_grad(), tiny.pool.use(tiny.names):
        layer.scalings.neg_()
        try:
            decoder = serve.StaticDecoder(tiny.served, tiny.prompts, 3)
            check = serve.check_logits(tiny, sequences, {"fusedlora-static": decoder})
        finally:
            layer.scalings.neg_()
    ok = {row["provider"]: row["ok"] for row in check["rows"]}
    assert ok == {"peft": True, "fusedlora": False, "fusedlora-static": False} and not check["ok"]


def test_static_decoder_keeps_its_tensors_and_restarts(tiny, monkeypatch):
    """What a captured decode step relies on: a run restarts from an empty cache without reallocating
    anything the step reads or writes, so two runs generate the same tokens (the end-to-end test
    compares them with PEFT's). PyTorch backend, as above."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    with torch.no_grad(), tiny.pool.use(tiny.names):
        decoder = serve.StaticDecoder(tiny.served, tiny.prompts, 3)
        first = decoder.run()[0]
        state = [decoder.token, decoder.logits] + [t for layer in decoder.cache.layers
                                                   for t in (layer.keys, layer.values, layer.cumulative_length)]
        addresses = [t.data_ptr() for t in state]
        second = decoder.run()[0]
        assert [t.data_ptr() for t in state] == addresses
        assert int(decoder.cache.layers[0].cumulative_length) == tiny.prompts.shape[1] + 2
        assert torch.equal(first, second)


def test_bounds_per_row():
    """fusedlora's row passes within 2x PEFT's error on that row plus u; a NaN row never passes; PEFT
    is held to the absolute bound only."""
    peft = torch.tensor([1e-6, 1e-6, 1e-6], dtype=torch.float64)
    fused = torch.tensor([2e-6, 3e-6, math.nan], dtype=torch.float64)
    row = serve.judge("fusedlora", "all", fused, peft, torch.float32, 128)
    assert not row["ok"] and row["worst_row"] == 2
    assert serve.judge("fusedlora", "all", fused[:1], peft[:1], torch.float32, 128)["ok"]
    assert not serve.judge("fusedlora", "all", fused[1:2], peft[1:2], torch.float32, 128)["ok"]
    assert serve.judge("peft", "all", fused[1:2], fused[1:2], torch.float32, 128)["ok"]
    assert not serve.judge("peft", "all", torch.tensor([1e-3]), torch.tensor([1e-3]), torch.float32, 128)["ok"]


def test_scenario_presets_and_overrides(monkeypatch):
    """On a GPU the scenario sets what the flags leave unset; on CPU the tiny run is always the same."""
    assert vars(serve.parse(["--scenario", "large", "--batch", "8"])) | {"out": None} == \
        dict(serve.TINY, scenario="large", out=None, dry_run=False, moe=False, cases=["main", "dora", "rl"])
    monkeypatch.setattr(serve, "CUDA", True)
    args = serve.parse(["--scenario", "large", "--repeats", "2"])
    assert (args.adapters, args.batch, args.new_tokens, args.repeats) == (64, 64, 32, 2)
    assert serve.parse([]).adapters == 8 and serve.adapter_ranks(8) == [8, 16, 24, 32, 40, 48, 56, 64]


def test_timed_results_are_reported_and_written(capsys, tmp_path):
    """The GPU-only end of main on made-up timings: tokens/s, speed-up over PEFT and token agreement
    per provider, and the JSON named after the scenario."""
    peft_tokens = torch.tensor([[1, 2], [3, 4]])
    timings = {"peft": (peft_tokens, 2.0), "fusedlora": (torch.tensor([[1, 2], [3, 5]]), 0.5)}
    rows = serve.report_providers(timings, 4)
    assert rows[1] == dict(provider="fusedlora", tokens_equal_to_peft=0.75, seconds=0.5, tokens_per_s=8.0,
                           speedup_over_peft=4.0)
    assert "8.0 tokens/s" in capsys.readouterr().out
    args = serve.parse(["--out", str(tmp_path)])
    result = dict(gpu="cpu", scenario="large", providers=rows)
    assert serve.finish(result, args, 1) == 1
    written = json.loads((tmp_path / "serve-cpu-check-large.json").read_text())
    assert written["ok"] is False and written["providers"][0]["tokens_per_s"] == 2.0


@pytest.mark.skipif(CUDA, reason="on a GPU the benchmark is run for its numbers, not as a test")
@needs_expert_floors
def test_moe_serving_row_checks_on_cpu(capsys, tmp_path, monkeypatch):
    """serve.py --moe: a tiny Qwen3-MoE whose adapters carry LoRA on the expert parameters; PEFT's grouped
    runs, patch_peft's adapter_names= batch and the AdapterPool all within the bounds of the logit check;
    a pool that serves every row the wrong adapter fails it."""
    import serve_moe
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    assert serve.main(["--moe", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("| yes |") == 3 and "peft-patched" in out and "fusedlora" in out
    assert list(tmp_path.glob("serve-moe-*.json"))
    real = serve_moe.fusedlora.AdapterPool.use
    monkeypatch.setattr(serve_moe.fusedlora.AdapterPool, "use", lambda self, names: real(self, names[::-1]))
    assert serve.main(["--moe"]) == 1
