"""The dense-gradient GradSAE loop written with SAELens + TransformerLens objects, against
gradsae on the same objects (the numbers quoted in docs/interop.md).

    python bench/interop.py                               # d_sae 32768 and 131072, 3 rounds
    python bench/interop.py --d-sae 16384 --T 128 --rounds 2 --repeat 1

Every variant takes a random-weight ``HookedSAETransformer`` (parameters frozen) and a SAELens
``TopKSAE`` at ``blocks.2.hook_resid_post`` and computes the paper's scores for a batch:
Y = probability of the argmax next token at the last position, score = mean over positions of
relu(z * dY/dz).

- ``dense``: ``model.add_sae(sae)`` and a hook on ``hook_sae_acts_post`` that replaces the
  latents by a detached copy with ``requires_grad`` and keeps it; one forward, one backward,
  then ``relu(z * z.grad).mean(1)`` (the ``[tokens, d_sae]`` latents and their gradient exist
  densely). This is the loop docs/interop.md quotes.
- ``gradsae``: ``gradsae.GradSAE(model, sae).score(tokens)``.
- ``model``: the floor both share: the same forward and backward down to the hook, no SAE.

Each variant runs in a fresh subprocess and is first warmed up on 1 x 4 tokens (lazy imports,
no large allocation); peak memory is the peak resident set during its first full-size run
above the resident set just before it (CPU, peak counter reset through /proc/self/clear_refs),
or torch.cuda.max_memory_allocated above the allocation before it (GPU). Time is the median of
``--repeat`` runs after that first one. The variants run in ``--rounds`` interleaved rounds
(the order rotates every round), and each keeps its fastest round, so a burst of load on a
shared machine hits all variants alike and is then dropped. Results are printed, the dense and
gradsae scores are checked against each other, and ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

HOOK_LAYER = 2


def build(args):
    import torch
    from sae_lens import HookedSAETransformer, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformer_lens import HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=args.layers, d_model=args.d_model, n_ctx=args.T, d_head=64, n_heads=args.d_model // 64,
        d_mlp=4 * args.d_model, d_vocab=args.vocab, act_fn="gelu_new", normalization_type="LN",
        device=args.device, default_prepend_bos=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedSAETransformer(cfg).eval()
        sae = TopKSAE(TopKSAEConfig(
            d_in=args.d_model, d_sae=args.d_sae, k=args.k, device=args.device,
            metadata=SAEMetadata(hook_name=f"blocks.{HOOK_LAYER}.hook_resid_post")))
    with torch.no_grad():
        sae.W_enc.normal_(0, args.d_model ** -0.5)
        sae.W_dec.normal_(0, args.d_model ** -0.5)
        sae.b_enc.normal_(0, 0.1)
    for p in list(model.parameters()) + list(sae.parameters()):
        p.requires_grad_(False)
    tokens = torch.randint(0, args.vocab, (args.B, args.T), device=args.device)
    return model, sae, tokens


def dense_scores(model, sae, tokens):
    """The dense recipe with the libraries' own objects."""
    kept = {}

    def keep(acts, hook):
        acts = acts.detach().requires_grad_(True)
        kept["z"] = acts
        return acts

    model.add_sae(sae)
    try:
        logits = model.run_with_hooks(tokens, fwd_hooks=[(sae.cfg.metadata.hook_name + ".hook_sae_acts_post", keep)])
        y = logits[:, -1].softmax(-1).max(-1).values
        y.sum().backward()
    finally:
        model.reset_saes()
    z = kept["z"]
    return (z * z.grad).relu().mean(dim=1)


def model_only(model, sae, tokens):
    """The floor both variants share: the same forward and backward down to the hook, no SAE."""
    kept = {}

    def keep(acts, hook):
        acts = acts.detach().requires_grad_(True)
        kept["h"] = acts
        return acts

    logits = model.run_with_hooks(tokens, fwd_hooks=[(sae.cfg.metadata.hook_name, keep)])
    logits[:, -1].softmax(-1).max(-1).values.sum().backward()
    return kept["h"].grad[:, 0, :1]


def gradsae_scores(model, sae, tokens, backend="auto"):
    import torch

    import gradsae

    res = gradsae.GradSAE(model, sae, backend=backend).score(tokens, objective="predicted_prob")
    return torch.stack([r.scores for r in res])


