"""Export a finished corpus run for browsing: Neuronpedia's feature/activation JSON, or one
self-contained static HTML page.

Both read only the run's ``meta.json`` and ``latents.parquet`` (its examples carry their
decoded window tokens and per-token values), so neither needs the model, the tokenizer or
torch.

    gradsae export runs/l6 --format html              # runs/l6.html, opens offline
    gradsae export runs/l6 --format neuronpedia       # runs/l6-neuronpedia/batch-0.json, ...

**Neuronpedia.** Files ``batch-<i>.json``, each ``{"modelId", "layer", "features"}`` with at
most :data:`FEATURES_PER_BATCH` features in latent order; a feature is
``{"index": int, "activations": [{"tokens": [str], "values": [float], "maxValue": float,
"maxValueTokenIndex": int}]}``, one activation per kept example (its context window, at most
:data:`MAX_TOKENS` tokens around the example), top examples first, then bottom ones.
``values`` are the latent's activations at each token (``values="act"``, what Neuronpedia
shows) or its influence scores (``values="score"``); ``maxValue`` and ``maxValueTokenIndex``
are their maximum and its first index. Every latent with at least one example is exported.

**HTML.** One page, data and code inline (no network resource): a table of the run's top
latents (by ``by``, default ``relu_sum``, the latents with the largest total positive
influence; sortable by any column) and, for the latent picked in the table, its top and
bottom examples, each token of a window shaded by the latent's influence there (blue
positive, red negative; hover for the activation and the score).

Writing is atomic: the page is written to a temporary file and renamed; the batch files go to a
temporary directory renamed into place once all are written. An existing output is replaced
only with ``overwrite``.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..fsutil import atomic_write_text, make_temp_dir

FEATURES_PER_BATCH = 128
MAX_TOKENS = 1024
FORMATS = ("neuronpedia", "html")
SORT_COLUMNS = ("relu_sum", "abs_sum", "score_sum", "mean_score", "mean_relu_score", "score_max", "count",
                "frequency", "mean_act")
_STAT_COLUMNS = ("count", "frequency", "mean_act", "score_sum", "mean_score", "relu_sum", "mean_relu_score",
                 "abs_sum", "score_max")
_EXAMPLE_FIELDS = ("doc", "pos", "score", "act", "tokens", "acts", "scores", "center")


@dataclass
class Run:
    """A finished run as the exporters read it: ``meta`` (``meta.json``), ``table`` (the
    ``latents.parquet`` pyarrow Table) and ``path``."""

    path: Path
    meta: dict
    table: object
    name: str = ""   # the default output's stem: the run's name, plus the hook's for several hooks

    def __post_init__(self):
        self.name = self.name or self.path.name

    def column(self, name: str) -> list:
        return self.table.column(name).to_pylist()

    def examples(self, rows: list[int], side: str) -> dict[int, list[dict]]:
        """``{latent: [example dict, ...]}`` for the table rows ``rows`` (``side``: top or
        bottom), each example with the fields the exporters use."""
        import pyarrow as pa

        col = self.table.column(f"{side}_examples").take(pa.array(rows, pa.int64()))
        latents = self.table.column("latent").take(pa.array(rows, pa.int64())).to_pylist()
        out = {}
        for lat, exs in zip(latents, col.to_pylist()):
            out[int(lat)] = [{f: e[f] for f in _EXAMPLE_FIELDS} for e in exs or []]
        return out


def load_run(run, hook: str | None = None) -> Run:
    """Open a finished run directory for export; one-line :class:`InputError` when it is not
    one (no such directory, no ``meta.json``, no ``latents.parquet``, or one written before
    examples kept their windows). A run that scored several hooks exports one hook at a time:
    ``hook`` names it (its outputs under ``hooks/<hook>/``)."""
    path = Path(run)
    if not path.exists():
        raise InputError(f"no such run directory: {path}")
    if not path.is_dir():
        raise InputError(f"{path} is not a directory (expected the --out directory of gradsae score)")
    meta_p, table_p = path / "meta.json", path / "latents.parquet"
    if not meta_p.is_file():
        raise InputError(f"{path} holds no finished run (no meta.json): export reads the --out directory of a "
                         "finished gradsae score")
    try:
        meta = json.loads(meta_p.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {meta_p}: {e}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{meta_p} is not a gradsae run's meta.json")
    name = path.name
    hooks = meta.get("hooks")
    if isinstance(hooks, dict):
        if hook is None:
            raise InputError(f"{path} scored {len(hooks)} hooks ({', '.join(hooks)}): pass --hook with one of them")
        if hook not in hooks:
            raise InputError(f"{path} scored no hook {hook!r}; its hooks: {', '.join(hooks)}")
        info = hooks[hook]
        table_p = path / info["dir"] / "latents.parquet"
        meta = {**meta, "hook": hook, "sae": info.get("sae"), "active_latents": info.get("active_latents")}
        name = f"{path.name}-{Path(info['dir']).name}"
    elif hook is not None and hook != meta.get("hook"):
        raise InputError(f"{path} scored one hook, {meta.get('hook')!r}, not {hook!r}")
    if not table_p.is_file():
        raise InputError(f"{path} has no latents.parquet")
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(table_p)
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise InputError("reading latents.parquet needs pyarrow: pip install pyarrow") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file is the user's input
        raise InputError(f"cannot read {table_p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    names = set(table.column_names)
    need = {"latent", "top_examples", "bottom_examples", *_STAT_COLUMNS}
    if not need <= names:
        raise InputError(f"{table_p} lacks {', '.join(sorted(need - names))}: written by a gradsae without bottom "
                         "examples and per-token windows; score the corpus again to export it")
    ex_type = table.schema.field("top_examples").type.value_type
    if not {"tokens", "acts", "scores", "center"} <= {ex_type.field(i).name for i in range(ex_type.num_fields)}:
        raise InputError(f"{table_p}'s examples have no per-token windows: written by an older gradsae; score the "
                         "corpus again to export it")
    return Run(path, meta, table, name)


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _clip_window(ex: dict, max_tokens: int) -> tuple[list, list, list, int]:
    """The example's window cut to at most ``max_tokens`` tokens, centred on the example."""
    toks, acts, scores, c = list(ex["tokens"]), list(ex["acts"]), list(ex["scores"]), int(ex["center"])
    if len(toks) > max_tokens:
        lo = min(max(0, c - max_tokens // 2), len(toks) - max_tokens)
        toks, acts, scores, c = toks[lo:lo + max_tokens], acts[lo:lo + max_tokens], scores[lo:lo + max_tokens], c - lo
    return toks, acts, scores, c


def neuronpedia_features(run: Run, values: str = "act", sides=("top", "bottom"),
                         max_tokens: int = MAX_TOKENS) -> list[dict]:
    """Every latent with at least one example as a Neuronpedia feature (see the module
    docstring), in latent order."""
    if values not in ("act", "score"):
        raise InputError(f"values must be 'act' or 'score', got {values!r}")
    if max_tokens < 1:
        raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
    rows = list(range(run.table.num_rows))
    per_side = {side: run.examples(rows, side) for side in sides}
    latents = run.column("latent")
    out = []
    for lat in latents:
        acts = []
        for side in sides:
            for ex in per_side[side][int(lat)]:
                toks, a, s, _ = _clip_window(ex, max_tokens)
                vals = [float(v) if v is not None and math.isfinite(v) else 0.0
                        for v in (a if values == "act" else s)]
                top = max(vals)
                acts.append({"tokens": [str(t) for t in toks], "values": vals, "maxValue": top,
                             "maxValueTokenIndex": vals.index(top)})
        if acts:
            out.append({"index": int(lat), "activations": acts})
    return out


def neuronpedia_batches(run: Run, values: str = "act", sides=("top", "bottom"),
                        batch_size: int = FEATURES_PER_BATCH, max_tokens: int = MAX_TOKENS) -> list[dict]:
    """The features of :func:`neuronpedia_features` in batches of at most ``batch_size``:
    ``[{"modelId", "layer", "features"}, ...]``."""
    if not 1 <= batch_size <= FEATURES_PER_BATCH:
        raise InputError(f"batch_size must be in 1..{FEATURES_PER_BATCH}, got {batch_size}")
    feats = neuronpedia_features(run, values, sides, max_tokens)
    model = str((run.meta.get("model") or {}).get("name", ""))
    layer = str(run.meta.get("hook", ""))
    return [{"modelId": model, "layer": layer, "features": feats[i:i + batch_size]}
            for i in range(0, len(feats), batch_size)]


def _check_target(out: Path, overwrite: bool, what: str) -> None:
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise InputError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it, or choose "
                             "another output")
        if what == "dir" and not out.is_dir():
            raise InputError(f"{out} exists and is not a directory")
        if what == "file" and out.is_dir():
            raise InputError(f"{out} is a directory; give the HTML file's name")
    parent = out.parent
    if not parent.is_dir():
        raise InputError(f"cannot write {out}: the directory {parent} does not exist")


def write_neuronpedia(run, out=None, values: str = "act", sides=("top", "bottom"), overwrite: bool = False,
                      batch_size: int = FEATURES_PER_BATCH, max_tokens: int = MAX_TOKENS) -> list[Path]:
    """Write ``batch-<i>.json`` files into the directory ``out`` (default: the run directory's
    name + ``-neuronpedia``, beside it); returns their paths. The files are written into a
    temporary directory that is renamed to ``out`` when all are written, so ``out`` never
    holds a part of the set."""
    run = run if isinstance(run, Run) else load_run(run)
    out = Path(out) if out is not None else run.path.parent / (run.name + "-neuronpedia")
    _check_target(out, overwrite, "dir")
    batches = neuronpedia_batches(run, values, sides, batch_size, max_tokens)
    tmp = make_temp_dir(out.parent, out.name)
    old = None
    try:
        names = []
        for i, b in enumerate(batches):
            name = f"batch-{i}.json"
            (tmp / name).write_text(json.dumps(b, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
            names.append(name)
        for name in names:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if out.exists():
            old = make_temp_dir(out.parent, out.name + ".old")
            os.replace(out, old / "x")
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old / "x", out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return [out / n for n in names]


# ---------------------------------------------------------------------------------------- HTML
def top_latents(run: Run, top: int | None = 200, by: str = "relu_sum") -> list[int]:
    """The table rows of the page: active latents (count > 0) sorted by ``by`` descending,
    ties by latent ascending, the first ``top`` (None or 0: all)."""
    if by not in SORT_COLUMNS:
        raise InputError(f"by must be one of {', '.join(SORT_COLUMNS)}, got {by!r}")
    if top is not None and top < 0:
        raise InputError(f"top must be >= 0, got {top}")
    count, key, latent = run.column("count"), run.column(by), run.column("latent")
    rows = [r for r in range(len(count)) if count[r] > 0]
    rows.sort(key=lambda r: (-(key[r] if key[r] is not None and not math.isnan(key[r]) else -math.inf), latent[r]))
    return rows[:top] if top else rows


def page_data(run: Run, top: int | None = 200, by: str = "relu_sum", max_tokens: int = MAX_TOKENS) -> dict:
    """What the page embeds: ``meta`` (a summary of the run), ``columns``, ``latents`` (one
    row of statistics per latent shown) and ``examples`` (``{latent: {"top": [...],
    "bottom": [...]}}``, each example ``[doc, pos, score, act, center, tokens, acts,
    scores]``)."""
    rows = top_latents(run, top, by)
    cols = {c: run.column(c) for c in ("latent", *_STAT_COLUMNS)}
    ex = {side: run.examples(rows, side) for side in ("top", "bottom")}
    latents, examples = [], {}
    for r in rows:
        lat = int(cols["latent"][r])
        latents.append([lat] + [_finite(cols[c][r]) for c in _STAT_COLUMNS])
        examples[str(lat)] = {}
        for side in ("top", "bottom"):
            lst = []
            for e in ex[side][lat]:
                toks, a, s, c = _clip_window(e, max_tokens)
                lst.append([int(e["doc"]), int(e["pos"]), _finite(e["score"]), _finite(e["act"]), c,
                            [str(t) for t in toks], [_finite(v) for v in a], [_finite(v) for v in s]])
            examples[str(lat)][side] = lst
    m = run.meta
    sign = m.get("sign") or {}
    meta = {"run": run.path.name, "model": (m.get("model") or {}).get("name", ""), "hook": m.get("hook", ""),
            "objective": m.get("objective", ""), "y": sign.get("y", ""), "positive": sign.get("positive", ""),
            "tokens": m.get("tokens"), "documents": m.get("documents"), "d_sae": (m.get("sae") or {}).get("d_sae"),
            "active_latents": m.get("active_latents"), "by": by, "shown": len(rows)}
    return {"meta": meta, "columns": ["latent", *_STAT_COLUMNS], "latents": latents, "examples": examples}


def _json_for_script(obj) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>``, no HTML comment opener)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") \
        .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


_CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;background:#f6f7f9}
header{padding:10px 16px;background:#fff;border-bottom:1px solid #d8dde3}
header h1{font-size:17px;margin:0 0 2px}
header .sub{color:#57606a;font-size:12.5px}
main{display:flex;gap:12px;padding:12px;height:calc(100vh - 62px);min-height:420px}
#left{flex:0 0 auto;width:min(860px,56%);display:flex;flex-direction:column;background:#fff;border:1px solid #d8dde3;
 border-radius:6px;overflow:hidden}
#left .bar{padding:6px 8px;border-bottom:1px solid #e4e8ec;display:flex;gap:8px;align-items:center;font-size:12.5px;
 color:#57606a}
#filter{flex:1;padding:3px 6px;border:1px solid #c9d1d9;border-radius:4px;font:inherit}
#wrap{overflow:auto;flex:1}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums;font-size:12.5px}
th,td{padding:3px 6px;text-align:right;white-space:nowrap;border-bottom:1px solid #eef1f4}
th{white-space:normal;vertical-align:bottom;line-height:1.15}
th{position:sticky;top:0;background:#eef1f4;cursor:pointer;user-select:none;font-weight:600}
th.sorted::after{content:" \\25BE"}th.sorted.asc::after{content:" \\25B4"}
tbody tr{cursor:pointer}tbody tr:hover{background:#f3f7fc}tbody tr.sel{background:#dbe9fb}
#right{flex:1;overflow:auto;background:#fff;border:1px solid #d8dde3;border-radius:6px;padding:10px 14px;min-width:0}
#right h2{font-size:16px;margin:2px 0 6px}#right h3{font-size:13.5px;margin:14px 0 6px;color:#24292f}
.stats{font-size:12.5px;color:#57606a}
.ex{display:flex;gap:10px;align-items:baseline;padding:4px 0;border-bottom:1px dashed #e4e8ec}
.ex .num{flex:0 0 88px;text-align:right;font:12px ui-monospace,SFMono-Regular,Menlo,monospace;color:#57606a}
.ex .txt{font:13px/1.9 ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre-wrap;word-break:break-word}
.tok{border-radius:2px;padding:1px 1px;margin-right:2px}
.tok.c{outline:2px solid #e3a008;outline-offset:1px;font-weight:700}
.tok.dark{color:#fff}
.none{color:#8c959f;font-style:italic;font-size:12.5px}
.legend{display:inline-block;width:120px;height:10px;vertical-align:middle;border:1px solid #d8dde3;
 background:linear-gradient(90deg,rgb(214,39,40),#fff,rgb(31,119,180))}
"""

_JS = r"""
(function(){
const D=JSON.parse(document.getElementById('gradsae-data').textContent);
const C=D.columns, M=D.meta;
const fmt=(v,c)=>v===null?'':(c==='latent'||c==='count')?String(v):
  (Math.abs(v)>=1e4||(Math.abs(v)<1e-3&&v!==0))?v.toExponential(2):v.toPrecision(4).replace(/\.?0+$/,'');
let sortCol=C.indexOf(M.by), asc=false, sel=null;
const thead=document.querySelector('#latents thead tr'), tbody=document.querySelector('#latents tbody');
C.forEach((c,i)=>{const th=document.createElement('th');th.textContent=c.replace(/_/g,' ');th.dataset.col=i;
  th.title='sort by '+c;th.onclick=()=>{if(sortCol===i)asc=!asc;else{sortCol=i;asc=(c==='latent');}render();};
  thead.appendChild(th);});
function render(){
  const q=document.getElementById('filter').value.trim();
  const rows=D.latents.filter(r=>!q||String(r[0]).startsWith(q));
  rows.sort((a,b)=>{const x=a[sortCol],y=b[sortCol];const d=(x===null?-Infinity:x)-(y===null?-Infinity:y);
    return (asc?d:-d)||(a[0]-b[0]);});
  thead.querySelectorAll('th').forEach((th,i)=>{th.className=i===sortCol?('sorted'+(asc?' asc':'')):'';});
  const frag=document.createDocumentFragment();
  for(const r of rows){const tr=document.createElement('tr');tr.dataset.latent=r[0];
    if(r[0]===sel)tr.className='sel';
    r.forEach((v,i)=>{const td=document.createElement('td');td.textContent=fmt(v,C[i]);tr.appendChild(td);});
    tr.onclick=()=>show(r[0]);frag.appendChild(tr);}
  tbody.replaceChildren(frag);
  document.getElementById('count').textContent=rows.length+' of '+D.latents.length+' latents';
}
function shade(s,m){if(!s||!m)return '';const a=Math.min(1,Math.abs(s)/m);
  const c=s>0?[31,119,180]:[214,39,40];return 'rgba('+c.join(',')+','+(0.08+0.82*a).toFixed(3)+')';}
function show(lat){
  sel=lat;tbody.querySelectorAll('tr').forEach(tr=>tr.classList.toggle('sel',Number(tr.dataset.latent)===lat));
  const E=D.examples[String(lat)]||{top:[],bottom:[]}, r=D.latents.find(x=>x[0]===lat);
  let m=0;
  for(const side of ['top','bottom'])for(const e of E[side])for(const v of e[7])if(v!==null)m=Math.max(m,Math.abs(v));
  const R=document.getElementById('right');R.replaceChildren();
  const h=document.createElement('h2');h.textContent='Latent '+lat;R.appendChild(h);
  const st=document.createElement('div');st.className='stats';
  st.textContent=C.slice(1).map((c,i)=>c.replace(/_/g,' ')+' '+fmt(r[i+1],c)).join(' \u00b7 ');R.appendChild(st);
  const lg=document.createElement('div');lg.className='stats';
  lg.innerHTML='influence at each token: <span>negative</span> <span class="legend"></span> <span>positive</span> '+
    '(scale \u00b1'+fmt(m,'')+'; the example\u2019s own token is outlined in amber; hover a token for its values)';
  R.appendChild(lg);
  for(const [side,title] of [['top','Top examples (highest influence)'],
                             ['bottom','Bottom examples (most negative influence)']]){
    const h3=document.createElement('h3');h3.textContent=title+' \u2014 '+E[side].length;R.appendChild(h3);
    const box=document.createElement('div');box.className=side;box.id=side+'-examples';
    if(!E[side].length){const n=document.createElement('div');n.className='none';
      n.textContent=side==='bottom'?'no token where this latent lowers Y':'none';box.appendChild(n);}
    for(const e of E[side]){
      const [doc,pos,score,act,c,toks,acts,scores]=e;
      const row=document.createElement('div');row.className='ex';
      const num=document.createElement('div');num.className='num';num.textContent=fmt(score,'');
      num.title='doc '+doc+', position '+pos+', activation '+fmt(act,'');row.appendChild(num);
      const txt=document.createElement('div');txt.className='txt';
      toks.forEach((t,i)=>{const s=document.createElement('span');s.className='tok'+(i===c?' c':'');
        s.textContent=t.replace(/\n/g,'\u21b5');s.style.background=shade(scores[i],m);
        if(m&&scores[i]&&Math.abs(scores[i])/m>0.6)s.classList.add('dark');
        s.title='act '+fmt(acts[i],'')+'\ninfluence '+fmt(scores[i],'');txt.appendChild(s);});
      row.appendChild(txt);box.appendChild(row);}
    R.appendChild(box);}
  if(location.hash!=='#'+lat)history.replaceState(null,'','#'+lat);
}
document.getElementById('filter').oninput=render;
render();
const h=Number(location.hash.slice(1));
if(D.latents.length)show(D.latents.some(r=>r[0]===h)&&location.hash?h:D.latents[0][0]);
else document.getElementById('right').textContent='No active latent in this run.';
})();
"""


def html_page(run: Run, top: int | None = 200, by: str = "relu_sum", max_tokens: int = MAX_TOKENS) -> str:
    """The page as a string: everything inline, nothing fetched."""
    data = page_data(run, top, by, max_tokens)
    m = data["meta"]
    esc = lambda x: html.escape(str(x if x is not None else ""))  # noqa: E731
    title = f"gradsae: {m['run']} ({m['model']} {m['hook']})"
    sub = (f"objective {esc(m['objective'])}" + (f" (Y = {esc(m['y'])})" if m["y"] else "")
           + (f"; influence &gt; 0: {esc(m['positive'])}" if m["positive"] else "")
           + f" &middot; {esc(m['tokens'])} tokens, {esc(m['documents'])} documents &middot; "
           f"{esc(m['active_latents'])} of {esc(m['d_sae'])} latents active; the table shows the top "
           f"{esc(m['shown'])} by {esc(by)}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{esc(title)}</title>
<style>{_CSS}</style></head>
<body>
<header><h1>{esc(title)}</h1><div class="sub">{sub}</div></header>
<main>
<section id="left"><div class="bar">
<input id="filter" placeholder="latent number&hellip;" aria-label="filter latents">
<span id="count"></span></div>
<div id="wrap"><table id="latents"><thead><tr></tr></thead><tbody></tbody></table></div></section>
<section id="right"></section>
</main>
<script type="application/json" id="gradsae-data">{_json_for_script(data)}</script>
<script>{_JS}</script>
</body></html>
"""


def write_html(run, out=None, top: int | None = 200, by: str = "relu_sum", overwrite: bool = False,
               max_tokens: int = MAX_TOKENS) -> Path:
    """Write the page to ``out`` (default: the run directory's name + ``.html``, beside it)
    atomically; returns its path."""
    run = run if isinstance(run, Run) else load_run(run)
    out = Path(out) if out is not None else run.path.parent / (run.name + ".html")
    _check_target(out, overwrite, "file")
    text = html_page(run, top, by, max_tokens)
    atomic_write_text(out, text)
    return out


__all__ = ["load_run", "Run", "neuronpedia_features", "neuronpedia_batches", "write_neuronpedia", "top_latents",
           "page_data", "html_page", "write_html", "FEATURES_PER_BATCH", "MAX_TOKENS", "FORMATS", "SORT_COLUMNS"]
