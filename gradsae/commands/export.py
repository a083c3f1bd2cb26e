"""Export a finished ``gradsae score`` run for browsing.

    gradsae export runs/l6 --format html           # runs/l6.html: one self-contained page
    gradsae export runs/l6 --format neuronpedia    # runs/l6-neuronpedia/batch-<i>.json

``html``: a sortable table of the run's top latents (``--top``, ``--by``) and, for the latent
picked, its top and bottom examples with every token shaded by the latent's influence there;
data, CSS and JavaScript inline, so it opens offline. ``neuronpedia``: Neuronpedia's
feature/activation JSON, at most 128 features per file and 1,024 tokens per activation, for
every latent with an example (``--values act``: the activations, what Neuronpedia shows;
``score``: the influence scores). Both read only the run directory (meta.json and
latents.parquet): no model, no tokenizer.
"""

from __future__ import annotations

HELP = "export a corpus run as Neuronpedia JSON or a static HTML page"


def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN", help="the --out directory of a finished gradsae score")
    p.add_argument("--format", required=True, choices=("neuronpedia", "html"), help="what to write")
    p.add_argument("--out", default=None,
                   help="where to write (default: RUN.html, or the directory RUN-neuronpedia, beside RUN)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--hook", default=None,
                   help="a run that scored several hooks: the one to export (default output: RUN-<hook>.html ...)")
    p.add_argument("--top", type=int, default=200,
                   help="html: latents in the table, the top ones by --by (default 200; 0: every active latent)")
    p.add_argument("--by", default="relu_sum", help="html: the statistic that picks and sorts the table's latents "
                   "(default relu_sum: total positive influence; also abs_sum, score_sum, mean_score, "
                   "score_max, count, frequency, mean_act, mean_relu_score)")
    p.add_argument("--values", choices=("act", "score"), default="act",
                   help="neuronpedia: the per-token values, activations (default) or influence scores")
    p.add_argument("--examples", choices=("top", "bottom", "both"), default="both",
                   help="neuronpedia: which examples become activations (default both: top, then bottom)")


def run(args) -> int:
    import sys

    from ..corpus import export as E
    from ..errors import InputError

    if args.top < 0:
        raise InputError(f"--top must be >= 0, got {args.top}")
    if args.by not in E.SORT_COLUMNS:
        raise InputError(f"--by must be one of {', '.join(E.SORT_COLUMNS)}, got {args.by!r}")
    run_ = E.load_run(args.run, hook=args.hook)
    if args.format == "html":
        out = E.write_html(run_, args.out, top=args.top or None, by=args.by, overwrite=args.overwrite)
        print(f"gradsae export: wrote {out}", file=sys.stderr)
    else:
        sides = ("top", "bottom") if args.examples == "both" else (args.examples,)
        files = E.write_neuronpedia(run_, args.out, values=args.values, sides=sides, overwrite=args.overwrite)
        print(f"gradsae export: wrote {len(files)} file(s)" + (f" to {files[0].parent}" if files else ""),
              file=sys.stderr)
    return 0
