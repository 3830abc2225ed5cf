"""The serving benchmark's DoRA and RL cases (benchmarks/serve.py runs them after its main providers).

dora: requests over N adapters, every other one DoRA (use_dora=True, magnitudes moved 30% off PEFT's
initial row norms so that they matter), every eighth request (the third, and every eighth after it) the
base model alone. Providers:
- `peft-per-adapter`: PEFT refuses adapter_names= with a DoRA adapter, so its only way is to serve each
  adapter's rows on their own: set_adapter, then generate for those rows, adapter after adapter.
- `fusedlora`: one generate over an AdapterPool(dora=True) inside pool.use(names).
rl: an RL loop over one DoRA adapter (the policy): each step the trainer's new weights arrive as a state
dict in memory, the server takes them, then decodes a batch of rollouts with them. Providers:
- `fusedlora`: pool.update(policy, state_dict) (a copy into the slot, no reallocation), then generate.
- `peft-set-state-dict`: set_peft_model_state_dict(peft_model, state_dict, adapter_name=policy).
- `peft-reload`: the state dict written to a temporary directory as adapter files, the adapter deleted
  and load_adapter'ed again, the route of frameworks that save and reload.
Update latency (median over the steps) and tokens/s are timed on CUDA only. Checks first, on CPU and
GPU: teacher-forced logits per request against PEFT in float64 running that request's adapter alone
(after the last update for rl), by serve.py's per-row bounds; a provider beyond them is not timed.
"""
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

import fusedlora
import serve
from serve import CUDA

RL_STEPS = {True: 5, False: 1}  # CUDA; CPU, where the interpreter makes every decoded batch seconds long


def save_dora_adapters(model, ranks, directory: str):
    """serve.save_adapters' adapters, every other one DoRA with moved magnitudes; their paths."""
    saver, paths = None, []
    for i, r in enumerate(ranks):
        torch.manual_seed(100 + i)
        config = serve.LoraConfig(r=r, lora_alpha=2 * r, target_modules=serve.TARGETS, init_lora_weights=False,
                                  use_dora=i % 2 == 0)
        name = f"a{i}"
        if saver is None:
            saver = serve.get_peft_model(copy.deepcopy(model), config, adapter_name=name)
        else:
            saver.add_adapter(name, config)
        with torch.no_grad():
            for key, p in saver.named_parameters():
                if f"lora_magnitude_vector.{name}." in key:
                    p.mul_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(p))
        saver.save_pretrained(directory, selected_adapters=[name])
        paths.append(os.path.join(directory, name))
    return paths


class DoraSetup:
    """The requests (names: an adapter per request, None for the base), PEFT with every adapter over a
    copy of the base model, and a DoRA pool over the base model, as serve.Setup."""

    def __init__(self, args):
        self.dtype = torch.bfloat16 if CUDA else torch.float32
        base = serve.build_model(not CUDA, self.dtype, layers=1 if args.dry_run else 2)
        gen = torch.Generator().manual_seed(2)
        self.prompts = torch.randint(0, base.config.vocab_size, (args.batch, args.prompt),
                                     generator=gen).to(base.device)
        self.names = [None if b % 8 == 2 else f"a{(b * 7) % args.adapters}" for b in range(args.batch)]
        self.ranks = serve.adapter_ranks(args.adapters)
        with tempfile.TemporaryDirectory() as tmp:
            paths = save_dora_adapters(base, self.ranks, tmp)
            self.peft_model = serve.load_peft(copy.deepcopy(base), paths)
            self.served = base
            self.pool = fusedlora.AdapterPool(base, max_adapters=args.adapters, max_rank=max(self.ranks),
                                              dtype=torch.float32, dora=True)
            for i, path in enumerate(paths):
                self.pool.load(f"a{i}", path)

    def groups(self, names=None):
        """{adapter or None: the rows that use it}."""
        out = {}
        for b, name in enumerate(self.names if names is None else names):
            out.setdefault(name, []).append(b)
        return out

    def generate(self, model, prompts, new_tokens):
        out = model.generate(input_ids=prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, attention_mask=torch.ones_like(prompts))
        return out[:, prompts.shape[1]:]

    def peft_per_adapter(self, new_tokens, model=None, names=None):
        """PEFT's only way with DoRA adapters: each adapter's rows generated on their own."""
        model = model or self.peft_model
        tokens = torch.empty(self.prompts.shape[0], new_tokens, dtype=torch.long, device=self.prompts.device)
        for name, rows in self.groups(names).items():
            with _adapter(model, name):
                tokens[rows] = self.generate(model, self.prompts[rows], new_tokens)
        return tokens

    def fused(self, new_tokens, names=None):
        with self.pool.use(self.names if names is None else names):
            return self.generate(self.served, self.prompts, new_tokens)


