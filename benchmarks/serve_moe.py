"""The serving benchmark's MoE row: a batch of requests over a Qwen3-MoE model, each with its own adapter
among N loaded (LoRA on the attention projections and on both expert parameters, each adapter its own rank
in 8..64, saved by PEFT), generating tokens greedily.

    python benchmarks/serve.py --moe [--adapters N] [--batch B] [--new-tokens T] [--out DIR]

The model has Qwen3-30B-A3B's layer (hidden 2048, 128 experts of width 768, top-8, 32 query / 4 key-value
heads of 128), 4 layers, random weights, bf16. Providers, on the same requests:
- `peft-grouped`: PEFT refuses a mixed batch on expert parameters (its ParamWrapper raises for
  adapter_names=); the best it offers is the batch split by adapter, one generate per adapter after
  set_adapter. The baseline.
- `peft-patched`: the same PeftModel after fusedlora.patch_peft, one generate(adapter_names=...) for the
  whole batch, every layer served by fusedlora.
- `fusedlora`: an AdapterPool over the attention projections and the expert parameters, generate inside
  pool.use(names).

The logit check first: prompts plus fusedlora's greedy tokens, teacher-forced, through every fusedlora
provider, each row against PEFT running that row's adapter alone on a float64 copy (eager experts), with
serve.py's bounds: at most FACTOR times PEFT's own error on the row (PEFT alone, in the row's dtype) plus the
unit roundoff, and serve.py's absolute bound. Without a GPU it runs a tiny float32 model and times nothing.
"""
import copy
import json
import os
import sys
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model

import fusedlora
import report
import suite
from serve import CUDA, FACTOR, absolute_bound, adapter_ranks, judge, print_check, row_errors, timed

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
PRESET = dict(adapters=8, batch=32, prompt=32, new_tokens=32, repeats=3)
TINY = dict(adapters=3, batch=3, prompt=4, new_tokens=2, repeats=1)


def build_model(tiny: bool, dtype):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    size = dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=128, num_hidden_layers=2) if tiny else \
        dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=32000, num_hidden_layers=4)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(intermediate_size=4 * size["hidden_size"], max_position_embeddings=512,
                            tie_word_embeddings=False, **size)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # routers spread over the experts (transformers' 0.02 init nearly ties them)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(std=0.5)
    return model.to(dtype).to("cuda" if CUDA else "cpu").eval()


def save_adapters(model, ranks, directory):
    saver, paths = None, []
    for i, r in enumerate(ranks):
        torch.manual_seed(100 + i)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=ATTENTION, target_parameters=EXPERTS,
                            init_lora_weights=False)
        if saver is None:
            saver = get_peft_model(copy.deepcopy(model), config, adapter_name=f"a{i}")
        else:
            saver.add_adapter(f"a{i}", config)
        saver.save_pretrained(directory, selected_adapters=[f"a{i}"])
        paths.append(os.path.join(directory, f"a{i}"))
    return paths


def eager(model):
    """The model's experts on transformers' eager implementation (float64 has no grouped_mm kernel)."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "_experts_implementation", None) is not None:
            cfg._experts_implementation = "eager"
    return model


@torch.no_grad()
def alone(peft_model, sequences, names):
    """(B, S, V) logits of each row with its own adapter, PEFT one adapter at a time."""
    out = [None] * len(names)
    for name in dict.fromkeys(names):
        rows = [b for b, n in enumerate(names) if n == name]
        peft_model.set_adapter(name)
        logits = peft_model(input_ids=sequences[rows]).logits
        for i, b in enumerate(rows):
            out[b] = logits[i]
    return torch.stack(out)


def run(args):
    dtype = torch.bfloat16 if CUDA else torch.float32
    base = build_model(not CUDA, dtype)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, base.config.vocab_size, (args.batch, args.prompt), generator=gen).to(base.device)
    names = [f"a{(b * 7) % args.adapters}" for b in range(args.batch)]
    ranks = adapter_ranks(args.adapters)
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_adapters(base, ranks, tmp)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="a0")
        for i, path in enumerate(paths[1:], 1):
            peft_model.load_adapter(path, adapter_name=f"a{i}")
        peft_model.eval()
        patched = copy.deepcopy(peft_model)
        fusedlora.patch_peft(patched)
        pool = fusedlora.AdapterPool(base, max_adapters=args.adapters, max_rank=max(ranks), target_modules=ATTENTION,
                                     target_parameters=EXPERTS, dtype=torch.float32)
        for i, path in enumerate(paths):
            pool.load(f"a{i}", path)

    def generate(model, ids, **kwargs):
        out = model.generate(input_ids=ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids), **kwargs)
        return out[:, ids.shape[1]:]

    def peft_grouped():
        tokens = torch.empty(args.batch, args.new_tokens, dtype=torch.long, device=prompts.device)
        for name in dict.fromkeys(names):
            rows = [b for b, n in enumerate(names) if n == name]
            peft_model.set_adapter(name)
            tokens[rows] = generate(peft_model, prompts[rows])
        return tokens

    def pooled():
        with pool.use(names):
            return generate(base, prompts)

    runs = {"peft-grouped": peft_grouped, "peft-patched": lambda: generate(patched, prompts, adapter_names=names),
            "fusedlora": pooled}
    with torch.no_grad():
        sequences = torch.cat([prompts, pooled()], 1)
        reference = eager(copy.deepcopy(peft_model).to(torch.float64))
        ref = alone(reference, sequences, names)
        del reference
        peft_logits = alone(peft_model, sequences, names)
        peft_errors = row_errors(peft_logits, ref)
        K = base.config.moe_intermediate_size
        rows = [judge("peft-grouped", "all", peft_errors, peft_errors, dtype, K)]
        rows.append(judge("peft-patched", "all",
                          row_errors(patched(input_ids=sequences, adapter_names=names).logits, ref), peft_errors, dtype, K))
        with pool.use(names):
            fused_logits = base(input_ids=sequences).logits
        rows.append(judge("fusedlora", "all", row_errors(fused_logits, ref), peft_errors, dtype, K))
    check = dict(reference="PEFT, each row's adapter alone, in float64", sequence=list(sequences.shape), factor=FACTOR,
                 absolute_bound=absolute_bound(dtype, K),
                 fusedlora_vs_peft=row_errors(fused_logits, peft_logits, scale=ref).max().item(), rows=rows,
                 ok=all(row["ok"] for row in rows))
    return check, runs


def main(args):
    """serve.py --moe: the check, then (on a GPU) tokens/s per provider. Returns the exit status."""
    preset = TINY if not CUDA or args.dry_run else PRESET
    for key, value in preset.items():
        if getattr(args, key, None) is None or not CUDA or args.dry_run:
            setattr(args, key, value)
    check, runs = run(args)
    print_check(check)
    if not check["ok"]:
        print("WRONG: MoE logits beyond the bound (table above); nothing timed.", file=sys.stderr)
        return 1
    result = dict(suite.header(torch.cuda.get_device_name() if CUDA else None), logit_check=check, providers=[])
    if CUDA:
        count, base_s = args.batch * args.new_tokens, None
        for name, fn in runs.items():
            with torch.no_grad():
                fn()  # warm-up
                _, seconds = timed(fn, args.repeats)
            base_s = base_s or seconds
            result["providers"].append(dict(provider=name, tokens_per_s=count / seconds, speedup=base_s / seconds))
            print(f"{name:22} {count / seconds:9.1f} tokens/s, {base_s / seconds:5.2f}x peft-grouped", flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"serve-moe-{report.stem(result['gpu'] if CUDA else 'cpu-check')}.json"
        path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0
