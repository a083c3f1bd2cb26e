"""The demo: the paper's perturbation study on the bundled key-value lookup model.

    res = run_demo(n_prompts=200, sae_kind="topk", out="demo_results.png")

1. Fresh lookup prompts (``k3:v7 , ... Q : k12 ->``) are drawn from the task generator with a
   fixed seed, different from the training seeds. The SAE is spliced into the model (the
   paper's setting) and the model writes ``Result = [[ v.. ]]`` greedily; only prompts it
   answers correctly are kept.
2. Latents are scored at the step where the model writes its label (the value token): the
   objective is the probability of that token, and a latent's score is the mean over
   positions of ``relu(act * grad)``, as in the paper. (The paper triggers on the first token
   containing ``[``; on this toy that token is pure format, so the label step is the one that
   depends on the context. ``trigger="["`` runs the paper's literal trigger instead.)
3. Perturbation, through :func:`gradsae.experiments.run_experiments`: zero the Top-K or
   Bottom-K latents, chosen by GradSAE or by mean activation, at every position and step, and
   regenerate. Accuracy is the share of kept prompts still answered correctly (100% without
   any masking, by construction).

It prints the accuracy table, writes a PNG of it, and shows the top latents of one prompt.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GradSAEError, InputError
from . import bundle, task

KS = (1, 5, 10, 0.5)
QUICK_KS = (1, 0.5)
EVAL_SEED = 1234  # the training script uses seeds 0..4
TEMPLATE = "{context} Q : {question} ->"
TRIGGERS = ("answer", "[")
MAX_NEW_TOKENS = 8


class DemoError(GradSAEError, RuntimeError):
    """The demo ran but its result is unusable (e.g. the model answers no prompt correctly)."""


@dataclass
class DemoResult:
    """``accuracy[(method, selection, K)]`` in percent over the ``n_kept`` prompts (of
    ``n_prompts``) the spliced model answered correctly; ``masked[(method, selection, K)]``:
    mean number of latents zeroed; ``experiment``: the full
    :class:`gradsae.experiments.ExperimentResult`; ``png``: where the plot was written."""

    n_prompts: int
    n_kept: int
    ks: tuple
    sae_kind: str
    trigger: str
    accuracy: dict = field(default_factory=dict)
    masked: dict = field(default_factory=dict)
    experiment: object = None
    png: Path | None = None

    def table(self) -> str:
        """The accuracy table as text (rows: K; columns: method x selection)."""
        cols = [("gradsae", "top"), ("activation", "top"), ("gradsae", "bottom"), ("activation", "bottom")]
        names = ["GradSAE Top-K", "Act. Top-K", "GradSAE Bot-K", "Act. Bot-K"]
        head = f"{'K':>6} " + "".join(f"{n:>15}" for n in names)
        lines = [f"accuracy (%) on {self.n_kept} prompts the spliced model answers correctly "
                 f"(of {self.n_prompts}); unmasked = 100.0", head, "-" * len(head)]
        for k in self.ks:
            cells = []
            for c in cols:
                a, m = self.accuracy.get((*c, k)), self.masked.get((*c, k))
                cells.append(f"{'-':>15}" if a is None else f"{a:>8.1f} ({m:>4.1f})")
            lines.append(f"{k_name(k):>6} " + "".join(cells))
        lines.append("(in brackets: mean number of latents masked; lower accuracy = more influential latents)")
        return "\n".join(lines)


def k_name(k) -> str:
    return f"{round(k * 100)}%" if isinstance(k, float) else str(k)


def demo_examples(n: int, seed: int = EVAL_SEED) -> list[dict]:
    """``n`` lookup questions in the layout :func:`gradsae.experiments.run_experiments` takes."""
    return [{"id": str(i), "context": e.context, "question": e.key, "answers": [e.answer]}
            for i, e in enumerate(task.examples(n, seed))]


def make_trigger(tok, trigger: str):
    """``"answer"``: a callable firing on a value token (the label); ``"["``: the paper's."""
    if trigger == "[":
        return "["
    if trigger != "answer":
        raise InputError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
    values = set(tok.convert_tokens_to_ids(list(task.VALUES)))
    return lambda t: int(t) in values


def build_scorer(sae_kind: str = "topk", root=None):
    """A spliced :class:`gradsae.GradSAE` on the bundled model and SAE (or those under
    ``root``, a directory written by the training script)."""
    from ..model import GradSAE

    root = None if root is None else Path(root)
    model, tok = bundle.load_model(root)
    sae = bundle.load_demo_sae(sae_kind, root)
    return GradSAE(model, sae, hook=sae.hook_name, mode="splice", tokenizer=tok)


