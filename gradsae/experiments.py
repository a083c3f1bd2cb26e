"""The paper's Table 1 studies on SQuAD: perturbation and local steering, GradSAE vs the
activation baseline.

    examples = load_squad("dev-v1.1.json", limit=200)
    res = run_experiments(scorer, examples)          # scorer: a spliced GradSAE with tokenizer
    print(res.table())

Protocol (Shu et al.; gradsae's default recipe, :data:`gradsae.recipes.DEFAULT`):

1. Each question is asked with the paper's prompt, which requests ``Result = [[ label ]]``.
   Greedy generation runs on the spliced model; at the first step whose predicted token
   contains ``[`` the latents are scored (``mean over positions of relu(act * grad)``), and
   generation continues to produce the answer. Only examples the spliced model answers
   correctly (SQuAD exact match) and that reached the trigger are kept.
2. **Perturbation**: mask (zero, at every position and step) the Top-K or the Bottom-K latents
   and regenerate; report EM / F1 against the gold answers. Influential latents should hurt
   more when masked.
3. **Steering**: zero the example's own Top-K and set a donor example's Top-K latents to the
   donor's values (its activations at its trigger step's last position by default; donor
   latents not active there are left out, and listed in the record's ``donor_skipped``), at
   the last position (released code) or at all positions (the paper's text). Report EM / F1
   against the example's own answers and against the donor's answers (steering success).
4. Selections by GradSAE and by the activation baseline (mean activation over positions),
   for K in {1, 10, 20, 30, 50%}: 50% is half the latents active at the last position.

``recipe="released"`` (:data:`gradsae.recipes.RELEASED`) runs the authors' released code's
choices instead, knob by knob: the last ``[`` step is scored, Top-K is an argsort over all
latents (padded with zero-score latents), examples are kept at F1 >= 0.9 with the released
answer extraction, the donor is another question on the same paragraph (seed 42) whose Top-K
get its scores clamped to [0, 50], the splice returns the SAE's dtype, and the prompt opens a
Gemma user turn. See :mod:`gradsae.recipes`; explicit arguments override the recipe's knobs.
"""

from __future__ import annotations

import json
import random
import re
import string
import warnings
from collections import Counter
from dataclasses import dataclass, field

from .errors import GradSAEWarning, InputError
from .model.interventions import donor_values
from .recipes import Recipe, clamp_values, get_recipe, select, splice_dtype

PROMPT = (
    "Answer the following question based on the context.\nContext:\n{context}\n\nQuestion:\n"
    "{question}\n\nPlease organize your final answer in this format: \"Result = [[ label ]]\"\n"
)
# The released code's prompt for Gemma-2 instruction models: an open user turn.
PROMPT_GEMMA_RELEASED = "<start_of_turn>user\n" + PROMPT
DEFAULT_KS = (1, 10, 20, 30, 0.5)
METHODS = ("gradsae", "activation")
STUDIES = ("perturbation", "steering")


# ---------------------------------------------------------------------------------- data
def load_squad(path, limit: int | None = None, sample: int | None = None, seed: int = 42) -> list[dict]:
    """Questions of a SQuAD v1.1-format JSON file (``{"data": [{"paragraphs": [{"context",
    "qas": [{"id", "question", "answers": [{"text"}]}]}]}]}``):
    ``[{"id", "context", "question", "answers": [str]}]``, the first ``limit`` in file order, or
    ``sample`` drawn at random with ``seed``. (The released code runs on the whole SQuAD
    v1.1 validation split in file order: its line sampling 1000 questions with seed 42 is
    commented out.)"""
    rows = _read_squad(path, None if sample is not None else limit)
    if sample is not None:
        import random

        if sample > len(rows):
            raise InputError(f"{path}: cannot sample {sample} of {len(rows)} questions")
        rows = [rows[i] for i in random.Random(seed).sample(range(len(rows)), sample)]
    return rows


def _read_squad(path, limit):
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise InputError(f"{path}: not a SQuAD file (expected a top-level 'data' list)")
    out = []
    for art in doc["data"]:
        for para in art.get("paragraphs", []):
            ctx = para.get("context")
            for qa in para.get("qas", []):
                answers = [a["text"] for a in qa.get("answers", []) if "text" in a]
                if ctx is None or "question" not in qa or not answers:
                    continue
                out.append({"id": str(qa.get("id", len(out))), "context": ctx, "question": qa["question"],
                            "answers": answers})
                if limit is not None and len(out) >= limit:
                    return out
    if not out:
        raise InputError(f"{path}: no questions with answers found")
    return out


