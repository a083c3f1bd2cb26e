"""Every layer's SAE in one forward and backward, against one run per SAE and the dense
``retain_grad`` approach.

    python bench/multi_sae.py                  # GPT-2-small config, 12 SAEs, 1 x 1024 tokens, 3 rounds
    python bench/multi_sae.py --rounds 1 --d-sae 8192   # quicker

Setup: the GPT-2-small config (12 layers, d=768, random weights built from the config with a
fixed seed, nothing downloaded), a TopK SAE (``--d-sae`` latents, ``--k``) at every
``blocks.L.hook_resid_post``, one batch of ``--tokens`` random tokens, objective the mean
next-token loss. Variants, each a full forward and backward giving every SAE's influence:

- ``multi-error``: ``GradSAE(model, {hook: sae}, mode="error")``: all SAEs in one pass, each
  hook's output (and so every gradient) the model's own.
- ``multi-splice``: the same with every SAE spliced (the model runs on the reconstructions).
- ``single``: ``GradSAE(model, sae, hook=h, mode="error")`` once per hook (the same numbers as
  ``multi-error``, twelve forwards and backwards); ``single`` per pass is their mean.
- ``dense``: the Sparse Feature Circuits recipe: at every hook the dense latents
  ``f = encode(x)`` (x not detached), ``f.retain_grad()``, the output replaced by
  ``x_hat + (x - x_hat)`` (the residual also retained), the loss from the model's logits,
  backward; then ``f * f.grad`` per hook. Model parameters frozen as for gradsae.
- ``floor`` (profile): the model's forward and an activation-only backward, no SAE;
  ``encode`` (profile): one SAE's sparse encode of the batch alone.

Time: the variants run in ``--rounds`` interleaved rounds (the order rotates each round; the
slow ones, ``single``, ``dense`` and ``multi-splice``, only in the first ``--heavy-rounds``);
each reports the median wall time and the median process CPU time (steadier on a shared
machine).
Memory: the peak resident set (VmHWM, reset through /proc/self/clear_refs right before the
variant) minus the resident set just before it, i.e. memory above the model and the SAEs. The
script re-runs itself with ``MALLOC_MMAP_THRESHOLD_`` set so that every large buffer is its own
mapping and goes back to the system when freed (otherwise the allocator keeps freed memory and
the next variant's base would include it). Results: bench/results/multi-sae-cpu.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = "MALLOC_MMAP_THRESHOLD_"
HEAVY = ("single", "dense", "multi-splice")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(args):
    import torch
    import transformers as tf

    import gradsae

    cfg = tf.GPT2Config(n_layer=args.layers, n_embd=768, n_head=12, n_positions=max(1024, args.tokens),
                        vocab_size=50257, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(cfg).eval()
    saes = {}
    for L in range(args.layers):
        g = torch.Generator().manual_seed(100 + L)
        W_dec = torch.randn(args.d_sae, 768, generator=g)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        saes[f"blocks.{L}.hook_resid_post"] = gradsae.SAE(
            (W_dec.T * 0.5).contiguous(), torch.randn(args.d_sae, generator=g) * 0.01, W_dec, torch.zeros(768),
            "topk", k=args.k)
    return model, saes


def variants(model, saes, args):
    import torch
    import torch.nn.functional as F

    import gradsae
    from gradsae.op import encode_sparse

    hooks = list(saes)
    multi = {m: gradsae.GradSAE(model, saes, mode=m) for m in ("error", "splice")}
    singles = {h: gradsae.GradSAE(model, saes[h], hook=h, mode="error") for h in hooks}
    layers = model.transformer.h

    def run_multi(mode):
        def f(ids):
            attr = multi[mode].attribute(ids, objective="loss")
            return sum(int((inf.indices >= 0).sum()) for inf in attr.influences.values())
        return f

    def run_singles(ids):
        out = []
        for h in hooks:
            t, c = time.perf_counter(), time.process_time()
            singles[h].attribute(ids, objective="loss")
            out.append((time.perf_counter() - t, time.process_time() - c))
        return out

    def run_dense(ids):
        fs, handles = [], []

        def hook(sae):
            def fn(mod, inp, o):
                x = o[0] if isinstance(o, tuple) else o
                pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
                top = pre.topk(sae.k, dim=-1)
                f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
                if not f.requires_grad:
                    f.requires_grad_(True)
                f.retain_grad()
                x_hat = f @ sae.W_dec + sae.b_dec
                res = x - x_hat
                if res.requires_grad:
                    res.retain_grad()
                fs.append(f)
                y = x_hat + res
                return (y,) + tuple(o[1:]) if isinstance(o, tuple) else y
            return fn

        for L, h in enumerate(hooks):
            handles.append(layers[L].register_forward_hook(hook(saes[h])))
        try:
            with torch.enable_grad():
                logits = model(ids).logits
                F.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
            return sum(int(((f.grad * f).detach() != 0).sum()) for f in fs)
        finally:
            for hd in handles:
                hd.remove()

    def run_floor(ids):
        from gradsae.model.head import split_head
        from gradsae.model.objectives import evaluate_hidden

        head = split_head(model)

        def leaf(mod, inp, o):
            x = (o[0] if isinstance(o, tuple) else o).detach().requires_grad_(True)
            return (x,) + tuple(o[1:]) if isinstance(o, tuple) else x

        hd = layers[0].register_forward_hook(leaf)
        try:
            with torch.enable_grad():
                mask = torch.ones_like(ids, dtype=torch.bool)
                hidden = head.body(input_ids=ids).last_hidden_state
                evaluate_hidden("loss", head, hidden, ids, mask).sum().backward()
        finally:
            hd.remove()
        return 0

    x = torch.randn(args.tokens, 768)

    def run_encode(ids):
        return int((encode_sparse(x, saes[hooks[0]])[0] >= 0).sum())

    return {"multi-error": run_multi("error"), "multi-splice": run_multi("splice"), "single": run_singles,
            "dense": run_dense, "floor": run_floor, "encode": run_encode}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-sae", type=int, default=32768)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--heavy-rounds", type=int, default=1,
                    help="rounds that also run the slow variants (single x12, dense, multi-splice)")
    ap.add_argument("--skip", default="", help="comma-separated variants to leave out")
    ap.add_argument("--out", default=str(HERE / "results" / "multi-sae-cpu.json"))
    args = ap.parse_args(argv)
    if ENV not in os.environ:  # large buffers as their own mappings: freed memory leaves the RSS
        env = dict(os.environ, **{ENV: "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    import torch

    import gradsae
    from gradsae.benchmark import reset_peak_rss, rss_kib

    model, saes = build(args)
    for p in model.parameters():
        p.requires_grad_(False)  # every variant: no parameter gradients
    runs = variants(model, saes, args)
    skip = {s for s in args.skip.split(",") if s}
    names = [n for n in runs if n not in skip]
    ids = torch.randint(0, 50257, (1, args.tokens), generator=torch.Generator().manual_seed(7))
    warm = ids[:, :64]
    for n in names:  # warm-up: first-call costs (allocator, dispatch) out of the measurement
        runs[n](warm)
    times: dict = {n: [] for n in names}
    cpus: dict = {n: [] for n in names}
    peaks: dict = {n: [] for n in names}
    per_single: list = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            if n in HEAVY and r >= args.heavy_rounds:
                continue
            gc.collect()
            base = rss_kib("VmRSS")
            ok = reset_peak_rss()
            t, c = time.perf_counter(), time.process_time()
            out = runs[n](ids)
            times[n].append(time.perf_counter() - t)
            cpus[n].append(time.process_time() - c)
            peaks[n].append((rss_kib("VmHWM") - base) / 1024 if ok else None)
            if n == "single":
                per_single.extend(out)
            print(f"round {r}: {n:13s} {times[n][-1]:7.2f} s wall {cpus[n][-1]:7.2f} s cpu "
                  f"peak above base {peaks[n][-1]:8.1f} MiB", flush=True)
    med = lambda v: statistics.median(v) if v else None  # noqa: E731
    res = {n: {"wall_s": med(times[n]), "cpu_s": med(cpus[n]), "peak_above_base_mib": med(peaks[n]),
               "rounds_wall_s": times[n], "rounds_cpu_s": cpus[n]} for n in names}
    if per_single:
        res["single-pass"] = {"wall_s": med([a for a, _ in per_single]), "cpu_s": med([b for _, b in per_single]),
                              "note": "one single-SAE pass: the median of the 12 per-hook passes of every round"}
    ratios = {}
    if "multi-error" in res and per_single:
        ratios["multi_error_vs_one_single_pass_wall"] = res["multi-error"]["wall_s"] / res["single-pass"]["wall_s"]
        ratios["multi_error_vs_one_single_pass_cpu"] = res["multi-error"]["cpu_s"] / res["single-pass"]["cpu_s"]
        ratios["multi_error_vs_all_single_runs_wall"] = res["multi-error"]["wall_s"] / res["single"]["wall_s"]
    if "multi-error" in res and "dense" in res:
        ratios["multi_error_vs_dense_wall"] = res["multi-error"]["wall_s"] / res["dense"]["wall_s"]
        ratios["multi_error_vs_dense_peak_memory"] = (res["multi-error"]["peak_above_base_mib"]
                                                      / res["dense"]["peak_above_base_mib"])
    if "multi-splice" in res and "dense" in res:
        ratios["multi_splice_vs_dense_peak_memory"] = (res["multi-splice"]["peak_above_base_mib"]
                                                       / res["dense"]["peak_above_base_mib"])
    if "floor" in res and "encode" in res and per_single:
        ratios["model_floor_share_of_single_pass_cpu"] = res["floor"]["cpu_s"] / res["single-pass"]["cpu_s"]
        ratios["one_encode_share_of_single_pass_cpu"] = res["encode"]["cpu_s"] / res["single-pass"]["cpu_s"]
        ratios["predicted_multi_vs_single_cpu"] = ((res["floor"]["cpu_s"] + args.layers * res["encode"]["cpu_s"])
                                                   / res["single-pass"]["cpu_s"])
    report = {
        "benchmark": "every layer's SAE in one forward/backward vs one run per SAE vs dense retain_grad",
        "shape": {"model": "GPT-2-small config, random weights", "layers": args.layers, "d_in": 768,
                  "d_sae": args.d_sae, "k": args.k, "tokens": args.tokens, "batch": [1, args.tokens],
                  "hooks": list(saes), "objective": "loss (mean next-token NLL)"},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "gradsae": gradsae.__version__, "rounds": args.rounds, "heavy_rounds": args.heavy_rounds,
                    "note": "shared machine: medians of interleaved rounds; cpu_s is process CPU time"},
        "memory": "peak resident set (VmHWM reset before each variant) minus the resident set before it "
                  f"(model + SAEs), with {ENV}=65536 so freed buffers leave the resident set",
        "results": res,
        "ratios": ratios,
    }
    print(json.dumps({"results": {n: {k: v for k, v in r.items() if not k.startswith("rounds")}
                                  for n, r in res.items()}, "ratios": ratios}, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
