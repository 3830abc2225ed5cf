"""Multi-tenant serving benchmark: a batch of requests, each with its own LoRA adapter among N loaded,
generating tokens greedily through a transformers Llama with random weights.

    python benchmarks/serve.py [--scenario default|large] [--adapters N] [--batch B] [--new-tokens T]
                               [--out DIR] [--cases main,dora,rl] [--moe]

--moe runs the MoE row instead (benchmarks/serve_moe.py): a Qwen3-MoE model whose adapters also carry
LoRA on the expert parameters, a mixed batch PEFT refuses, served by patch_peft and by AdapterPool.

Scenarios: `default` is 8 adapters and 32 requests; `large` is 64 adapters and 64 requests, every
request its own adapter (32 new tokens, one timed run: PEFT's loop over 64 adapters is slow).
Then the same sizes with DoRA adapters in the batch, and an RL loop that updates an adapter from memory
before every decoded batch (benchmarks/serve_dora.py; results under "dora" and "rl"). --cases picks
among main (the above), dora and rl; without main the file is serve-<gpu>[-large]-<cases>.json.
Adapter i has its own rank, spread evenly over 8..64, and is saved by PEFT.

Providers, on the same requests in one run:
- `peft`: PeftModel with every adapter loaded, generate(..., adapter_names=...), PEFT's mixed batch.
- `fusedlora`: AdapterPool, generate inside pool.use(...).
- `fusedlora-static`: the pool through a static KV cache (transformers StaticCache): prefill, then
  one token per request per step with fixed input tensors, each step run eagerly.
- `fusedlora-graph` (CUDA only): the same decode step captured once in a CUDA graph and replayed for
  every generated token, as vLLM serves.

First the logit check (check_logits): prompts plus the tokens fusedlora generated are fed, teacher-
forced, to every provider, and each row's logits are compared with a float64 PEFT run of the same
model and adapters. A provider beyond the bound is reported and not timed, and the command exits 1;
every provider within it is timed. Then tokens/s (median of --repeats runs, CUDA synchronised), and,
as information only, how often each provider's greedy tokens equal PEFT's: with near-flat logits, rounding alone flips an argmax.
Without a GPU it runs a tiny float32 model through the Triton interpreter, makes the logit check and
the token comparison, and prints no throughput. --out DIR writes the results as
serve-<gpu>[-large].json there, with each provider's row in the .jsonl beside it as soon as it is
timed; a SIGTERM (a `timeout`) writes the JSON of what is done, marked partial.
"""
import argparse
import copy
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA and __name__ == "__main__":  # run as a script; an importer (the tests) chooses for itself
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    os.environ.setdefault("FUSEDLORA_BACKEND", "triton")

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

import fusedlora  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
import suite  # noqa: E402
from record import Record  # noqa: E402

# transformers 5 warns from inside PEFT's get_peft_model; nothing of ours.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCENARIOS = {"default": dict(adapters=8, batch=32, prompt=32, new_tokens=64, repeats=3),
             "large": dict(adapters=64, batch=64, prompt=32, new_tokens=32, repeats=1)}
TINY = dict(adapters=3, batch=3, prompt=4, new_tokens=2, repeats=1)  # the interpreter runs it in the tests
DRY = dict(adapters=2, batch=2, prompt=3, new_tokens=2, repeats=1)  # --dry-run: one layer, the plumbing only
# The forward's cache argument: `cache` in transformers 5.24, `past_key_values` in 5.17 (the GPU machine's).
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def build_model(tiny: bool, dtype, layers: int = 2):
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128) if tiny else \
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000)
    torch.manual_seed(0)
    config = LlamaConfig(**size, max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype).to("cuda" if CUDA else "cpu").eval()


