"""Evaluation of the real default model on a 50-prompt set, beside a plain transformers loop.

    python bench/bench_eval.py [--prompts 50] [--max-new-tokens 64] [--batch-size 1]

Loads SmolLM2-135M-Instruct once (the ``model.default`` source), then on the same
prompts (examples/data/quickstart.jsonl, the last assistant turn is the expected
answer) runs:

* tunesmith's ``generation`` evaluator (greedy, metrics, latency; progress bar),
  and a plain ``apply_chat_template`` + ``generate`` loop doing the same decoding;
* tunesmith's ``perplexity`` evaluator (batched), and a plain one-row-at-a-time
  loss loop.

Prints the wall times and the ratios tunesmith / plain, checks that both produce
the same text, and writes ``bench/results/eval.json``.

``--variants fp32:1,bf16:8`` instead times tunesmith's own evaluators (generation
then perplexity, as the quickstart's evaluation runs them) per dtype and
generation batch size, interleaved over ``--rounds`` rounds, and prints the median
seconds per variant, its ratio to the first variant and whether its answers equal
the first variant's; results in ``bench/results/bench_eval_variants.json``. The machine is shared:
run it with ``nice`` and read the numbers as measured under load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--data", default=str(ROOT / "examples" / "data" / "quickstart.jsonl"))
    ap.add_argument(
        "--threads", type=int, default=0,
        help="torch CPU threads (0: torch's default). On a shared, oversubscribed CPU, 1 avoids OpenMP spin-waiting",
    )
    ap.add_argument("--variants", default="", help="e.g. fp32:1,bf16:8 (dtype:generation batch size): time tunesmith's evaluators per variant")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ppl-rows", type=int, default=32, help="perplexity rows in --variants mode (the quickstart's limit)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variants:
        return variants(args)

    import tunesmith
    from tunesmith.core.config import ModelSection
    from tunesmith.core.context import RunContext
    from tunesmith.core.evalset import load_eval_rows
    from tunesmith.core.models import load_model_and_tokenizer

    regs = tunesmith.registry()
    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(ModelSection(source="default"), regs)
    load_s = time.perf_counter() - t0
    print(f"loaded the default model in {load_s:.1f} s ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)", flush=True)
    rows = load_eval_rows(args.data, limit=args.prompts)
    ctx = RunContext(registries=regs)

    gen = regs.evaluators.get("generation")
    opts = gen.Options(path=args.data, limit=args.prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    t0 = time.perf_counter()
    res = gen.evaluate(model, tok, opts, ctx)
    ts_gen = time.perf_counter() - t0
    print(f"tunesmith generation: {len(rows)} prompts in {ts_gen:.1f} s; metrics {json.dumps(res['metrics'])}", flush=True)

    # the plain library: the same prompts, the same greedy decoding and batching (left padding)
    t0 = time.perf_counter()
    plain_out = []
    tok.padding_side = "left"
    for i in range(0, len(rows), args.batch_size):
        texts = [tok.apply_chat_template(r.prompt, tokenize=False, add_generation_prompt=True) for r in rows[i : i + args.batch_size]]
        enc = tok(texts, return_tensors="pt", add_special_tokens=False, padding=True)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)
        plain_out += [t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    tok.padding_side = "right"
    plain_gen = time.perf_counter() - t0
    print(f"plain generation loop: {plain_gen:.1f} s", flush=True)
    same = sum(a == s["output"] for a, s in zip(plain_out, res["samples"]))

    ppl = regs.evaluators.get("perplexity")
    popts = ppl.Options(path=args.data, limit=args.prompts)
    t0 = time.perf_counter()
    pres = ppl.evaluate(model, tok, popts, ctx)
    ts_ppl = time.perf_counter() - t0
    from tunesmith.core.render import render_chat

    t0 = time.perf_counter()
    total, count = 0.0, 0
    for r in rows:
        enc = render_chat(tok, r.messages, max_length=popts.max_length)
        ids = torch.tensor([enc["input_ids"]])
        labels = torch.tensor([enc["labels"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total += float(loss) * n
        count += n
    plain_ppl_s = time.perf_counter() - t0
    plain_ppl = math.exp(total / count)

    m = res["metrics"]
    result = {
        "prompts": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "load_s": round(load_s, 2),
        "generation": {
            "tunesmith_s": round(ts_gen, 2),
            "plain_s": round(plain_gen, 2),
            "ratio": round(ts_gen / plain_gen, 3),
            "same_outputs": f"{same}/{len(rows)}",
            "metrics": m,
        },
        "perplexity": {
            "tunesmith_s": round(ts_ppl, 2),
            "plain_s": round(plain_ppl_s, 2),
            "ratio": round(ts_ppl / plain_ppl_s, 3),
            "tunesmith": pres["metrics"]["perplexity"],
            "plain": plain_ppl,
        },
        "note": "measured on a shared 2-core CPU under load from other processes",
    }
    print(json.dumps(result, indent=2))
    print(
        f"\n{len(rows)} prompts: generation {ts_gen:.1f} s (plain loop {plain_gen:.1f} s, ratio {ts_gen / plain_gen:.2f}, "
        f"identical outputs {same}/{len(rows)}); perplexity {ts_ppl:.1f} s (plain {plain_ppl_s:.1f} s, "
        f"ratio {ts_ppl / plain_ppl_s:.2f}; {pres['metrics']['perplexity']:.4f} vs {plain_ppl:.4f}); "
        f"tokens/s {m['tokens_per_s']:.1f}, mean latency {m['latency_mean_ms']:.0f} ms"
    )
    out = ROOT / "bench" / "results" / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def variants(args: argparse.Namespace) -> None:
    """tunesmith's generation + perplexity evaluators per dtype and batch size, interleaved."""
    import statistics

    import torch

    import tunesmith
    from tunesmith.core.config import ModelSection
    from tunesmith.core.context import RunContext
    from tunesmith.core.models import load_model_and_tokenizer

    regs = tunesmith.registry()
    specs = []
    for v in args.variants.split(","):
        dt, _, bs = v.partition(":")
        specs.append((v, dt, int(bs or 1)))
    models = {}
    for _, dt, _ in specs:
        if dt not in models:
            models[dt] = load_model_and_tokenizer(ModelSection(source="default"), regs, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dt])
    ctx = RunContext(registries=regs)
    gen, ppl = regs.evaluators.get("generation"), regs.evaluators.get("perplexity")
    times: dict[str, list[float]] = {v: [] for v, _, _ in specs}
    gen_s: dict[str, list[float]] = {v: [] for v, _, _ in specs}
    outs: dict[str, list[str]] = {}
    ppls: dict[str, float] = {}
    for rnd in range(args.rounds):
        for v, dt, bs in (specs if rnd % 2 == 0 else specs[::-1]):
            model, tok = models[dt]
            t0 = time.perf_counter()
            g = gen.evaluate(model, tok, gen.Options(path=args.data, limit=args.prompts, max_new_tokens=args.max_new_tokens,
                                                     batch_size=bs, progress=False), ctx)
            t1 = time.perf_counter()
            p = ppl.evaluate(model, tok, ppl.Options(path=args.data, limit=args.ppl_rows, progress=False), ctx)
            t2 = time.perf_counter()
            times[v].append(t2 - t0)
            gen_s[v].append(t1 - t0)
            outs[v] = [s["output"] for s in g["samples"]]
            ppls[v] = p["metrics"]["perplexity"]
            print(f"round {rnd + 1} {v}: generation {t1 - t0:.1f} s, perplexity {t2 - t1:.1f} s", flush=True)
    first = specs[0][0]
    base = statistics.median(times[first])
    print(f"\n{args.prompts} prompts x {args.max_new_tokens} new tokens + perplexity on {args.ppl_rows} rows, "
          f"median of {args.rounds} interleaved rounds, torch threads {torch.get_num_threads()}")
    print("| variant (dtype:batch) | generation s | generation + perplexity s | vs first | perplexity | answers = first |")
    print("| --- | --- | --- | --- | --- | --- |")
    result = []
    for v, _, _ in specs:
        med, gmed = statistics.median(times[v]), statistics.median(gen_s[v])
        same = sum(a == b for a, b in zip(outs[v], outs[first]))
        print(f"| {v} | {gmed:.1f} | {med:.1f} | {base / med:.2f}x | {ppls[v]:.4f} | {same}/{len(outs[first])} |")
        result.append({"variant": v, "generation_s": gen_s[v], "total_s": times[v], "median_total_s": med,
                       "speedup_vs_first": base / med, "perplexity": ppls[v], "answers_equal_first": same})
    out = ROOT / "bench" / "results" / "bench_eval_variants.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
                               "variants": result, "note": "shared 2-core CPU, other engineers' jobs running"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
