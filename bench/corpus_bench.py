"""End-to-end benchmark of `gradsae score` against the floor and the dense-gradient approach.

    python bench/corpus_bench.py                       # GPT-2-small config, hook blocks.6, 32768 latents
    python bench/corpus_bench.py --tokens 2048         # shorter

Three variants score the same corpus (random words, a local word-level tokenizer), with the
same model (GPT-2-small config, random weights, built from the config with a fixed seed), on
the same batches (gradsae's token-budget batcher), each in a fresh subprocess:

- ``floor``: the bare model forward plus an activation-only backward of the same objective
  (mean next-token loss per sequence) down to the hook, no SAE: parameters frozen, the hook's
  output made a leaf so backward stops there. The loss is computed as gradsae computes it
  (:mod:`gradsae.model.head`: the base model, then the head a chunk of positions at a time),
  so the gap to ``gradsae`` is what the SAE costs.
- ``floor-logits``: the same with the model's own ``[B, T, vocab]`` logits and
  ``F.cross_entropy``, for reference: what the split head saves the model's part.
- ``gradsae``: ``gradsae.score_corpus`` end to end (tokenising, batching, forward + backward
  with the spliced SAE, LatentStats, top examples, and writing the output directory).
- ``dense``: the approach of the paper's released code and SAELens' attribution tutorial:
  dense latents ``z = encode(x.detach())`` with ``requires_grad`` + ``retain_grad`` spliced in
  with a forward hook, parameters left requiring grad, the loss from the model's logits with
  ``F.cross_entropy``, backward, then the same per-latent statistics from the dense
  ``z * z.grad``.

The variants run in ``--repeat`` interleaved rounds and each keeps its fastest round. Time is
the wall time of the scoring loop (for gradsae the whole ``score_corpus`` call) after
one small warm-up batch, and the process CPU time over the same span (steadier than wall time
on a machine shared with other work); memory is the peak resident set during it (VmHWM after resetting it
through /proc/self/clear_refs after the warm-up, so what the warm-up leaves resident, such as
parameter gradients, counts), reported whole and above the resident set of the built model +
SAE. Results go to bench/results/cpu-corpus.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB = 50257


def tokenizer():
    """A word-level tokenizer over VOCAB synthetic words (w0 ... w50256), built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", pad_token="w0", eos_token="w0")


def build(args):
    import torch
    import transformers as tf

    import gradsae

    cfg = tf.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=VOCAB,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    d, n = 768, args.d_sae
    W_dec = torch.randn(n, d, generator=g)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    sae = gradsae.SAE(W_dec.T.contiguous() * 0.5, torch.randn(n, generator=g) * 0.01, W_dec,
                      torch.zeros(d), "topk", k=args.k)
    return model, sae


def _batches(args, tok):
    from gradsae.corpus.batching import make_batches
    from gradsae.corpus.data import open_corpus

    return list(make_batches(open_corpus(args.data), tok, max_length=args.max_length,
                             batch_tokens=args.batch_tokens, min_length=2))


def _loss(logits, ids, mask):
    """Sum over sequences of the mean next-token NLL over real tokens, the usual way."""
    import torch.nn.functional as F

    lg = logits[:, :-1].float()
    tgt = ids[:, 1:].masked_fill(~(mask[:, :-1] & mask[:, 1:]), -100)
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none").view(tgt.shape)
    return (nll.sum(-1) / (tgt != -100).sum(-1).clamp(min=1)).sum()