def adapter_ranks(count: int):
    """Each adapter its own rank, spread evenly over 8..64 (8 and 64 included when count > 1)."""
    return [8 + (56 * i) // max(count - 1, 1) for i in range(count)]


def save_adapters(model, ranks, directory: str):
    """Random adapters (A and B both non-zero, lora_alpha = 2r) saved by PEFT; returns their paths.
    One PeftModel gains and saves them one at a time: a model copy per adapter would not fit 64."""
    saver, paths = None, []
    for i, r in enumerate(ranks):
        torch.manual_seed(100 + i)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
        if saver is None:
            saver = get_peft_model(copy.deepcopy(model), config, adapter_name=f"a{i}")
        else:
            saver.add_adapter(f"a{i}", config)
        saver.save_pretrained(directory, selected_adapters=[f"a{i}"])
        paths.append(os.path.join(directory, f"a{i}"))  # PEFT's folder for a non-default adapter name
    return paths


def load_peft(model, paths):
    peft_model = PeftModel.from_pretrained(model, paths[0], adapter_name="a0")
    for i, path in enumerate(paths[1:], 1):
        peft_model.load_adapter(path, adapter_name=f"a{i}")
    return peft_model.eval()


class StaticDecoder:
    """Greedy decoding of a batch through a transformers StaticCache, the way a CUDA-graph server runs:
    an eager prefill, then decode steps whose every tensor (input token, cache, output) keeps its
    address. The cache tracks its own length on the device, so a step needs no position input and a
    captured step advances by itself at each replay.

    Build it and call run() inside the `with pool.use(names)` block that serves the rows: the pool's
    layers read that block's ids tensor, which a captured graph reads at every replay.
    """

    def __init__(self, model, prompts, new_tokens: int):
        self.model, self.prompts, self.new_tokens = model, prompts, new_tokens
        B, P = prompts.shape
        self.cache = StaticCache(config=model.config, max_cache_len=P + new_tokens)
        self.token = torch.zeros(B, 1, dtype=torch.long, device=prompts.device)
        self.logits = torch.zeros(B, model.config.vocab_size, dtype=torch.float32, device=prompts.device)
        self.graph = None

    def _forward(self, ids):
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_ARG: self.cache})
        self.logits.copy_(out.logits[:, -1])
        self.token.copy_(self.logits.argmax(-1, keepdim=True))

    def step(self):
        """One decode step: the model on one token per row, then the greedy next token as next input."""
        self._forward(self.token)

    def capture(self):
        """Capture step() in a CUDA graph; run() replays it from then on. Kernels are compiled and
        autotuned, and the allocator warmed, by eager steps on a side stream first. Those steps
        advance the cache; run() starts from an empty cache anyway."""
        self._forward(self.prompts)  # the cache allocates its tensors at its first update
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def run(self, new_tokens=None, forced=None, keep_logits=False):
        """(tokens (B, T), logits (B, T, V) fp32 or None): T = new_tokens steps from an empty cache.
        forced (B, >= T - 1): teacher forcing, token t fed instead of the argmax at step t; the
        logits are then those of positions P-1 .. P+T-2 on that sequence."""
        T = new_tokens or self.new_tokens
        self.cache.reset()  # zeroes in place: the tensors a captured graph holds stay valid
        self._forward(self.prompts)
        tokens, logits = [self.token[:, 0].clone()], [self.logits.clone()] if keep_logits else None
        for t in range(T - 1):
            if forced is not None:
                self.token.copy_(forced[:, t:t + 1])
            if self.graph is None:
                self.step()
            else:
                self.graph.replay()
            tokens.append(self.token[:, 0].clone())
            if keep_logits:
                logits.append(self.logits.clone())
        return torch.stack(tokens, 1), torch.stack(logits, 1) if keep_logits else None


# The logit check, per row (one request, one adapter, so that a fault in one adapter's slot cannot hide
# among the other rows): e = ||logits - ref|| / ||ref|| over the row's positions and vocabulary, ref
# from PEFT in float64. Two bounds:
# 1. fusedlora <= FACTOR * (PEFT's e on the same row) + u, u the dtype's unit roundoff: the oracle of
#    tests/oracle.py and benchmarks/run.py. PEFT in the same dtype is the rounding a user accepts today;
#    the factor leaves room for another summation order (and for the tf32 dots fusedlora uses where
#    half activations meet fp32 adapters), u for a row PEFT happens to get exact. A wrong adapter, a
#    stale slot or a lost scaling moves e by the adapter's share of the logits, far beyond rounding.
# 2. every provider <= absolute_bound(): the rounding a correct model does at all, so that a PEFT that
#    is itself off cannot make bound 1 vacuous. Each layer stores its output in the dtype (relative
#    error eps per rounding, compounding over layers) and every dot product sums up to K terms in
#    fp32 (sqrt(K)·eps32 for random rounding errors); ABSOLUTE_FACTOR times their sum. Measured on CPU
#    with the GPU-sized model (PEFT against float64): 3.0e-2 in bf16, 3.8·eps; 2.5e-6 in fp32, a
#    quarter of sqrt(K)·eps32. The factor leaves at least 4x of room.
FACTOR = 2.0
ABSOLUTE_FACTOR = 16.0


def absolute_bound(dtype, K: int) -> float:
    return ABSOLUTE_FACTOR * (torch.finfo(dtype).eps + K ** 0.5 * torch.finfo(torch.float32).eps)


