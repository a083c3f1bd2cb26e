"""Top-K and Bottom-K SAE latents of one prompt by GradSAE.

    gradsae select --model ./gemma-2-2b-it --sae ./sae --prompt "..." --k 50%
    gradsae select ... --trigger "["        # the paper: score where generation emits '['

Without --trigger the objective is read at the prompt's last token (default predicted_prob:
the probability of the model's own (argmax) next token, the paper's Y; the token is printed).
With --trigger, Y is the probability of the trigger token at the step the model predicts it.
A positive score means the latent raises Y.
"""

from __future__ import annotations

from ._model import add_model_arguments, add_objective_arguments, build_scorer, emit, objective_kwargs, parse_k
from ._model import read_prompt

HELP = "top/bottom latents of a prompt by GradSAE"


def add_arguments(p) -> None:
    add_model_arguments(p)
    s = p.add_argument_group("selection")
    s.add_argument("--k", default="50%", help="how many: an int, or a percentage of the latents active "
                                             "at the last position (default 50%%, the paper's)")
    s.add_argument("--trigger", default=None,
                   help="score at the first generated token containing this text (the paper: '['); "
                        "Y is then the probability of that token")
    add_objective_arguments(s, default="predicted_prob")
    s.add_argument("--reduce", choices=("mean", "sum", "last"), default="mean",
                   help="how a latent's per-token influences make its score: mean over the prompt's tokens "
                        "(default, the paper's), sum, or the last token's")
    s.add_argument("--sign", choices=("relu", "signed", "abs"), default="relu",
                   help="relu: positive influence only (default, the paper's), signed, or abs")
    s.add_argument("--baseline", action="store_true", help="rank by mean activation instead (baseline)")
    s.add_argument("--method", choices=("grad", "ig", "exact"), default="grad",
                   help="grad: the first-order score (default, the paper); ig: integrated gradients from zero "
                        "(--steps passes); exact: zero-ablate each of the --budget latents ranked highest by the "
                        "first-order score (--reduce, --sign) and measure the change of Y (the others score 0)")
    s.add_argument("--steps", type=int, default=16, help="--method ig: steps of the path (default 16)")
    s.add_argument("--budget", type=int, default=64, help="--method exact: latents ablated (default 64)")
    s.add_argument("--recipe", choices=("default", "released"), default="default",
                   help="released: select as the authors' released code does (the last trigger step; Top-K an "
                        "argsort over all latents, padded with zero-score latents; the SAE's dtype after the "
                        "splice)")


def select(scorer, prompt: str, args):
    """(PromptScores, trigger step or None, the token ids scored ``[T]``) for the CLI
    arguments."""
    import torch

    if args.trigger:
        from ..recipes import get_recipe

        g = scorer.score_at_trigger(prompt, trigger=args.trigger, max_new_tokens=args.max_new_tokens,
                                    reduce=args.reduce, sign=args.sign,
                                    trigger_at=get_recipe(getattr(args, "recipe", "default")).trigger_at)
        return g.scores, g.trigger_step, torch.cat([g.prompt_ids, g.token_ids[:g.trigger_step]])
    kw = objective_kwargs(args, scorer.tokenizer) if hasattr(args, "target") else {}
    method = getattr(args, "method", "grad")  # ablate and steer select by the first-order score
    mkw = {}
    if method == "ig":
        mkw = {"method": "ig", "steps": args.steps}
    elif method == "exact":
        mkw = {"method": "exact", "latents": args.budget, "budget": args.budget}
    res = scorer.score(prompt, objective=args.objective, reduce=args.reduce, sign=args.sign, **mkw, **kw)
    ids, mask = scorer.encode_batch(prompt)
    return res, None, ids[0][mask[0]].cpu()


