"""The training step users run: a transformers Llama with LoRA on every linear layer, one optimizer step.

    python benchmarks/train.py [--layers 4] [--batch 4] [--seq 2048] [--out DIR] [--dora | --moe]

An 8B-class decoder layer (hidden 4096, MLP 14336, 32 query / 8 key-value heads), as many layers as
--layers, bf16 base weights with PEFT's fp32 adapters (r=16, alpha 32, target_modules="all-linear"),
dropout 0 and 0.05. Providers, timed in the same run on the same batch:
- frozen:    the base model without LoRA, every weight frozen, gradients flowing back to the input
             embeddings (what any adapter training must at least do): the floor;
- peft:      PEFT's LoRA model, AdamW over the adapters (forward, backward, optimizer step);
- fusedlora: the same PEFT model after fusedlora.patch_peft.
--moe: a Qwen3-MoE model instead, Qwen3-30B-A3B's layer (hidden 2048, 128 experts of width 768, top-8,
32 query / 4 key-value heads of 128), LoRA on every linear layer and on both expert parameters
(target_parameters), dropout 0 only (PEFT refuses dropout on expert parameters).
Reports step ms (median), tokens/s and peak CUDA memory per provider, and writes rows in the schema of
benchmarks/run.py's JSON (case "train_step", M = tokens per step). Before timing, PEFT and fusedlora
must give the same loss and adapter gradients at dropout 0 within the bound below, or it exits 1.
Without a GPU it runs a tiny model through the Triton interpreter, checks the same, and times nothing.
Rows reach <gpu>-train.jsonl as they finish; a SIGTERM writes the JSON so far, marked partial.
"""
import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if __name__ == "__main__" and not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    os.environ.setdefault("FUSEDLORA_BACKEND", "triton")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fusedlora  # noqa: E402

# transformers 5 warns from inside PEFT's get_peft_model; nothing of ours.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
import suite  # noqa: E402
from record import Record  # noqa: E402

PROVIDERS = ("frozen", "peft", "fusedlora")
R, ALPHA = 16, 32


def moe_config(tiny: bool, layers: int):
    from transformers import Qwen3MoeConfig
    size = dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128) if tiny else \
        dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=32000)
    return Qwen3MoeConfig(num_hidden_layers=layers, max_position_embeddings=4096, intermediate_size=4 * size["hidden_size"],
                          **size)


def config(tiny: bool, layers: int) -> LlamaConfig:
    size = dict(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=128) if tiny else \
        dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=32000)
    return LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, **size)


def build(cfg, dtype, device, lora_dropout, use_dora=False):
    """(frozen base model, PEFT model over a second copy of the same weights); use_dora: DoRA adapters. An MoE
    config also gets LoRA on both expert parameters."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    frozen = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype)
    frozen.requires_grad_(False)
    frozen.enable_input_require_grads()  # gradients reach the embeddings' output, as with LoRA
    torch.manual_seed(0)
    lora = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype)
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if is_moe(cfg) else None
    lora_config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=lora_dropout, target_modules="all-linear",
                             init_lora_weights=False,  # random B as well: a zero B hides half the gradients
                             use_dora=use_dora, target_parameters=experts)
    return frozen, get_peft_model(lora, lora_config)


def step_fn(model, ids, optimizer):
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def adapter_grads(model, ids):
    """Loss and every adapter gradient of one forward and backward, the model left without gradients."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def check_same(peft_model, ids, dtype, fused_name="fusedlora"):
    """(fusedlora's error, bound): the loss and every adapter gradient at dropout 0 of patched PEFT and
    of PEFT, each against PEFT run on a copy in a wider dtype (float32 on a GPU, float64 on CPU), as
    norm-wise relative errors. fusedlora passes when its error is at most twice PEFT's own plus 8 unit
    roundoffs of the base dtype: both run the same half-precision GEMMs and differ in where the
    low-rank term is rounded, while a dropped term or a wrong scaling errs by order one. fused_name: the
    patched provider ("fusedlora[torch]" runs it on fusedlora's PyTorch backend)."""
    wide = torch.float32 if CUDA else torch.float64
    peft_model.eval()  # dropout off
    try:
        fusedlora.unpatch_peft(peft_model)
        exact = adapter_grads(wide_copy(peft_model, wide), ids)
        low = adapter_grads(peft_model, ids)
        fusedlora.patch_peft(peft_model)
        with suite.provider_plan(fused_name):
            got = adapter_grads(peft_model, ids)
    finally:
        peft_model.train()

    def error(run):
        worst = abs(run[0].double() - exact[0].double()).item() / abs(exact[0].item())
        for name, g in exact[1].items():
            worst = max(worst, ((run[1][name].double() - g.double()).norm() / g.double().norm()).item())
        return worst

    return error(got), 2 * error(low) + 8 * torch.finfo(dtype).eps / 2


def is_moe(cfg) -> bool:
    return getattr(cfg, "num_experts", None) is not None


