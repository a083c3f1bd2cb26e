"""The dense-gradient GradSAE loop written with SAELens + TransformerLens objects, against
gradsae on the same objects (the numbers quoted in docs/interop.md).

    python bench/interop.py                      # d_model=512, 4 layers, d_sae=32768, k=64, 4 x 256 tokens
    python bench/interop.py --d-sae 16384 --T 128 --repeat 2

Both variants take a random-weight ``HookedSAETransformer`` and a SAELens ``TopKSAE`` at
``blocks.2.hook_resid_post`` and compute the paper's scores for a batch: Y = probability of
the argmax next token at the last position, score = mean over positions of relu(z * dY/dz).

- ``dense``: ``model.add_sae(sae)`` and a hook on ``hook_sae_acts_post`` that makes the latents
  a leaf with ``requires_grad`` and keeps it; one forward, one backward, then
  ``relu(z * z.grad).mean(1)`` (the ``[tokens, d_sae]`` latents and their gradient exist densely).
- ``gradsae``: ``gradsae.GradSAE(model, sae).score(tokens)``.
- ``model``: the floor both share: the same forward and backward down to the hook, no SAE.

Each variant runs in a fresh subprocess and is first warmed up on 1 x 4 tokens (lazy imports,
no large allocation); peak memory is the peak resident set during its first full-size run
above the resident set just before it (CPU, peak counter reset through /proc/self/clear_refs),
or torch.cuda.max_memory_allocated above the allocation before it (GPU). Time is the median of ``--repeat`` runs after that first one. Results are printed and the
dense and gradsae scores are checked against each other.
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
    import torch

    from gradsae.benchmark import measure

    model, sae, tokens = build(args)
    fn = {"dense": dense_scores, "gradsae": gradsae_scores, "model": model_only}[args.variant]
    # warm up on 1 x 4 tokens: lazy imports and backend registration, no large allocation
    fn(model, sae, tokens[:1, :4])
    peak, times, scores = measure(lambda: fn(model, sae, tokens), args.repeat, args.device.startswith("cuda"))
    torch.save(scores.detach().cpu(), args.scores_out)
    return {"variant": args.variant, "time_s": statistics.median(times), "times_s": times, "peak_extra_bytes": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", dest="d_model", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--d-sae", dest="d_sae", type=int, default=32768)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scores-out", dest="scores_out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return 0

    import tempfile

    import torch

    from gradsae.benchmark import device_name, run_child

    rows, scores = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("dense", "gradsae", "model"):
            out = str(Path(tmp) / f"{variant}.pt")
            row = run_child([sys.executable, __file__], variant, args,
                            ("d_model", "layers", "vocab", "d_sae", "k", "B", "T", "device", "repeat"),
                            extra=["--scores-out", out])
            if row is None:
                return 1
            rows[variant] = row
            scores[variant] = torch.load(out)
    d, g = rows["dense"], rows["gradsae"]
    err = float((scores["dense"] - scores["gradsae"]).abs().max() / scores["dense"].abs().max().clamp(min=1e-30))
    tokens = args.B * args.T
    print(f"GradSAE on {device_name(args.device)}: HookedSAETransformer d_model={args.d_model} layers={args.layers} "
          f"vocab={args.vocab}; SAELens TopKSAE d_sae={args.d_sae} k={args.k}; {args.B} x {args.T} tokens, float32")
    print(f"{'variant':10s} {'median s':>10s} {'tokens/s':>10s} {'peak extra MiB':>15s}")
    for name, r in (("dense", d), ("gradsae", g), ("model", rows["model"])):
        print(f"{name:10s} {r['time_s']:10.3f} {tokens / r['time_s']:10.0f} {r['peak_extra_bytes'] / 2**20:15.1f}")
    print(f"gradsae: {d['time_s'] / g['time_s']:.2f}x faster, {g['peak_extra_bytes'] / max(1, d['peak_extra_bytes']):.3f} "
          f"of the dense peak memory; max score difference {err:.1e} of the largest score")
    return 0


if __name__ == "__main__":
    sys.exit(main())
