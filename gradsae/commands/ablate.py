"""Generate with SAE latents zeroed (the paper's perturbation) and compare with the spliced
model's own answer.

    gradsae ablate --model M --sae S --prompt "..." --latents 12,40
    gradsae ablate ... --top 50% --trigger "["     # mask the prompt's GradSAE Top-K
"""

from __future__ import annotations

from ._model import add_model_arguments, build_scorer, check_latents, emit, parse_k, parse_latents, read_prompt

HELP = "generate with latents zeroed (perturbation)"


def add_arguments(p) -> None:
    add_model_arguments(p)
    s = p.add_argument_group("latents")
    w = s.add_mutually_exclusive_group(required=True)
    w.add_argument("--latents", help="comma-separated latent ids to zero")
    w.add_argument("--top", help="zero the prompt's GradSAE Top-K (int or percentage)")
    w.add_argument("--bottom", help="zero the prompt's GradSAE Bottom-K (int or percentage)")
    s.add_argument("--trigger", default=None, help="select at the first generated token containing this text")
    s.add_argument("--positions", choices=("all", "last"), default="all",
                   help="zero the latents at every position (default) or at the last one only")
    s.add_argument("--recipe", choices=("default", "released"), default="default",
                   help="released: select as the authors' released code does (the last trigger step; Top-K an "
                        "argsort over all latents, padded with zero-score latents; the SAE's dtype after the "
                        "splice)")


def run(args) -> int:
    prompt = read_prompt(args)
    latents = parse_latents(args.latents)
    kk = parse_k(args.top or args.bottom, "--top" if args.top else "--bottom") if (args.top or args.bottom) else None
    from ..recipes import get_recipe, splice_dtype

    rec = get_recipe(args.recipe)
    scorer = build_scorer(args)
    check_latents(latents, scorer.sae.d_sae, "--latents")
    with splice_dtype(scorer, rec):
        if kk is not None:
            from ..recipes import select as pick
            from .select import select

            args.objective, args.reduce, args.sign = "predicted_prob", "mean", "relu"
            res, _, _ = select(scorer, prompt, args)
            latents = pick(res, kk, "top" if args.top else "bottom", rec.selection, scorer.device)
        base = scorer.generate(prompt, max_new_tokens=args.max_new_tokens)
        with scorer.intervene(zero=latents, positions=args.positions):
            out = scorer.generate(prompt, max_new_tokens=args.max_new_tokens)
    emit(args, {"latents": latents, "spliced": base.text, "ablated": out.text},
         f"zeroed latents: {latents}\nspliced: {base.text}\nablated: {out.text}")
    return 0