# ---------------------------------------------------------------------------------- metrics
def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, golds) -> float:
    return float(any(normalize_answer(pred) == normalize_answer(g) for g in golds))


def f1(pred: str, golds) -> float:
    def one(p, g):
        pt, gt = normalize_answer(p).split(), normalize_answer(g).split()
        common = sum((Counter(pt) & Counter(gt)).values())
        if common == 0:
            return 0.0
        prec, rec = common / len(pt), common / len(gt)
        return 2 * prec * rec / (prec + rec)

    return max(one(pred, g) for g in golds)


def extract_answer(text: str) -> str:
    """The label of ``Result = [[ label ]]`` (the first bracketed span; brackets and ``=``
    removed), or the whole text when there is none."""
    m = re.search(r"\[\[\s*(.*?)\s*\]\]", text, flags=re.DOTALL)
    m = m or re.search(r"\[\s*(.*?)\s*\]", text, flags=re.DOTALL)
    ans = m.group(1) if m else text
    return ans.replace("[", "").replace("]", "").replace("=", "").strip()


def extract_answer_released(text: str) -> str:
    """The released code's answer extraction: the first ``[ .. ]`` span on one line (for
    ``[[ label ]]`` that is ``[ label``), else the whole text; then ``[``, ``]`` and ``=``
    removed and spaces stripped. Applied to the generation decoded with its special tokens
    (``<end_of_turn>`` removed), so an answer without brackets keeps e.g. ``<eos>``."""
    m = re.search(r"\[\s*(.*?)\s*\]", text)
    ans = m.group(1) if m else text
    return ans.replace("[", "").replace("]", "").replace("=", "").strip()


