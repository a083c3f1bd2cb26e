"""Top-K and Bottom-K SAE latents of one prompt by GradSAE.

    gradsae select --model ./gemma-2-2b-it --sae ./sae --prompt "..." --k 50%
    gradsae select ... --trigger "["        # the paper: score where generation emits '['

Without --trigger the objective is read at the prompt's last token (predicted_prob: the
probability of the model's argmax next token, the paper's Y).
"""

from __future__ import annotations

from ._model import add_model_arguments, build_scorer, emit, parse_k, read_prompt

HELP = "top/bottom latents of a prompt by GradSAE"


def add_arguments(p) -> None:
    add_model_arguments(p)
    s = p.add_argument_group("selection")
    s.add_argument("--k", default="50%", help="how many: an int, or a percentage of the latents active "
                                             "at the last position (default 50%%, the paper's)")
    s.add_argument("--trigger", default=None,
                   help="score at the first generated token containing this text (the paper: '[')")
    s.add_argument("--objective", default="predicted_prob",
                   help="predicted_prob (default), loss, or logprob/logit_diff via the API")
    s.add_argument("--reduce", choices=("mean", "sum", "last"), default="mean")
    s.add_argument("--sign", choices=("relu", "signed", "abs"), default="relu")
    s.add_argument("--baseline", action="store_true", help="rank by mean activation instead (baseline)")


def select(scorer, prompt: str, args):
    """(PromptScores, trigger step or None, prefix text) for the CLI arguments."""
    if args.trigger:
        g = scorer.score_at_trigger(prompt, trigger=args.trigger, max_new_tokens=args.max_new_tokens,
                                    reduce=args.reduce, sign=args.sign)
        return g.scores, g.trigger_step, g.text
    res = scorer.score(prompt, objective=args.objective, reduce=args.reduce, sign=args.sign)
    return res, None, ""


def run(args) -> int:
    k = parse_k(args.k)
    prompt = read_prompt(args)
    scorer = build_scorer(args)
    res, step, _ = select(scorer, prompt, args)
    if args.baseline:
        res = res.activation_baseline()
    top, bottom = res.top(k, strict=False), res.bottom(k, strict=False)
    payload = {
        "k": res.resolve_k(k), "active_last": res.active_last.tolist(), "trigger_step": step,
        "objective": res.objective,
        "top": [{"latent": int(j), "score": float(res.scores[j])} for j in top],
        "bottom": [{"latent": int(j), "score": float(res.scores[j])} for j in bottom],
    }
    lines = [f"objective Y = {res.objective:.6g}; {len(res.active_last)} latents active at the last position"
             + (f"; scored at generation step {step}" if step is not None else "")]
    for name, sel in (("top", top), ("bottom", bottom)):
        lines.append(f"{name}-{len(sel)}:")
        lines += [f"  {int(j):>8d}  {float(res.scores[j]):.6g}" for j in sel]
    emit(args, payload, "\n".join(lines))
    return 0