def row_errors(logits, ref, scale=None):
    """(B,) ||logits - ref|| / ||scale|| per row of (B, S, V) tensors, in float64; scale defaults to ref."""
    norm = (scale if scale is not None else ref).double().flatten(1).norm(dim=1)
    return (logits.double() - ref.double()).flatten(1).norm(dim=1) / norm


def judge(name, positions, errors, peft_errors, dtype, K):
    """The check's entry for one provider: its worst row and whether every row is within bounds."""
    bound = torch.full_like(errors, absolute_bound(dtype, K))
    if name != "peft":
        bound = torch.minimum(bound, FACTOR * peft_errors + torch.finfo(dtype).eps / 2)
    worst = int((errors / bound).nan_to_num(float("inf")).argmax())
    return dict(provider=name, positions=positions, max_rel_err=errors.max().item(),
                worst_row=worst, worst_rel_err=errors[worst].item(), worst_bound=bound[worst].item(),
                worst_peft_rel_err=peft_errors[worst].item(), ok=bool((errors <= bound).all()),
                rel_err=errors.tolist())


@torch.no_grad()
def check_logits(setup, sequences, decoders):
    """Teacher-forced logits of every provider on sequences (B, P + T) against a float64 PEFT run; call
    it inside setup.pool.use(setup.names). decoders: {name: StaticDecoder}; their logits cover positions
    P-1 .. P+T-2, those that choose the generated tokens. Returns the check as a dict."""
    names, P = setup.names, setup.prompts.shape[1]
    reference = copy.deepcopy(setup.peft_model).to(torch.float64)
    ref = reference(input_ids=sequences, adapter_names=names).logits
    del reference
    peft_logits = setup.peft_model(input_ids=sequences, adapter_names=names).logits
    fused_logits = setup.served(input_ids=sequences).logits
    decode = slice(P - 1, sequences.shape[1] - 1)
    peft_all, peft_decode = row_errors(peft_logits, ref), row_errors(peft_logits[:, decode], ref[:, decode])
    dtype, K = setup.dtype, setup.served.config.intermediate_size
    rows = [judge("peft", "all", peft_all, peft_all, dtype, K),
            judge("fusedlora", "all", row_errors(fused_logits, ref), peft_all, dtype, K)]
    for name, decoder in decoders.items():
        logits = decoder.run(forced=sequences[:, P:], keep_logits=True)[1]
        rows.append(judge(name, "decode", row_errors(logits, ref[:, decode]), peft_decode, dtype, K))
    return dict(reference="PEFT in float64", sequence=list(sequences.shape), factor=FACTOR,
                absolute_bound=absolute_bound(dtype, K),
                fusedlora_vs_peft=row_errors(fused_logits, peft_logits, scale=ref).max().item(), rows=rows,
                ok=all(row["ok"] for row in rows))


def print_check(check):
    B, S = check["sequence"]
    print(f"Logit check: {B} requests x {S} tokens, teacher-forced (prompts + fusedlora's greedy tokens); each "
          f"row's logits against {check['reference']}, e = ||logits - ref|| / ||ref||. Bounds per row: "
          f"fusedlora <= {check['factor']:g} x PEFT's e + u; every provider <= {check['absolute_bound']:.2e}.")
    head = ["provider", "positions", "max e", "worst row: e / bound (PEFT's e)", "ok"]
    body = [[row["provider"], row["positions"], f"{row['max_rel_err']:.2e}",
             f"row {row['worst_row']}: {row['worst_rel_err']:.2e} / {row['worst_bound']:.2e} "
             f"({row['worst_peft_rel_err']:.2e})", "yes" if row["ok"] else "NO"] for row in check["rows"]]
    print("\n".join(report.table(head, body)))
    print(f"fusedlora against PEFT: max ||f - p|| / ||ref|| = {check['fusedlora_vs_peft']:.2e}")