def describe_y(scorer, ids, args, step) -> tuple[str, dict]:
    """What Y is for the scored ids, in words (the token whose probability it is, decoded),
    and the same as JSON fields."""
    import torch

    tok = scorer.tokenizer
    obj = "predicted_prob" if args.trigger else args.objective
    if obj in ("predicted_prob", "logprob", "logit_diff"):
        pos = args.position if not args.trigger else -1
        if obj == "predicted_prob":
            ids = ids.to(scorer.device).unsqueeze(0)
            with torch.no_grad(), scorer.spliced():
                logits = scorer.forward(ids, torch.ones_like(ids, dtype=torch.bool)).logits[0]
            t = int(logits[pos].argmax())
            word = tok.decode([t])
            where = f"generation step {step}" if args.trigger else f"position {pos}"
            return (f"the probability of the model's next token {word!r} (id {t}) at {where}",
                    {"y": "predicted_prob", "token": word, "token_id": t})
        kw = objective_kwargs(args, tok)
        if obj == "logprob":
            word = tok.decode([kw["target"]])
            return f"the log-probability of {word!r} at position {pos}", {"y": "logprob", "token": word}
        a, b = tok.decode([kw["a"]]), tok.decode([kw["b"]])
        return f"logit({a!r}) - logit({b!r}) at position {pos}", {"y": "logit_diff", "token": a, "token_b": b}
    what = {"loglik": "the mean log-probability of each next token of the prompt",
            "loss": "the mean next-token loss over the prompt"}[obj]
    return what, {"y": obj}


def run(args) -> int:
    from ..errors import InputError
    from ..recipes import get_recipe, splice_dtype
    from ..recipes import select as pick

    rec = get_recipe(args.recipe)
    k = parse_k(args.k)
    if args.trigger and (args.objective != "predicted_prob" or args.target or args.target_b or args.position != -1):
        raise InputError("--trigger scores predicted_prob at the trigger step; drop --objective, --target and "
                         "--position, or drop --trigger")
    if args.method != "grad" and (args.trigger or args.baseline):
        raise InputError(f"--method {args.method} scores the prompt itself; drop --trigger and --baseline, or use "
                         "--method grad")
    for name in ("steps", "budget"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    objective_kwargs(args, None)  # option combinations, before anything loads
    prompt = read_prompt(args)
    scorer = build_scorer(args)
    with splice_dtype(scorer, rec):
        res, step, ids = select(scorer, prompt, args)
        if args.baseline:
            res = res.activation_baseline()
        what, y_info = describe_y(scorer, ids, args, step)
    top, bottom = (pick(res, k, w, rec.selection, scorer.device) for w in ("top", "bottom"))
    what_score = {"grad": "GradSAE score", "ig": f"integrated gradients ({args.steps} steps)",
                  "exact": f"exact ablation (the top {args.budget} latents by first-order score)"}[args.method]
    ranked_by = ("mean activation (baseline)" if args.baseline
                 else f"{what_score} ({args.reduce} of {args.sign} influence)")
    payload = {
        "k": res.resolve_k(k), "active_last": res.active_last.tolist(), "trigger_step": step,
        "objective": res.objective, "objective_meaning": what, **{f"objective_{k_}": v for k_, v in y_info.items()},
        "ranked_by": ranked_by,
        "top": [{"latent": int(j), "score": float(res.scores[j])} for j in top],
        "bottom": [{"latent": int(j), "score": float(res.scores[j])} for j in bottom],
    }
    lines = [f"Y = {res.objective:.6g}: {what}",
             f"{len(res.active_last)} latents active at the last position"
             + (f"; scored at generation step {step}" if step is not None else "")
             + f"; ranked by {ranked_by}; a positive score raises Y"]
    for name, sel in (("top", top), ("bottom", bottom)):
        lines.append(f"{name}-{len(sel)}:")
        lines.append(f"  {'latent':>8}  {'score':>12}")
        lines += [f"  {int(j):>8d}  {float(res.scores[j]):>12.6g}" for j in sel]
    emit(args, payload, "\n".join(lines))
    return 0