def wide_copy(model, dtype):
    """The model copied to `dtype`; MoE experts on transformers' eager implementation, each family's own
    loop (grouped_mm has no float64 kernel, nor an fp32 one on every GPU)."""
    twin = copy.deepcopy(model).to(dtype)
    for m in twin.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "_experts_implementation", None) is not None:
            cfg._experts_implementation = "eager"
    return twin


def timed_steps(step, steps):
    """(median step ms, peak MiB above what was allocated before): two warm-up steps, then `steps`."""
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), (torch.cuda.max_memory_allocated() - before) / 2**20


def run(args, log=print, on_row=None):
    """Rows (run.py's schema, case "train_step") and failures, for dropout 0 and 0.05; on_row(row) as
    each row finishes."""
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    cfg = moe_config(not CUDA, args.layers) if args.moe else config(not CUDA, args.layers)
    fused_name = "fusedlora"
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    tokens = args.batch * args.seq
    rows, failures = [], []
    for p in (0.0, 0.05) if CUDA and not args.moe else (0.0,):
        frozen, peft_model = build(cfg, dtype, device, p, args.dora)
        if p == 0.0:  # the check runs in eval mode, dropout off: once is enough
            err, bound = check_same(peft_model, ids, dtype, fused_name)
            log(f"patched PEFT vs PEFT, loss and adapter gradients against {'float32' if CUDA else 'float64'}: "
                f"relative error {err:.1e} (bound {bound:.1e}) {'ok' if err <= bound else 'WRONG'}")
            if not err <= bound:
                failures.append(f"train_step: relative error {err:.2e} over {bound:.2e}")
        kind = "_dora" if args.dora else "_moe" if args.moe else ""
        width = cfg.moe_intermediate_size if args.moe else cfg.intermediate_size
        spec = suite.Spec(f"train_step{kind}_p{p:g}", tokens, cfg.hidden_size, width, R, "bf16" if CUDA else "fp32")
        optimizer = torch.optim.AdamW([q for q in peft_model.parameters() if q.requires_grad], lr=1e-4)
        for provider in (name if name != "fusedlora" else fused_name for name in PROVIDERS):
            measured = dict(rel_err=err if provider != "frozen" else None)
            if CUDA and not failures:
                if provider == "peft":
                    fusedlora.unpatch_peft(peft_model)
                elif provider.startswith("fusedlora"):
                    fusedlora.patch_peft(peft_model)
                step = step_fn(frozen, ids, None) if provider == "frozen" else step_fn(peft_model, ids, optimizer)
                with suite.provider_plan(provider if provider.startswith("fusedlora") else "frozen"):
                    ms, peak = timed_steps(step, args.steps)
                measured.update(ms=ms, peak_mb=peak)
                log(f"dropout {p}: {provider:9} {ms:8.1f} ms/step {tokens / ms * 1e3:9.0f} tokens/s "
                    f"peak {peak:.0f} MiB")
            rows.append(suite.make_row(spec, "base" if provider == "frozen" else provider, **measured))
            suite.add_ratios([row for row in rows if row["case"] == spec.case])
            if on_row is not None:
                on_row(rows[-1])
        del frozen, peft_model, optimizer
        if CUDA:
            torch.cuda.empty_cache()
    return suite.add_ratios(rows), failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write <gpu>-train.json there")
    parser.add_argument("--dry-run", action="store_true", help="without a GPU only: one layer, 8 tokens")
    parser.add_argument("--dora", action="store_true", help="DoRA adapters (LoraConfig(use_dora=True))")
    parser.add_argument("--moe", action="store_true", help="a Qwen3-MoE model, LoRA on its expert parameters too")
    args = parser.parse_args(argv)
    if args.dora and args.moe:
        parser.error("--dora and --moe: PEFT has no DoRA on expert parameters")
    if not CUDA:
        print(f"No CUDA GPU: a tiny {'Qwen3-MoE' if args.moe else 'Llama'} through the Triton interpreter, checking "
              "that patched PEFT trains as PEFT does. Timings need a GPU.")
        args.layers, args.batch, args.seq = (1, 1, 8) if args.dry_run else (2, 2, 16)
    gpu = torch.cuda.get_device_name() if CUDA else None
    record = Record(args.out, f"{report.stem(gpu or 'cpu-check')}-train{'-moe' if args.moe else ''}", suite.header(gpu))
    rows, failures = run(args, on_row=record.add)
    if CUDA:
        by = {(row["case"], row["provider"].removesuffix("[torch]")): row for row in rows}
        for case in dict.fromkeys(row["case"] for row in rows):
            peft, fused = by[case, "peft"], by[case, "fusedlora"]
            if peft["ms"] and fused["ms"]:
                print(f"{case}: fusedlora {peft['ms'] / fused['ms']:.2f}x PEFT's tokens/s, peak memory "
                      f"{fused['peak_mb']:.0f} vs {peft['peak_mb']:.0f} MiB")
    record.result["rows"] = rows
    for path in record.finish():
        print(f"wrote {path}")
    for failure in failures:
        print(f"WRONG: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