def _child(args) -> dict:
    import time

    import torch

    from gradsae.benchmark import measure

    model, sae, tokens = build(args)
    fn = {"dense": dense_scores, "gradsae": gradsae_scores, "model": model_only}[args.variant]
    # warm up on 1 x 4 tokens: lazy imports and backend registration, no large allocation
    fn(model, sae, tokens[:1, :4])
    cpu0 = time.process_time()
    peak, times, scores = measure(lambda: fn(model, sae, tokens), args.repeat, args.device.startswith("cuda"))
    cpu = (time.process_time() - cpu0) / (args.repeat + 1)
    torch.save(scores.detach().cpu(), args.scores_out)
    return {"variant": args.variant, "time_s": statistics.median(times), "times_s": times, "cpu_s": cpu,
            "peak_extra_bytes": peak}


VARIANTS = ("dense", "gradsae", "model")


def run_size(args, d_sae: int) -> dict | None:
    """All variants at one SAE width, in interleaved rounds; the fastest round of each."""
    import argparse as _argparse
    import tempfile

    import torch

    from gradsae.benchmark import run_child

    sub = _argparse.Namespace(**{**vars(args), "d_sae": d_sae})
    best: dict[str, dict] = {}
    rounds: list[dict] = []
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
            this = {}
            for variant in order:
                out = str(Path(tmp) / f"{variant}.pt")
                row = run_child([sys.executable, __file__], variant, sub,
                                ("d_model", "layers", "vocab", "d_sae", "k", "B", "T", "device", "repeat"),
                                extra=["--scores-out", out])
                if row is None:
                    return None
                this[variant] = row
                scores[variant] = torch.load(out)
                if variant not in best or row["time_s"] < best[variant]["time_s"]:
                    best[variant] = row
            rounds.append(this)
    err = float((scores["dense"] - scores["gradsae"]).abs().max() / scores["dense"].abs().max().clamp(min=1e-30))
    return {"d_sae": d_sae, "best": best, "rounds": rounds, "max_score_rel_diff": err}


def report(args, res: dict) -> dict:
    """Print one width's table; return its summary."""
    b = res["best"]
    tokens = args.B * args.T
    print(f"\nd_sae={res['d_sae']} (k={args.k}), {args.B} x {args.T} tokens, float32, fastest of {args.rounds} rounds")
    print(f"{'variant':10s} {'median s':>10s} {'cpu s':>8s} {'tokens/s':>10s} {'peak extra MiB':>15s}")
    for name in VARIANTS:
        r = b[name]
        print(f"{name:10s} {r['time_s']:10.3f} {r['cpu_s']:8.3f} {tokens / r['time_s']:10.0f} "
              f"{r['peak_extra_bytes'] / 2**20:15.1f}")
    m = b["model"]
    share = {n: {"time_s": b[n]["time_s"] - m["time_s"], "cpu_s": b[n]["cpu_s"] - m["cpu_s"],
                 "peak_extra_bytes": b[n]["peak_extra_bytes"] - m["peak_extra_bytes"]} for n in ("dense", "gradsae")}
    d, g = share["dense"], share["gradsae"]
    print(f"the SAE's share (minus `model`): dense {d['time_s']:.3f} s, {d['peak_extra_bytes'] / 2**20:.0f} MiB; "
          f"gradsae {g['time_s']:.3f} s, {g['peak_extra_bytes'] / 2**20:.0f} MiB "
          + (f"({d['time_s'] / g['time_s']:.1f}x less time); " if d["time_s"] > 0 and g["time_s"] > 0 else "; ")
          + f"max score difference {res['max_score_rel_diff']:.1e} of the largest score")
    return {**res, "sae_share": share}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", dest="d_model", type=int, default=512, help="model width (default 512)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary size (default 2048)")
    p.add_argument("--d-sae", dest="d_sae", type=int, nargs="+", default=[32768, 131072],
                   help="SAE widths, one table each (default 32768 131072)")
    p.add_argument("--k", type=int, default=64, help="latents kept per token (default 64)")
    p.add_argument("--B", type=int, default=4, help="sequences per batch (default 4)")
    p.add_argument("--T", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per variant and round (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scores-out", dest="scores_out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.d_sae = args.d_sae[0]
        print(json.dumps(_child(args)))
        return 0

    import os
    import platform

    from gradsae.benchmark import device_name

    print(f"GradSAE on {device_name(args.device)}: HookedSAETransformer d_model={args.d_model} layers={args.layers} "
          f"vocab={args.vocab}; SAELens TopKSAE at blocks.{HOOK_LAYER}.hook_resid_post")
    results = []
    for d_sae in args.d_sae:
        res = run_size(args, d_sae)
        if res is None:
            return 1
        results.append(report(args, res))
    if args.json:
        import torch

        payload = {"device": device_name(args.device), "machine": platform.machine(), "cpus": os.cpu_count(),
                   "load_avg_at_end": os.getloadavg(), "torch": torch.__version__,
                   "config": {k: v for k, v in vars(args).items() if k not in ("child", "variant", "scores_out", "json")},
                   "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
