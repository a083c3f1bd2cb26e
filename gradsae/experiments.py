"""The paper's Table 1 studies on SQuAD: perturbation and local steering, GradSAE vs the
activation baseline.

    examples = load_squad("dev-v1.1.json", limit=200)
    res = run_experiments(scorer, examples)          # scorer: a spliced GradSAE with tokenizer
    print(res.table())

Protocol (Shu et al.; semantics of the released code):

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
"""

from __future__ import annotations

import json
import re
import string
import warnings
from collections import Counter
from dataclasses import dataclass, field

from .errors import GradSAEWarning, InputError
from .model.interventions import perturbation, steering

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
    ``sample`` drawn at random with ``seed`` (the released code samples 1000 with seed 42)."""
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
    and configuration, the latents used and the answer; ``n_total`` / ``n_kept``."""

    rows: list = field(default_factory=list)
    records: list = field(default_factory=list)
    n_total: int = 0
    n_kept: int = 0

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
        return {"n_total": self.n_total, "n_kept": self.n_kept, "rows": self.rows, "records": self.records}


def run_experiments(scorer, examples, ks=DEFAULT_KS, methods=METHODS, studies=STUDIES,
                    max_new_tokens: int = 50, trigger: str = "[", template: str = PROMPT,
                    steer_positions: str = "last", donor_how: str = "last",
                    progress: bool = True) -> ExperimentResult:
    """Run the perturbation and steering studies (see the module docstring) on ``examples``
    (from :func:`load_squad`) with ``scorer`` (a :class:`gradsae.GradSAE` with a tokenizer).
    The donor of kept example i is kept example i+1 (cyclically)."""
    from tqdm.auto import tqdm

    for m in methods:
        if m not in METHODS:
            raise InputError(f"unknown method {m!r}; expected {METHODS}")
    for s in studies:
        if s not in STUDIES:
            raise InputError(f"unknown study {s!r}; expected {STUDIES}")
    if scorer.tokenizer is None:
        raise InputError("experiments need a tokenizer: GradSAE(..., tokenizer=tok)")
    res = ExperimentResult(n_total=len(examples))

    def ask(prompt, **kw):
        return extract_answer(scorer.generate(prompt, max_new_tokens=max_new_tokens, **kw).text or "")

    kept: list[Kept] = []
    for ex in tqdm(examples, desc="baseline answers", disable=not progress):
        prompt = template.format(context=ex["context"], question=ex["question"])
        g = scorer.generate(prompt, max_new_tokens=max_new_tokens, trigger=trigger)
        ans = extract_answer(g.text or "")
        if g.scores is not None and exact_match(ans, ex["answers"]):
            kept.append(Kept(ex, prompt, ans, g.scores))
    res.n_kept = len(kept)
    if not kept:
        return res

    configs = [(st, me, k) for st in studies for me in methods for k in ks]
    acc: dict = {}
    bar = tqdm(total=len(configs) * len(kept), desc="interventions", disable=not progress)
    for i, item in enumerate(kept):
        donor = kept[(i + 1) % len(kept)]
        for study, method, k in configs:
            sc = item.scores if method == "gradsae" else item.scores.activation_baseline()
            if study == "perturbation":
                for sel in ("top", "bottom"):
                    edit = perturbation(sc, k, sel)
                    lat = edit["zero"]
                    with scorer.intervene(**edit):
                        a = ask(item.prompt)
                    rec = {"id": item.example["id"], "study": study, "method": method, "K": k,
                           "selection": sel, "latents": lat, "answer": a,
                           "em": exact_match(a, item.example["answers"]), "f1": f1(a, item.example["answers"])}
                    res.records.append(rec)
                    acc.setdefault((study, method, k, sel), []).append(rec)
            else:
                dsc = donor.scores if method == "gradsae" else donor.scores.activation_baseline()
                with warnings.catch_warnings():  # the skipped donor latents go into the record
                    warnings.simplefilter("ignore", GradSAEWarning)
                    edit = steering(sc, dsc, k, values=donor_how, positions=steer_positions)
                own, vals = edit["zero"], edit["set"]
                skipped = [j for j in dsc.top(k, False).tolist() if j not in vals]
                with scorer.intervene(**edit):
                    a = ask(item.prompt)
                rec = {"id": item.example["id"], "donor": donor.example["id"], "study": study, "method": method,
                       "K": k, "selection": "top", "latents": own, "donor_latents": vals,
                       "donor_skipped": skipped, "answer": a,
                       "em": exact_match(a, item.example["answers"]), "f1": f1(a, item.example["answers"]),
                       "donor_em": exact_match(a, donor.example["answers"]),
                       "donor_f1": f1(a, donor.example["answers"])}
                res.records.append(rec)
                acc.setdefault((study, method, k, "top"), []).append(rec)
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
    "exact_match",
    "extract_answer",
    "f1",
    "load_squad",
    "normalize_answer",
    "parse_ks",
    "run_experiments",
]