class Setup:
    """The requests, PEFT with every adapter over a copy of the base model, and the pool over the base model."""

    def __init__(self, args):
        self.dtype = torch.bfloat16 if CUDA else torch.float32
        base = build_model(not CUDA, self.dtype, layers=1 if args.dry_run else 2)
        gen = torch.Generator().manual_seed(1)
        self.prompts = torch.randint(0, base.config.vocab_size, (args.batch, args.prompt), generator=gen).to(base.device)
        self.names = [f"a{(b * 7) % args.adapters}" for b in range(args.batch)]
        self.ranks = adapter_ranks(args.adapters)
        with tempfile.TemporaryDirectory() as tmp:
            paths = save_adapters(base, self.ranks, tmp)
            self.peft_model = load_peft(copy.deepcopy(base), paths)
            self.served = base
            # fp32 adapter buffers, as PEFT keeps its adapters (autocast_adapter_dtype): the same numbers.
            self.pool = fusedlora.AdapterPool(base, max_adapters=args.adapters, max_rank=max(self.ranks),
                                              dtype=torch.float32)
            for i, path in enumerate(paths):
                self.pool.load(f"a{i}", path)

    def generate(self, model, new_tokens, **kwargs):
        """Greedy tokens (B, new_tokens) from model.generate."""
        out = model.generate(input_ids=self.prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(self.prompts), **kwargs)
        return out[:, self.prompts.shape[1]:]