def child(args) -> dict:
    import torch

    from gradsae.benchmark import reset_peak_rss, rss_kib

    import gradsae

    model, sae = build(args)
    tok = tokenizer()
    block = model.transformer.h[args.layer]
    warm = torch.randint(0, VOCAB, (1, 32))
    out: dict = {"variant": args.child}

    if args.child == "gradsae":
        scorer = gradsae.GradSAE(model, sae, hook=f"blocks.{args.layer}.hook_resid_post")
        base = rss_kib("VmRSS")  # model + SAE
        scorer.attribute(warm, torch.ones_like(warm))
        ok = reset_peak_rss()
        c = time.process_time()
        t = time.perf_counter()
        res = gradsae.score_corpus(model, sae, args.data, hook=f"blocks.{args.layer}.hook_resid_post", objective="loss",
                                   tokenizer=tok, out=args.outdir, overwrite=True, max_length=args.max_length,
                                   batch_tokens=args.batch_tokens, progress=False)
        out["seconds"] = time.perf_counter() - t
        out["cpu_seconds"] = time.process_time() - c
        out["tokens"] = res.stats.tokens
        out["batches"] = res.meta["batches"]
        out["loop_seconds"] = res.meta["seconds"]
    else:
        batches = _batches(args, tok)
        stats = gradsae.LatentStats(sae.d_sae) if args.child == "dense" else None
        head = None
        if args.child in ("floor", "floor-logits"):
            if args.child == "floor":
                from gradsae.model.head import split_head

                head = split_head(model)
            for p in model.parameters():
                p.requires_grad_(False)

            def hook(mod, inp, o):
                h = o[0] if isinstance(o, tuple) else o
                h = h.detach().requires_grad_(True)
                return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h
        else:
            zs = []

            def hook(mod, inp, o):
                h = o[0] if isinstance(o, tuple) else o
                pre = (h.detach() - sae.b_dec) @ sae.W_enc + sae.b_enc
                top = pre.topk(sae.k, dim=-1)
                z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
                z.requires_grad_(True)
                z.retain_grad()
                zs.append(z)
                xh = z @ sae.W_dec + sae.b_dec
                return (xh,) + tuple(o[1:]) if isinstance(o, tuple) else xh

        handle = block.register_forward_hook(hook)

        def step(ids, mask):
            from gradsae.model.objectives import evaluate_hidden

            mask = mask.bool()
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
            kw = dict(input_ids=ids, attention_mask=mask.long(), position_ids=pos)
            if head is not None:
                hidden = head.body(**kw).last_hidden_state
                evaluate_hidden("loss", head, hidden, ids, mask).sum().backward()
            else:
                _loss(model(**kw).logits, ids, mask).backward()
            if args.child == "dense":
                z = zs.pop()
                s = (z.grad * z).detach()
                active = z.detach() != 0
                m = mask.bool().unsqueeze(-1)
                s, zz, act = s * m, z.detach() * m, active & m
                stats.tokens += int(mask.sum())
                stats.count += act.sum((0, 1))
                stats.act_sum += zz.sum((0, 1)).double()
                stats.score_sum += s.sum((0, 1)).double()
                stats.relu_sum += s.relu().sum((0, 1)).double()
                stats.abs_sum += s.abs().sum((0, 1)).double()
                smax = torch.where(act, s, torch.full_like(s, float("-inf"))).amax((0, 1)).double()
                torch.maximum(stats.score_max, smax, out=stats.score_max)
                model.zero_grad(set_to_none=False)  # as a loop over batches does

        base = rss_kib("VmRSS")  # model + SAE; what the warm-up leaves (parameter grads) counts
        step(warm, torch.ones_like(warm))
        ok = reset_peak_rss()
        c = time.process_time()
        t = time.perf_counter()
        tokens = 0
        for b in batches:
            step(b.input_ids, b.attention_mask)
            tokens += b.tokens
        out["seconds"] = time.perf_counter() - t
        out["cpu_seconds"] = time.process_time() - c
        out["tokens"] = tokens
        out["batches"] = len(batches)
        handle.remove()
    peak = rss_kib("VmHWM")
    out.update({"peak_rss_mib": peak / 1024, "base_rss_mib": base / 1024,
                "peak_above_base_mib": (peak - base) / 1024, "peak_reset": ok,
                "tokens_per_s": out["tokens"] / out["seconds"], "threads": torch.get_num_threads()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="corpus size in tokens (about)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--d-sae", type=int, default=32768)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--variants", default="floor,gradsae,dense,floor-logits")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds; the fastest of each variant counts")
    ap.add_argument("--out", default=str(HERE / "results" / "cpu-corpus.json"))
    ap.add_argument("--note", default="", help="how the machine was during the run (recorded with the results)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--outdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return

    import torch

    import gradsae

    work = Path(tempfile.mkdtemp(prefix="gradsae-corpus-bench-"))
    data = work / "corpus.txt"
    rng = random.Random(0)
    lines, n = [], 0
    while n < args.tokens:  # documents of 20..300 words: some windowed, some short
        k = rng.randint(20, 300)
        lines.append(" ".join(f"w{rng.randrange(VOCAB)}" for _ in range(k)))
        n += k
    data.write_text("\n".join(lines) + "\n")
    results, runs = {}, {}
    for rep in range(args.repeat):  # interleaved rounds; each variant keeps its fastest round
        for v in args.variants.split(","):
            cmd = [sys.executable, __file__, "--child", v, "--data", str(data), "--outdir", str(work / "out"),
                   "--max-length", str(args.max_length), "--batch-tokens", str(args.batch_tokens),
                   "--d-sae", str(args.d_sae), "--k", str(args.k), "--layer", str(args.layer)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                raise SystemExit(f"variant {v} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
            r = json.loads(line[0][7:])
            runs.setdefault(v, []).append(r)
            if v not in results or r["seconds"] < results[v]["seconds"]:
                results[v] = r
            print(f"round {rep} {v:8s} {r['tokens']:6d} tok {r['seconds']:8.2f} s (cpu {r['cpu_seconds']:8.2f} s) "
                  f"{r['tokens_per_s']:8.1f} tok/s peak {r['peak_rss_mib']:8.0f} MiB "
                  f"(+{r['peak_above_base_mib']:.0f} over model)", flush=True)
    summary = {}
    if {"floor", "gradsae"} <= set(results):
        summary["time_vs_floor"] = results["gradsae"]["seconds"] / results["floor"]["seconds"]
        # the scoring loop alone (tokenising, batching, attribution, statistics, top examples),
        # without writing the output directory, a fixed cost that a long corpus amortises
        summary["cpu_time_vs_floor"] = results["gradsae"]["cpu_seconds"] / results["floor"]["cpu_seconds"]
        summary["loop_time_vs_floor"] = results["gradsae"]["loop_seconds"] / results["floor"]["seconds"]
        summary["target_time_vs_floor_max"] = 1.25
    if {"floor", "floor-logits"} <= set(results):  # what the split output head saves the model's part
        summary["floor_logits_vs_floor_time"] = results["floor-logits"]["seconds"] / results["floor"]["seconds"]
        summary["floor_logits_vs_floor_peak_above_model"] = (results["floor-logits"]["peak_above_base_mib"]
                                                             / results["floor"]["peak_above_base_mib"])
    if {"dense", "gradsae"} <= set(results):
        summary["throughput_vs_dense"] = results["gradsae"]["tokens_per_s"] / results["dense"]["tokens_per_s"]
        summary["cpu_throughput_vs_dense"] = results["dense"]["cpu_seconds"] / results["gradsae"]["cpu_seconds"]
        summary["target_throughput_vs_dense_min"] = 1.5
        summary["peak_rss_vs_dense"] = results["gradsae"]["peak_rss_mib"] / results["dense"]["peak_rss_mib"]
        summary["peak_above_model_vs_dense"] = (results["gradsae"]["peak_above_base_mib"]
                                                / results["dense"]["peak_above_base_mib"])
        summary["target_peak_vs_dense_max"] = 0.5
    print(json.dumps(summary, indent=2))
    doc = {
        "benchmark": "gradsae score end to end vs floor vs dense retain_grad",
        "shape": {"model": "GPT-2-small config, random weights", "layer": args.layer, "hook": f"blocks.{args.layer}.hook_resid_post",
                  "d_in": 768, "d_sae": args.d_sae, "k": args.k, "max_length": args.max_length,
                  "batch_tokens": args.batch_tokens, "objective": "loss", "mode": "splice"},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "gradsae": gradsae.__version__,
                    "note": args.note},
        "results": results,
        "all_rounds": runs,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