def generation_answer(scorer, g, recipe="default") -> str:
    """The answer of a :class:`~gradsae.model.Generation` under ``recipe``'s ``answer`` rule:
    ``"clean"`` extracts from the text without special tokens (:func:`extract_answer`);
    ``"released"`` decodes the tokens with their special tokens, removes ``<end_of_turn>`` and
    extracts as the released code does (:func:`extract_answer_released`)."""
    rec = get_recipe(recipe)
    if rec.answer == "clean":
        return extract_answer(g.text or "")
    text = scorer.tokenizer.decode(g.token_ids.tolist(), skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return extract_answer_released(text.replace("<end_of_turn>", ""))


def keeps(answer: str, golds, recipe="default") -> bool:
    """Whether an example answered ``answer`` is kept under ``recipe``: SQuAD exact match
    (``keep="exact"``) or F1 >= ``keep_f1`` (``keep="f1"``, the released code's 0.9)."""
    rec = get_recipe(recipe)
    if rec.keep == "exact":
        return bool(exact_match(answer, golds))
    return f1(answer, golds) >= rec.keep_f1


# ---------------------------------------------------------------------------------- running
@dataclass
class Kept:
    """An example the spliced model answered correctly, with its trigger-step scores."""

    example: dict
    prompt: str
    answer: str
    scores: object  # PromptScores


@dataclass
class ExperimentResult:
    """``rows``: one dict per (study, method, K, selection) with mean ``em`` / ``f1`` (and
    ``donor_em`` / ``donor_f1`` for steering) over the kept examples; ``records``: per example
    and configuration, the latents used and the answer; ``n_total`` / ``n_kept``; ``recipe``:
    the knobs the run used (:meth:`gradsae.recipes.Recipe.describe`)."""

    rows: list = field(default_factory=list)
    records: list = field(default_factory=list)
    n_total: int = 0
    n_kept: int = 0
    recipe: dict = field(default_factory=dict)

    def table(self) -> str:
        """The results as a text table in the layout of the paper's Table 1."""
        lines = [f"examples: {self.n_total} asked, {self.n_kept} answered correctly by the spliced model (kept)"]
        ks = list(dict.fromkeys(r["K"] for r in self.rows))
        get = {(r["study"], r["method"], r["K"], r["selection"]): r for r in self.rows}
        kname = lambda k: f"{int(k * 100)}%" if isinstance(k, float) else str(k)
        for study in STUDIES:
            if not any(r["study"] == study for r in self.rows):
                continue
            lines.append("")
            if study == "perturbation":
                lines.append("Perturbation: mask latents (EM / F1 vs gold; lower = more influential)")
                head = f"{'method':<11}{'K':>5}  {'Top-K EM':>9}{'Top-K F1':>9}  {'Bot-K EM':>9}{'Bot-K F1':>9}"
            else:
                lines.append("Steering: zero own Top-K, inject donor Top-K (EM / F1 vs own and donor answers)")
                head = f"{'method':<11}{'K':>5}  {'own EM':>9}{'own F1':>9}  {'donor EM':>9}{'donor F1':>9}"
            lines += [head, "-" * len(head)]
            for method in METHODS:
                for k in ks:
                    if study == "perturbation":
                        t, b = get.get((study, method, k, "top")), get.get((study, method, k, "bottom"))
                        if t is None:
                            continue
                        lines.append(f"{method:<11}{kname(k):>5}  {t['em']:>9.1f}{t['f1']:>9.1f}  "
                                     f"{b['em']:>9.1f}{b['f1']:>9.1f}")
                    else:
                        s = get.get((study, method, k, "top"))
                        if s is None:
                            continue
                        lines.append(f"{method:<11}{kname(k):>5}  {s['em']:>9.1f}{s['f1']:>9.1f}  "
                                     f"{s['donor_em']:>9.1f}{s['donor_f1']:>9.1f}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"n_total": self.n_total, "n_kept": self.n_kept, "recipe": self.recipe, "rows": self.rows,
                "records": self.records}


def template_for(recipe="default") -> str:
    """The prompt template of ``recipe``'s ``prompt_style``."""
    return PROMPT_GEMMA_RELEASED if get_recipe(recipe).prompt_style == "gemma-released" else PROMPT


def choose_donors(kept, examples, recipe="default", template: str = PROMPT) -> list:
    """The donor of each kept example (a :class:`Kept` or None: not steered), under
    ``recipe``'s ``donor`` rule.

    ``"next"``: kept example i+1 (cyclically; itself when only one is kept). ``"same-context"``
    (the released code): kept examples are keyed by prompt (one per distinct prompt, in order
    of first appearance); going through ``examples`` in order, every example whose prompt
    (``template`` filled in) is kept draws with ``random.Random(donor_seed)`` one of the kept
    prompts that contain its context and differ from its own prompt (no draw when there is
    none; a later draw for the same prompt replaces an earlier one)."""
    rec = get_recipe(recipe)
    if rec.donor == "next":
        return [kept[(i + 1) % len(kept)] for i in range(len(kept))]
    by_prompt: dict = {}
    for k in kept:
        by_prompt[k.prompt] = k
    rng = random.Random(rec.donor_seed)
    chosen: dict = {}
    for ex in examples:
        prompt = template.format(context=ex["context"], question=ex["question"])
        if prompt not in by_prompt:
            continue
        cands = [v for key, v in by_prompt.items() if ex["context"] in key and key != prompt]
        if cands:
            chosen[prompt] = rng.choice(cands)
    return [chosen.get(k.prompt) for k in kept]


def run_experiments(scorer, examples, ks=DEFAULT_KS, methods=METHODS, studies=STUDIES,
                    max_new_tokens: int = 50, trigger: str = "[", template: str | None = None,
                    steer_positions: str = "last", donor_how: str | None = None,
                    progress: bool = True, recipe="default") -> ExperimentResult:
    """Run the perturbation and steering studies (see the module docstring) on ``examples``
    (from :func:`load_squad`) with ``scorer`` (a :class:`gradsae.GradSAE` with a tokenizer).

    ``recipe``: ``"default"``, ``"released"`` (the authors' released code, knob by knob) or a
    :class:`gradsae.recipes.Recipe`; it sets the trigger step, the Top-K rule, the keep rule
    and answer extraction, the donor and its values, the splice's output dtype and, unless
    ``template`` is given, the prompt. ``donor_how`` overrides the recipe's donor values.
    With the default recipe the donor of kept example i is kept example i+1 (cyclically)."""
    from tqdm.auto import tqdm

    rec = get_recipe(recipe)
    for m in methods:
        if m not in METHODS:
            raise InputError(f"unknown method {m!r}; expected {METHODS}")
    for s in studies:
        if s not in STUDIES:
            raise InputError(f"unknown study {s!r}; expected {STUDIES}")
    if scorer.tokenizer is None:
        raise InputError("experiments need a tokenizer: GradSAE(..., tokenizer=tok)")
    if getattr(scorer, "multi", False):
        raise InputError(f"the studies score one SAE; this scorer has {len(scorer.hooks)} "
                         f"({', '.join(scorer.hooks)}): build GradSAE(model, sae, hook=...) per hook")
    template = template_for(rec) if template is None else template
    how = rec.donor_values if donor_how is None else donor_how
    res = ExperimentResult(n_total=len(examples), recipe=rec.describe())

    def ask(prompt):
        return generation_answer(scorer, scorer.generate(prompt, max_new_tokens=max_new_tokens), rec)

    with splice_dtype(scorer, rec):
        kept: list[Kept] = []
        for ex in tqdm(examples, desc="baseline answers", disable=not progress):
            prompt = template.format(context=ex["context"], question=ex["question"])
            g = scorer.generate(prompt, max_new_tokens=max_new_tokens, trigger=trigger,
                                trigger_at=rec.trigger_at)
            ans = generation_answer(scorer, g, rec)
            if g.scores is not None and keeps(ans, ex["answers"], rec):
                kept.append(Kept(ex, prompt, ans, g.scores))
        res.n_kept = len(kept)
        if not kept:
            return res
        donors = choose_donors(kept, examples, rec, template)

        configs = [(st, me, k) for st in studies for me in methods for k in ks]
        acc: dict = {}
        bar = tqdm(total=len(configs) * len(kept), desc="interventions", disable=not progress)
        for item, donor in zip(kept, donors):
            for study, method, k in configs:
                sc = item.scores if method == "gradsae" else item.scores.activation_baseline()
                if study == "perturbation":
                    for sel in ("top", "bottom"):
                        lat = select(sc, k, sel, rec.selection, scorer.device)
                        with scorer.intervene(zero=lat, positions="all"):
                            a = ask(item.prompt)
                        r = {"id": item.example["id"], "study": study, "method": method, "K": k,
                             "selection": sel, "latents": lat, "answer": a,
                             "em": exact_match(a, item.example["answers"]),
                             "f1": f1(a, item.example["answers"])}
                        res.records.append(r)
                        acc.setdefault((study, method, k, sel), []).append(r)
                elif donor is not None:
                    dsc = donor.scores if method == "gradsae" else donor.scores.activation_baseline()
                    own = select(sc, k, "top", rec.selection, scorer.device)
                    give = select(dsc, k, "top", rec.selection, scorer.device)
                    with warnings.catch_warnings():  # the skipped donor latents go into the record
                        warnings.simplefilter("ignore", GradSAEWarning)
                        vals = clamp_values(donor_values(dsc, give, how), rec.clamp)
                    skipped = [j for j in give if j not in vals]
                    with scorer.intervene(zero=own, set=vals, positions=steer_positions):
                        a = ask(item.prompt)
                    r = {"id": item.example["id"], "donor": donor.example["id"], "study": study,
                         "method": method,
                         "K": k, "selection": "top", "latents": own, "donor_latents": vals,
                         "donor_skipped": skipped, "answer": a,
                         "em": exact_match(a, item.example["answers"]), "f1": f1(a, item.example["answers"]),
                         "donor_em": exact_match(a, donor.example["answers"]),
                         "donor_f1": f1(a, donor.example["answers"])}
                    res.records.append(r)
                    acc.setdefault((study, method, k, "top"), []).append(r)
                bar.update(1)
        bar.close()
    for (study, method, k, sel), recs in acc.items():
        row = {"study": study, "method": method, "K": k, "selection": sel, "n": len(recs)}
        for key in ("em", "f1", "donor_em", "donor_f1"):
            if key in recs[0]:
                row[key] = 100.0 * sum(r[key] for r in recs) / len(recs)
        res.rows.append(row)
    return res


def parse_ks(text: str):
    """``"1,10,20,30,50%"`` -> ``(1, 10, 20, 30, 0.5)``."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(float(part[:-1]) / 100.0 if part.endswith("%") else (float(part) if "." in part else int(part)))
        except ValueError as e:
            raise InputError(f"bad K {part!r}: expected an int, a fraction or a percentage") from e
    if not out or any((isinstance(k, float) and not 0 < k <= 1) or (isinstance(k, int) and k < 0) for k in out):
        raise InputError(f"bad K list {text!r}")
    return tuple(out)


__all__ = [
    "PROMPT",
    "PROMPT_GEMMA_RELEASED",
    "ExperimentResult",
    "choose_donors",
    "exact_match",
    "extract_answer",
    "extract_answer_released",
    "f1",
    "generation_answer",
    "keeps",
    "load_squad",
    "normalize_answer",
    "parse_ks",
    "run_experiments",
    "template_for",
]