class _adapter:
    """PEFT's model with one adapter active (None: adapters disabled) for the block."""

    def __init__(self, model, name):
        self.model, self.name, self.disabled = model, name, None

    def __enter__(self):
        if self.name is None:
            self.disabled = self.model.disable_adapter()
            self.disabled.__enter__()
        else:
            self.model.set_adapter(self.name)

    def __exit__(self, *exc):
        if self.disabled is not None:
            self.disabled.__exit__(*exc)


def logits_alone(model, sequences, groups):
    """Teacher-forced logits (B, S, V) fp32, each row through `model` with its own adapter alone."""
    out = None
    for name, rows in groups.items():
        with _adapter(model, name):
            logits = model(input_ids=sequences[rows]).logits.float()
        if out is None:
            out = torch.empty((sequences.shape[0], *logits.shape[1:]), dtype=torch.float32, device=logits.device)
        out[rows] = logits
    return out


@torch.no_grad()
def check(setup, sequences, names, label):
    """fusedlora's and PEFT's per-row logits against PEFT in float64, each row with its adapter alone."""
    groups = setup.groups(names)
    reference = copy.deepcopy(setup.peft_model).to(torch.float64)
    ref = logits_alone(reference, sequences, groups)
    del reference
    peft_logits = logits_alone(setup.peft_model, sequences, groups)
    with setup.pool.use(names):
        fused_logits = setup.served(input_ids=sequences).logits
    peft_e = serve.row_errors(peft_logits, ref)
    dtype, K = setup.dtype, setup.served.config.intermediate_size
    rows = [dict(serve.judge("peft", "all", peft_e, peft_e, dtype, K), provider=f"{label}/peft"),  # absolute bound
            serve.judge(f"{label}/fusedlora", "all", serve.row_errors(fused_logits, ref), peft_e, dtype, K)]
    return dict(reference="PEFT in float64, each request's adapter alone", sequence=list(sequences.shape),
                factor=serve.FACTOR, absolute_bound=serve.absolute_bound(dtype, K),
                fusedlora_vs_peft=serve.row_errors(fused_logits, peft_logits, scale=ref).max().item(), rows=rows,
                ok=all(row["ok"] for row in rows))


def _timed_run(run, args):
    """(tokens, seconds): on CUDA a warm-up, then the median of --repeats runs; on CPU one untimed run."""
    if not CUDA:
        return run(args.new_tokens), None
    run(2)
    return serve.timed(lambda: run(args.new_tokens), args.repeats)


def _rows(label, timings, peft_name, count, extra=None):
    """serve.provider_row for every entry of {provider: (tokens, seconds)}: tokens/s, speed-up over and
    greedy-token agreement with the PEFT provider `peft_name`; extra {provider: {key: value}}."""
    peft_run = timings.get(peft_name)
    rows = []
    for name, (tokens, seconds) in timings.items():
        row = serve.provider_row(f"{label}/{name}", tokens, seconds, count, None if name == peft_name else peft_run)
        rows.append(dict(row, **(extra or {}).get(name, {})))
    serve.print_agreement_note()
    return rows


def dora_case(setup, args):
    """The mixed DoRA batch: ({"check": ...}, the providers' rows), timed on CUDA."""
    T = args.new_tokens
    with torch.no_grad():
        fused_tokens = setup.fused(T)
        result = dict(check=check(setup, torch.cat([setup.prompts, fused_tokens], 1), setup.names, "dora"))
        serve.print_check(result["check"])
        timings = {}
        if result["check"]["ok"]:
            timings["peft-per-adapter"] = _timed_run(setup.peft_per_adapter, args)
            timings["fusedlora"] = _timed_run(setup.fused, args) if CUDA else (fused_tokens, None)
    return result, _rows("dora", timings, "peft-per-adapter", args.batch * T)


