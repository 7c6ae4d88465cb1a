"""GPU check (issue 15): MAVIS at realistic shapes on one GPU, in bf16, with no downloads.

Random-weight models built in code (speed and memory do not depend on the weights):

* pi_ref: a ~1.1B Llama (TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads, 4 KV heads,
  MLP 5632, vocabulary 32000);
* three ~100M value models (Llama trunks: hidden 768, 8 layers, 12 heads, MLP 2048, the same
  vocabulary; separate trunks, the costliest case) and one 3-head model of the same size;
* a word-level tokenizer of the same vocabulary, built in code.

Measured, every figure next to a baseline of the same run:

* ``decode``: tokens/s of plain HF ``generate`` sampling vs MAVIS with M=3 value models vs
  MAVIS with the 3-head model, at batch 1, 8 and 32; every sequence forced to the full length;
  peak GPU memory of each;
* ``train``: optimizer steps/s and peak memory of value-model training (Adafactor, batch 16 x
  256 tokens) with and without gradient checkpointing; the frozen-trunk feature pass (tokens/s);
* ``env``: GPU, versions, what ``--device auto --dtype auto`` resolves to.

Each section is written to ``<out>/*.json`` as soon as it is done, and sections that would pass
the time budget (``--budget``, default 420 s) are recorded as skipped, so a run cut short still
returns what it measured. ``--tiny`` runs the same code at toy shapes (the CPU test of this script).

    bash benchmarks/gpu_check.sh                                  # on a GPU machine
    python benchmarks/gpu_check.py --tiny --device cpu --out /tmp/gpu   # the script's own test
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

SHAPES = {
    "full": {
        "base": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632),
        "value": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12, intermediate_size=2048),
        "vocab": 32000, "prompt_tokens": 32, "new_tokens": 64, "batches": [1, 8, 32], "train_batch": 16, "train_len": 256, "train_steps": 5,
    },
    "tiny": {
        "base": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
        "value": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64),
        "vocab": 512, "prompt_tokens": 8, "new_tokens": 6, "batches": [1, 4], "train_batch": 4, "train_len": 16, "train_steps": 2,
    },
}
OBJECTIVES = ["helpful", "harmless", "humor"]
TOP_K, BETA = 15, 2.0


def word_tokenizer(vocab: int):
    """A word-level fast tokenizer: <eos>, <pad>, <bos>, <unk>, then w0 ... (left padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, "<pad>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(vocab - 4)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", unk_token="<unk>")
    fast.padding_side = "left"
    return fast


