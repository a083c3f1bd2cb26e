"""The paper's Table 1 on a SQuAD v1.1-format JSON file: perturbation and steering studies,
GradSAE vs the activation baseline.

    gradsae experiment --model ./gemma-2-9b-it --sae ./layer_9 --data dev-v1.1.json \\
                       --limit 1000 --out results.json
    gradsae experiment ... --recipe released     # the authors' released code, knob by knob

``--recipe`` sets every knob where gradsae's default and the released code differ (see
:mod:`gradsae.recipes`); ``--prompt-style``, ``--template-file`` and ``--donor-values``
override the recipe's prompt and donor values when given.
"""

from __future__ import annotations

from ._model import add_model_arguments, build_scorer

HELP = "perturbation and steering studies on SQuAD (the paper's Table 1)"


def add_arguments(p) -> None:
    add_model_arguments(p, prompt=False)
    e = p.add_argument_group("experiment")
    e.add_argument("--data", required=True, help="SQuAD v1.1-format JSON file")
    e.add_argument("--limit", type=int, default=None, help="first N questions only")
    e.add_argument("--sample", type=int, default=None,
                   help="N questions drawn at random (the released code runs on all of them)")
    e.add_argument("--seed", type=int, default=42, help="seed of --sample (default 42)")
    e.add_argument("--ks", default="1,10,20,30,50%", help="K values (default 1,10,20,30,50%%)")
    e.add_argument("--methods", default="gradsae,activation", help="gradsae,activation (default both)")
    e.add_argument("--studies", default="perturbation,steering", help="perturbation,steering (default both)")
    e.add_argument("--max-new-tokens", type=int, default=50, help="greedy generation length (default 50)")
    e.add_argument("--recipe", choices=("default", "released"), default="default",
                   help="default: gradsae's choices; released: the authors' released code (last '[' step, "
                        "argsort Top-K padded with zero-score latents, kept at F1 >= 0.9, same-paragraph donor "
                        "with seed 42 and scores clamped to [0, 50], SAE-dtype splice output, Gemma prompt)")
    e.add_argument("--trigger", default="[",
                   help="score at the predicted token containing this (default '['; the recipe says which step)")
    e.add_argument("--template-file", default=None,
                   help="prompt template with {context} and {question} (default: the paper's)")
    e.add_argument("--prompt-style", choices=("plain", "gemma-released", "chat"), default=None,
                   help="plain: the paper's prompt as is (default recipe); gemma-released: opened with "
                        "'<start_of_turn>user' as in the released code (released recipe); chat: wrapped by the "
                        "tokenizer's chat template")
    e.add_argument("--steer-positions", choices=("last", "all"), default="last",
                   help="steering edits at the last position (released code, default) or all (paper text)")
    e.add_argument("--donor-values", choices=("last", "mean", "score"), default=None,
                   help="donor latent values for steering: activation at its last position (default recipe), "
                        "mean activation, or its GradSAE score (released recipe, clamped to [0, 50] there)")
    e.add_argument("--out", default=None, help="write rows and per-example records as JSON here")
    e.add_argument("--no-progress", action="store_true", help="no progress bars (model loading included)")


def chat_template(tok, template: str) -> str:
    """``template`` as the user turn of the tokenizer's chat template, ready for the answer."""
    from ..errors import InputError

    if not getattr(tok, "chat_template", None):
        raise InputError("--prompt-style chat: this tokenizer has no chat template")
    marker = "\x00Q\x00"
    body = template.replace("{context}", marker + "C").replace("{question}", marker + "Q")
    text = tok.apply_chat_template([{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True)
    bos = getattr(tok, "bos_token", None)
    if bos and text.startswith(bos):  # the tokenizer adds it again when encoding
        text = text[len(bos):]
    text = text.replace("{", "{{").replace("}", "}}")
    return text.replace(marker + "C", "{context}").replace(marker + "Q", "{question}")


def run(args) -> int:
    import json
    import os
    import tempfile

    from .. import experiments as ex
    from ..errors import InputError
    from ..recipes import get_recipe
    from ._model import check_writable_file

    recipe = get_recipe(args.recipe)
    style = args.prompt_style or recipe.prompt_style

    # bad data, options and output path fail before the model loads
    for name in ("limit", "sample"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise InputError(f"--{name} must be >= 1, got {v}")
    examples = ex.load_squad(args.data, limit=args.limit, sample=args.sample, seed=args.seed)
    try:
        ks = ex.parse_ks(args.ks)
    except InputError as e:
        raise InputError(f"--ks: {e}") from None
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    studies = tuple(s.strip() for s in args.studies.split(",") if s.strip())
    for opt, got, allowed in (("--methods", methods, ex.METHODS), ("--studies", studies, ex.STUDIES)):
        bad = [x for x in got if x not in allowed] or ([] if got else ["(none)"])
        if bad:
            raise InputError(f"{opt}: unknown {', '.join(bad)}; expected a comma-separated list of "
                             f"{', '.join(allowed)}")
    if args.out:
        check_writable_file(args.out, "--out")
    template = ex.PROMPT
    if args.template_file:
        try:
            with open(args.template_file, encoding="utf-8") as f:
                template = f.read()
        except OSError as e:
            raise InputError(f"--template-file {args.template_file}: {e.strerror or e}") from None
        if "{context}" not in template or "{question}" not in template:
            raise InputError(f"--template-file {args.template_file}: the template must contain {{context}} and "
                             "{question}")
    elif style == "gemma-released":
        template = ex.PROMPT_GEMMA_RELEASED
    scorer = build_scorer(args, quiet=args.no_progress)
    if style == "chat":
        template = chat_template(scorer.tokenizer, template)
    res = ex.run_experiments(
        scorer, examples, ks=ks, methods=methods, studies=studies,
        max_new_tokens=args.max_new_tokens, trigger=args.trigger, template=template,
        steer_positions=args.steer_positions, donor_how=args.donor_values, progress=not args.no_progress,
        recipe=recipe,
    )
    print(res.table())
    if args.out:
        d = os.path.dirname(os.path.abspath(args.out))
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(res.to_json(), f, indent=1)
            os.replace(tmp, args.out)
        except BaseException:
            os.unlink(tmp)
            raise
    return 0