def new_weights(state, step: int):
    """The trainer's weights after `step` steps: each tensor moved by 5% of its spread per step."""
    gen = torch.Generator().manual_seed(1000 + step)
    return {k: v + 0.05 * step * v.std() * torch.randn(v.shape, generator=gen).to(v) for k, v in state.items()}


def write_adapter(state, config, directory):
    """A state dict and its LoraConfig as PEFT adapter files."""
    save_file({k: v.detach().contiguous() for k, v in state.items()},
              os.path.join(directory, "adapter_model.safetensors"))
    config.save_pretrained(directory)


def rl_case(setup, args):
    """The RL loop, ({"check": ...}, the providers' rows): per step, new weights for the policy from
    memory, then a decoded batch (update latency and tokens/s timed on CUDA). PEFT's
    set_peft_model_state_dict loop runs first, so that the check after fusedlora's loop finds PEFT
    holding the same last weights."""
    policy, T, B = "a0", args.new_tokens, args.batch
    names = [policy] * B
    states = [new_weights(get_peft_model_state_dict(setup.peft_model, adapter_name=policy), s + 1)
              for s in range(RL_STEPS[CUDA])]
    config = setup.peft_model.peft_config[policy]

    def reload(state):
        with tempfile.TemporaryDirectory() as tmp:
            write_adapter(state, config, tmp)
            setup.peft_model.set_adapter("a1")  # PEFT deletes no active adapter
            setup.peft_model.delete_adapter(policy)
            setup.peft_model.load_adapter(tmp, adapter_name=policy)

    loops = {"peft-set-state-dict": (lambda state: set_peft_model_state_dict(setup.peft_model, state,
                                                                             adapter_name=policy),
                                     lambda n: setup.peft_per_adapter(n, names=names)),
             "fusedlora": (lambda state: setup.pool.update(policy, state), lambda n: setup.fused(n, names)),
             "peft-reload": (reload, lambda n: setup.peft_per_adapter(n, names=names))}
    result, timings, extra = {}, {}, {}
    with torch.no_grad():
        for name, (update, decode) in loops.items():
            update_s, decode_s, tokens = [], [], None
            for state in states:
                update_s.append(_clock(lambda: update(state))[0])
                seconds, tokens = _clock(lambda: decode(T))
                decode_s.append(seconds)
            timings[name] = (tokens, statistics.median(decode_s) if CUDA else None)
            extra[name] = dict(update_s=statistics.median(update_s) if CUDA else None, steps=len(states))
            if CUDA:
                print(f"rl/{name:22} update {extra[name]['update_s'] * 1e3:8.2f} ms (median of {len(states)} steps)")
            if name == "fusedlora":
                result["check"] = check(setup, torch.cat([setup.prompts, tokens], 1), names, "rl")
                serve.print_check(result["check"])
                if not result["check"]["ok"]:
                    del timings[name]
                    break
    return result, _rows("rl", timings, "peft-set-state-dict", B * T, extra)


def _clock(fn):
    """(seconds, result) of fn(), CUDA synchronised; on CPU the seconds are not reported."""
    if CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run(args, result, record):
    """The cases of args.cases among dora and rl: their checks into result["dora"] and result["rl"], their
    providers' rows (named dora/... and rl/...) into the record. Returns 0, or 1 if a check failed."""
    setup = DoraSetup(args)
    ok = True
    if "dora" in args.cases:
        print(f"DoRA: {args.batch} requests over {args.adapters} adapters (every other one DoRA, every eighth "
              f"request the base model alone)", flush=True)
        result["dora"], rows = dora_case(setup, args)
        for row in rows:
            record.add(row)
        record.write(partial=True)
        ok = result["dora"]["check"]["ok"]
    if "rl" in args.cases:
        print(f"RL loop: {RL_STEPS[CUDA]} steps of a new DoRA policy from memory, then {args.batch} rollouts of "
              f"{args.new_tokens} tokens", flush=True)
        result["rl"], rows = rl_case(setup, args)
        for row in rows:
            record.add(row)
        record.write(partial=True)
        ok = ok and result["rl"]["check"]["ok"]
    if not ok:
        print("WRONG: DoRA or RL logits beyond the bound (tables above); those are not timed.", file=sys.stderr)
    return 0 if ok else 1
