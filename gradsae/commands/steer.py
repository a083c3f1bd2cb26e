"""Generate with SAE latents edited: zero, set to values, add decoder directions, or the
paper's local steering from a donor prompt.

    gradsae steer --model M --sae S --prompt "..." --set 12=4.0 --add 7=2.5 --zero 3,9
    gradsae steer ... --donor "another prompt" --k 10 --trigger "["
"""

from __future__ import annotations

from ._model import add_model_arguments, build_scorer, check_latents, emit, parse_k, parse_latents, parse_pairs
from ._model import read_prompt

HELP = "generate with latents zeroed / set / added, or steered from a donor prompt"


def add_arguments(p) -> None:
    add_model_arguments(p)
    s = p.add_argument_group("edits")
    s.add_argument("--zero", help="comma-separated latent ids to zero")
    s.add_argument("--set", action="append", help="LATENT=VALUE (repeatable, or comma-separated)")
    s.add_argument("--add", action="append", help="LATENT=ALPHA: add ALPHA * W_dec[LATENT] (repeatable)")
    s.add_argument("--donor", help="donor prompt: zero this prompt's Top-K and inject the donor's Top-K")
    s.add_argument("--k", default="10", help="K for --donor (int or percentage, default 10)")
    s.add_argument("--donor-values", choices=("last", "mean", "score"), default=None,
                   help="donor latent values: activation at its last position (default recipe), mean "
                        "activation, or its GradSAE score (released recipe, as the released code stores)")
    s.add_argument("--trigger", default=None, help="select at the first generated token containing this text")
    s.add_argument("--positions", choices=("all", "last"), default=None,
                   help="where edits apply (default: all; last with --donor, as the released code)")
    s.add_argument("--recipe", choices=("default", "released"), default="default",
                   help="released: select as the authors' released code does (the last trigger step; Top-K an "
                        "argsort over all latents, padded with zero-score latents; the SAE's dtype after the "
                        "splice; with --donor its scores clamped to [0, 50])")


def run(args) -> int:
    from ..errors import InputError

    prompt = read_prompt(args)
    zero = parse_latents(args.zero)
    setv = parse_pairs(args.set, "--set")
    addv = parse_pairs(args.add, "--add")
    if not (zero or setv or addv or args.donor):
        raise InputError("nothing to do: pass --zero, --set, --add or --donor")
    from ..recipes import get_recipe, splice_dtype

    rec = get_recipe(args.recipe)
    k = parse_k(args.k) if args.donor else None
    scorer = build_scorer(args)
    with splice_dtype(scorer, rec):
        return _run(scorer, args, rec, prompt, zero, setv, addv, k)


def _run(scorer, args, rec, prompt, zero, setv, addv, k) -> int:
    for opt, ids in (("--zero", zero), ("--set", list(setv)), ("--add", list(addv))):
        check_latents(ids, scorer.sae.d_sae, opt)
    positions = args.positions or ("last" if args.donor else "all")
    if args.donor:
        from ..model.interventions import donor_values
        from ..recipes import clamp_values
        from ..recipes import select as pick
        from .select import select

        args.objective, args.reduce, args.sign = "predicted_prob", "mean", "relu"
        own, _, _ = select(scorer, prompt, args)
        don, _, _ = select(scorer, args.donor, args)
        zero += pick(own, k, "top", rec.selection, scorer.device)
        give = pick(don, k, "top", rec.selection, scorer.device)
        setv.update(clamp_values(donor_values(don, give, args.donor_values or rec.donor_values), rec.clamp))
    base = scorer.generate(prompt, max_new_tokens=args.max_new_tokens)
    with scorer.intervene(zero=zero, set=setv, add=addv, positions=positions):
        out = scorer.generate(prompt, max_new_tokens=args.max_new_tokens)
    payload = {"zero": zero, "set": setv, "add": addv, "positions": positions, "spliced": base.text,
               "steered": out.text}
    emit(args, payload, f"zero: {zero}\nset: {setv}\nadd: {addv}\npositions: {positions}\n"
                        f"spliced: {base.text}\nsteered: {out.text}")
    return 0