def example_latents(scorer, trig, n_top: int = 5, seed: int = EVAL_SEED + 1, out=None) -> dict:
    """Score one fresh prompt (the first of a few that the spliced model answers correctly),
    print its Top latents by GradSAE and by activation, and what the answer becomes with each
    set masked. Returns what it printed, as a dict."""
    from ..experiments import extract_answer

    out = sys.stdout if out is None else out
    # the first of a few fresh prompts that the spliced model answers correctly
    for ex in demo_examples(20, seed):
        prompt = TEMPLATE.format(context=ex["context"], question=ex["question"])
        full = scorer.generate(prompt, max_new_tokens=MAX_NEW_TOKENS).text or ""
        if extract_answer(full) == ex["answers"][0]:
            break
    g = scorer.score_at_trigger(prompt, trigger=trig, max_new_tokens=MAX_NEW_TOKENS)
    s = g.scores
    print(f"\nexample prompt: {prompt}", file=out)
    print(f"gold answer: {ex['answers'][0]}; spliced model writes: {full}", file=out)
    print(f"{int(s.active.sum())} latents active in the prompt, {s.active_last.numel()} at the last position; "
          f"objective (probability of the scored token) {s.objective:.3f}", file=out)
    info = {"prompt": prompt, "answer": ex["answers"][0], "generated": full}
    for name, sc in (("GradSAE", s), ("activation", s.activation_baseline())):
        top = sc.top(n_top, strict=False).tolist()
        print(f"\ntop {len(top)} latents by {name}:", file=out)
        print(f"  {'latent':>6} {'GradSAE score':>14} {'mean act':>9} {'act at last':>12}", file=out)
        for j in top:
            print(f"  {j:>6} {float(s.scores[j]):>14.5f} {float(s.mean_acts[j]):>9.4f} "
                  f"{float(s.last_acts[j]):>12.4f}", file=out)
        with scorer.intervene(zero=top):
            masked = extract_answer(scorer.generate(prompt, max_new_tokens=MAX_NEW_TOKENS).text or "")
        print(f"  answer with these {len(top)} masked: {masked or '(none)'}", file=out)
        info[name] = {"latents": top, "masked_answer": masked}
    return info


def plot(res: DemoResult, path) -> Path:
    """Accuracy vs K for the four selections, written atomically as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no GUI, no global state
    from matplotlib.figure import Figure

    from ..fsutil import atomic_write

    fig = Figure(figsize=(7.2, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    style = {("gradsae", "top"): ("GradSAE Top-K", "#c0392b", None),
             ("activation", "top"): ("Activation Top-K", "#2e86c1", None),
             ("gradsae", "bottom"): ("GradSAE Bottom-K", "#f1948a", "//"),
             ("activation", "bottom"): ("Activation Bottom-K", "#aed6f1", "//")}
    width = 0.8 / len(style)
    for i, (key, (label, color, hatch)) in enumerate(style.items()):
        xs = [j + (i - (len(style) - 1) / 2) * width for j in range(len(res.ks))]
        ys = [res.accuracy.get((*key, k), float("nan")) for k in res.ks]
        bars = ax.bar(xs, ys, width, label=label, color=color, hatch=hatch, edgecolor="white")
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.axhline(100.0, color="grey", lw=0.8, ls=":", label="no masking")
    ax.set_xticks(range(len(res.ks)), [k_name(k) for k in res.ks])
    ax.set_xlabel("K (latents masked; 50% = half of those active at the last position)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 112)
    ax.set_title(f"Masking SAE latents on the demo model ({res.sae_kind} SAE, {res.n_kept} prompts)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=5, bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return path


def run_demo(n_prompts: int = 200, sae_kind: str = "topk", out="demo_results.png", ks=KS,
             trigger: str = "answer", progress: bool = True, stream=None, root=None) -> DemoResult:
    """Run the whole demo (see the module docstring), printing to ``stream``; raises
    :class:`DemoError` when the spliced model answers none of the prompts."""
    from ..experiments import run_experiments

    if n_prompts < 1:
        raise InputError(f"n_prompts must be >= 1, got {n_prompts}")
    stream = sys.stdout if stream is None else stream
    try:
        import matplotlib  # noqa: F401  (checked first: the plot comes last)
    except ImportError as e:
        raise InputError("the demo writes a PNG plot and needs matplotlib: pip install 'gradsae[report]'") from e
    scorer = build_scorer(sae_kind, root)
    trig = make_trigger(scorer.tokenizer, trigger)
    print(f"model: key-value lookup {type(scorer.model).__name__} ({bundle.model_dir(root and Path(root))}); SAE: {sae_kind} at "
          f"{scorer.sae.hook_name} (d_sae={scorer.sae.d_sae}); trigger: {trigger}", file=stream)
    exp = run_experiments(scorer, demo_examples(n_prompts), ks=tuple(ks), studies=("perturbation",),
                          max_new_tokens=MAX_NEW_TOKENS, trigger=trig, template=TEMPLATE, progress=progress)
    if exp.n_kept == 0:
        raise DemoError(
            f"the spliced demo model answered none of {n_prompts} prompts correctly; the bundled weights "
            f"look broken (retrain with {bundle.RETRAIN})"
        )
    res = DemoResult(n_prompts, exp.n_kept, tuple(ks), sae_kind, trigger, experiment=exp)
    for row in exp.rows:
        res.accuracy[(row["method"], row["selection"], row["K"])] = row["em"]
    sizes: dict = {}
    for rec in exp.records:
        sizes.setdefault((rec["method"], rec["selection"], rec["K"]), []).append(len(rec["latents"]))
    res.masked = {key: sum(v) / len(v) for key, v in sizes.items()}
    print("\n" + res.table(), file=stream)
    example_latents(scorer, trig, out=stream)
    res.png = plot(res, out)
    print(f"\nplot written to {res.png}", file=stream)
    return res