def timed(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        if CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


CASES = ("main", "dora", "rl")


def _cases(text: str):
    cases = [c.strip() for c in text.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or not cases:
        raise argparse.ArgumentTypeError(f"cases are among {', '.join(CASES)}, got {text!r}")
    return [c for c in CASES if c in cases]


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=SCENARIOS, default="default")
    for flag, help_ in (("adapters", "adapters loaded"), ("batch", "requests"), ("prompt", "prompt tokens"),
                        ("new-tokens", "tokens generated per request"), ("repeats", "timed runs per provider")):
        parser.add_argument(f"--{flag}", type=int, help=f"{help_} (default: the scenario's)")
    parser.add_argument("--out", type=Path, help="write serve-<gpu>[-<scenario>].json there")
    parser.add_argument("--dry-run", action="store_true",
                        help="without a GPU only: a one-layer tiny model, fewer requests (checks the plumbing)")
    parser.add_argument("--moe", action="store_true",
                        help="the MoE row: a Qwen3-MoE model, LoRA on its expert parameters too (serve_moe.py)")
    parser.add_argument("--cases", type=_cases, default=list(CASES),
                        help=f"comma-separated, of {', '.join(CASES)} (default: all): the plain adapters' mixed batch, "
                             "the DoRA mixed batch and the RL loop (the last two in benchmarks/serve_dora.py)")
    args = parser.parse_args(argv)
    if args.moe:
        return args  # serve_moe.py applies its own sizes to what is not given
    tiny = args.dry_run or not CUDA
    preset = DRY if args.dry_run else TINY if tiny else SCENARIOS[args.scenario]
    for key, value in preset.items():
        if getattr(args, key) is None or tiny:
            setattr(args, key, value)
    return args


def graph_decoder(setup, new_tokens):
    """(a StaticDecoder replaying a captured step, None) or (None, the error) when capture fails: any
    failure, CUDA's or the model code's, is reported and costs the run only this provider."""
    decoder = StaticDecoder(setup.served, setup.prompts, new_tokens)
    try:
        decoder.capture()
    except Exception as error:  # noqa: BLE001 (reported, and the command exits 1)
        return None, f"{type(error).__name__}: {error}"
    return decoder, None


@torch.no_grad()
def main(argv=None):
    args = parse(argv)
    if args.moe:
        import serve_moe
        return serve_moe.main(args)
    if not CUDA:
        print("No CUDA GPU: a tiny float32 model through the Triton interpreter, checking fusedlora's logits "
              "against PEFT and float64, and comparing greedy tokens. Throughput needs a GPU.")
    result = dict(suite.header(torch.cuda.get_device_name() if CUDA else None), transformers=transformers.__version__,
                  peft=peft.__version__, scenario=args.scenario if CUDA else "tiny", cases=args.cases, ok=None)
    # On the disk from the start: a run stopped by its timeout leaves the check and the providers timed so far.
    record = Record(args.out, out_stem(result), result, rows_key="providers")
    status = main_case(args, result, record) if "main" in args.cases else 0
    if "dora" in args.cases or "rl" in args.cases:
        if CUDA:  # the main case's models went with its frame; the DoRA cases build their own
            torch.cuda.empty_cache()
        import serve_dora  # imports this module: loaded only when its cases run
        status = max(status, serve_dora.run(args, result, record))
    return finish(result, args, status, record)


def main_case(args, result, record):
    """The mixed batch of plain adapters, every provider; returns the exit status so far."""
    setup, T, status = Setup(args), args.new_tokens, 0
    print(f"{args.batch} requests, {args.adapters} adapters (ranks {min(setup.ranks)}..{max(setup.ranks)}), "
          f"{args.prompt} prompt + {T} new tokens, {setup.dtype}", flush=True)
    result["setup"] = dict(adapters=args.adapters, batch=args.batch, prompt=args.prompt, new_tokens=T,
                           repeats=args.repeats, ranks=setup.ranks, dtype=str(setup.dtype))
    # One block for everything the pool serves: a captured graph reads this block's ids tensor.
    with setup.pool.use(setup.names):
        fused_tokens = setup.generate(setup.served, T)  # the sequence the check feeds every provider
        decoders = {"fusedlora-static": StaticDecoder(setup.served, setup.prompts, T)}
        if CUDA:
            decoders["fusedlora-graph"], result["graph_error"] = graph_decoder(setup, T)
            if result["graph_error"]:
                print(f"WRONG: the CUDA-graph decode step could not be captured: {result['graph_error']}",
                      file=sys.stderr)
                del decoders["fusedlora-graph"]
                status = 1
        result["logit_check"] = check_logits(setup, torch.cat([setup.prompts, fused_tokens], 1), decoders)
        print_check(result["logit_check"])
        record.write(partial=True)
        failed = [row["provider"] for row in result["logit_check"]["rows"] if not row["ok"]]
        if failed:
            # One new provider beyond its bound must not cost the others their timings.
            print(f"WRONG: logits beyond the bound for {', '.join(failed)} (table above); "
                  "those are not timed.", file=sys.stderr)
            status = 1
        runs = {"peft": lambda n: setup.generate(setup.peft_model, n, adapter_names=setup.names),
                "fusedlora": lambda n: setup.generate(setup.served, n),
                **{name: (lambda n, d=decoder: d.run(n)[0]) for name, decoder in decoders.items()}}
        runs = {name: run for name, run in runs.items() if name not in failed}
        peft_run = None
        for name, run in runs.items():
            if CUDA:
                run(2)  # warm-up: kernels, autotuning, caches
                tokens, seconds = timed(lambda: run(T), args.repeats)
            else:  # one untimed run each for the tokens; fusedlora's generate has run already
                tokens, seconds = (fused_tokens if name == "fusedlora" else run(T)), None
            if name == "peft":
                peft_run = (tokens, seconds)
            record.add(provider_row(name, tokens, seconds, args.batch * T, peft_run))
    print_agreement_note()
    return status


def provider_row(name, tokens, seconds, count, peft_run):
    """A provider's row (tokens/s on CUDA, greedy-token agreement with PEFT), printed and returned.
    peft_run: PEFT's (tokens, seconds), or None when PEFT was not run (it failed its check)."""
    peft_tokens, peft_seconds = peft_run if peft_run is not None else (None, None)
    agree = None if name == "peft" or peft_tokens is None else (tokens == peft_tokens).float().mean().item()
    speedup = None if seconds is None or peft_seconds is None else peft_seconds / seconds
    row = dict(provider=name, tokens_equal_to_peft=agree, seconds=seconds,
               tokens_per_s=None if seconds is None else count / seconds, speedup_over_peft=speedup)
    line = f"{name:17}"
    if seconds is not None:
        line += f" {count / seconds:9.1f} tokens/s, {seconds * 1e3:8.1f} ms for {count} tokens"
        line += ";" if speedup is None else f", {speedup:5.2f}x PEFT;"
    if agree is not None:
        line += f" greedy tokens equal to PEFT's in {agree:.1%} of positions"
    if seconds is not None or agree is not None:
        print(line, flush=True)
    return row


def report_providers(timings, count):
    """provider_row for every entry of {name: (tokens, seconds)}, PEFT's first."""
    rows = [provider_row(name, tokens, seconds, count, timings.get("peft"))
            for name, (tokens, seconds) in timings.items()]
    print_agreement_note()
    return rows


def print_agreement_note():
    print("Greedy-token agreement is information, not a check: with near-flat logits (random weights) rounding "
          "alone flips an argmax, and the rest of the sequence follows it. The logit check above is the check.")
    if CUDA:
        print(f"on {torch.cuda.get_device_name()}")


def out_stem(result):
    scenario = "" if result["scenario"] in ("default", "tiny") else "-" + result["scenario"]
    cases = "" if "main" in result.get("cases", ["main"]) else "-" + "-".join(result["cases"])
    return f"serve-{report.stem(result['gpu'] if CUDA else 'cpu-check')}{scenario}{cases}"


def finish(result, args, status, record=None):
    """Writes the JSON with --out; returns the exit status."""
    result["ok"] = status == 0
    if record is None:
        record = Record(args.out, out_stem(result), result, rows_key="providers")
    for path in record.finish():
        print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