def build(cls, shape: dict, vocab: int, device, dtype, seed: int):
    """A random-weight Llama ``cls`` built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, eos_token_id=0, pad_token_id=1, bos_token_id=2, **shape)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self):
        return round(torch.cuda.max_memory_allocated() / 2**30, 3) if self.cuda else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (tests the script on a CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later sections are skipped past it")
    args = ap.parse_args()
    t_start = time.perf_counter()

    import transformers
    from transformers import LlamaForCausalLM, LlamaModel

    from mavis_align.decoding.decoder import MavisDecoder
    from mavis_align.generation import SamplingConfig, encode_batch
    from mavis_align.placement import name_of, resolve
    from mavis_align.values import ValueModel, tokenizer_fingerprint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    S = SHAPES["tiny" if args.tiny else "full"]
    place = resolve(args.device, args.dtype)
    device, dtype = place.device, place.dtype
    timer = Timer(device)
    env = {
        "shapes": "tiny" if args.tiny else "full", "placement": place.describe(), "auto_resolves_to": resolve().describe(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
    }
    (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    print(json.dumps(env))

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget

    tok = word_tokenizer(S["vocab"])
    base = build(LlamaForCausalLM, S["base"], S["vocab"], device, dtype, 0)
    fp = tokenizer_fingerprint(tok)
    singles = [ValueModel(build(LlamaModel, S["value"], S["vocab"], device, dtype, i + 1), [o], fp, tokenizer=tok, pool="mean").place(device, dtype)
               for i, o in enumerate(OBJECTIVES)]
    multi = ValueModel(build(LlamaModel, S["value"], S["vocab"], device, dtype, 9), OBJECTIVES, fp, tokenizer=tok, pool="mean").place(device, dtype)
    sizes = {"base_params": n_params(base), "value_params_each": n_params(singles[0]), "multihead_params": n_params(multi)}
    print(json.dumps(sizes))
    g = torch.Generator().manual_seed(0)
    words = lambda n: " ".join(f"w{int(i)}" for i in torch.randint(0, S["vocab"] - 4, (n,), generator=g))  # noqa: E731
    prompts = [words(S["prompt_tokens"]) for _ in range(max(S["batches"]))]
    n_new = S["new_tokens"]

    def run(method: str, batch: int) -> dict:
        ps = prompts[:batch]
        cfg = SamplingConfig(max_new_tokens=n_new, min_new_tokens=n_new, top_k=TOP_K, beta=BETA)
        timer.reset_peak()
        timer.sync()
        t0 = time.perf_counter()
        if method == "hf_generate":
            ids, mask = encode_batch(tok, ps, device)
            with torch.no_grad():
                base.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=n_new, min_new_tokens=n_new, top_k=0, top_p=1.0,
                              temperature=1.0, pad_token_id=tok.pad_token_id)
        elif method == "mavis_m3":
            MavisDecoder(base, tok, singles).generate(ps, config=cfg, batch_size=batch, chat=False)
        else:  # mavis_multihead
            MavisDecoder(base, tok, [multi]).generate(ps, config=cfg, batch_size=batch, chat=False)
        timer.sync()
        sec = time.perf_counter() - t0
        return {"method": method, "batch": batch, "seconds": round(sec, 4), "tokens_per_s": round(batch * n_new / sec, 2), "peak_gib": timer.peak_gib()}

    decode = {"new_tokens": n_new, "prompt_tokens": S["prompt_tokens"], "top_k": TOP_K, "beta": BETA, "sizes": sizes, "rows": [], "skipped": []}
    for method in ("hf_generate", "mavis_m3", "mavis_multihead"):
        run(method, 1)  # warm-up: kernels, allocator
    for batch in S["batches"]:
        if over_budget():
            decode["skipped"].append(f"batch {batch}: time budget")
            continue
        rows = {m: run(m, batch) for m in ("hf_generate", "mavis_m3", "mavis_multihead")}
        for m in ("mavis_m3", "mavis_multihead"):
            rows[m]["ratio_to_hf_generate"] = round(rows[m]["tokens_per_s"] / rows["hf_generate"]["tokens_per_s"], 3)
        decode["rows"].extend(rows.values())
        print(json.dumps(list(rows.values())))
        (out / "decode.json").write_text(json.dumps(decode, indent=2) + "\n")
    (out / "decode.json").write_text(json.dumps(decode, indent=2) + "\n")

    train = {"batch": S["train_batch"], "tokens": S["train_len"], "rows": [], "skipped": []}
    from transformers.optimization import Adafactor

    from mavis_align.train.regression import enable_checkpointing

    del base
    for checkpointing in (False, True):
        if over_budget():
            train["skipped"].append(f"gradient_checkpointing={checkpointing}: time budget")
            continue
        vm = ValueModel(build(LlamaModel, S["value"], S["vocab"], device, dtype, 5), ["helpful"], fp, tokenizer=tok, pool="mean").place(device, dtype)
        if checkpointing:
            enable_checkpointing(vm)
        vm.train()
        opt = Adafactor([p for p in vm.parameters() if p.requires_grad], lr=1e-4, scale_parameter=False, relative_step=False, warmup_init=False)
        ids = torch.randint(4, S["vocab"], (S["train_batch"], S["train_len"]), device=device)
        mask = torch.ones_like(ids)
        target = torch.rand(S["train_batch"], 1, device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = ((vm.score(ids, mask) - target) ** 2).mean()
            loss.backward()
            opt.step()
            return float(loss.detach())

        step()  # warm-up
        timer.reset_peak()
        timer.sync()
        t0 = time.perf_counter()
        for _ in range(S["train_steps"]):
            step()
        timer.sync()
        sec = time.perf_counter() - t0
        train["rows"].append({"gradient_checkpointing": checkpointing, "steps_per_s": round(S["train_steps"] / sec, 3),
                              "tokens_per_s": round(S["train_steps"] * ids.numel() / sec, 1), "peak_gib": timer.peak_gib(), "dtype": name_of(dtype)})
        del vm, opt
    if not over_budget():
        vm = singles[0]
        vm.eval()
        ids = torch.randint(4, S["vocab"], (S["train_batch"], S["train_len"]), device=device)
        timer.sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(S["train_steps"]):
                vm.backbone(input_ids=ids, attention_mask=torch.ones_like(ids))
        timer.sync()
        train["frozen_trunk_features_tokens_per_s"] = round(S["train_steps"] * ids.numel() / (time.perf_counter() - t0), 1)
    train["seconds_total"] = round(time.perf_counter() - t_start, 1)
    (out / "train.json").write_text(json.dumps(train, indent=2) + "\n")
    print(json.dumps(train))


if __name__ == "__main__":
    main()
