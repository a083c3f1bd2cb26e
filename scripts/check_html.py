"""Check `gradsae export --format html` in a real headless browser.

Scores a small corpus of the demo task with the bundled demo model and SAE (`gradsae score`,
CPU, no network), exports the run as HTML, then opens the page with headless Chromium:

- `--dump-dom` of the page as loaded: the latent table was built by the page's JavaScript
  (one `<tr data-latent=...>` per latent of the run's top table, in the page's data), and the
  first latent's top examples are rendered (token spans, the example's token outlined);
- `--dump-dom` of `page.html#<latent>`: the page opens on that latent's examples;
- `--screenshot`: a PNG of the page, to look at.

    apt-get install -y chromium          # Debian's package
    python scripts/check_html.py --out /tmp/gradsae-html    # keeps run, page and screenshot

Exits 0 when every check passes, 1 otherwise (the failed check is printed). Not part of the
test suite: it needs Chromium.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def chromium(explicit: str | None) -> str:
    for name in ([explicit] if explicit else ["chromium", "chromium-browser", "google-chrome", "chrome"]):
        path = shutil.which(name) if name else None
        if path:
            return path
    sys.exit("no Chromium found: apt-get install -y chromium (or pass --chromium PATH)")


def browser(exe: str, profile: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="directory for the run, the page and the screenshot (default: a "
                    "temporary directory, removed at the end)")
    ap.add_argument("--docs", type=int, default=60, help="demo documents to score (default 60)")
    ap.add_argument("--window-size", default="1400,900", help="browser window, W,H (default 1400,900)")
    ap.add_argument("--chromium", default=None, help="the browser executable (default: chromium on the PATH)")
    args = ap.parse_args()
    exe = chromium(args.chromium)
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="gradsae-html-")
        work = Path(tmp.name)
    else:
        work = Path(args.out)
        work.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(("ok    " if ok else "FAIL  ") + what)
        if not ok:
            failures.append(what)

    try:
        from gradsae.demo import bundle, task

        corpus = work / "demo.txt"
        corpus.write_text("\n".join(e.text for e in task.examples(args.docs, seed=7)) + "\n")
        run, page, png = work / "run", work / "run.html", work / "run.png"
        py = [sys.executable, "-m", "gradsae"]
        subprocess.run([*py, "score", "--model", str(bundle.model_dir()), "--sae", str(bundle.sae_dir("topk")),
                        "--data", str(corpus), "--out", str(run), "--overwrite", "--no-progress", "--top-n", "5",
                        "--context", "6", "--device", "cpu"], check=True)
        subprocess.run([*py, "export", str(run), "--format", "html", "--out", str(page), "--overwrite",
                        "--top", "40"], check=True)
        text = page.read_text(encoding="utf-8")
        data = json.loads(re.search(r'<script type="application/json" id="gradsae-data">(.*?)</script>', text,
                                    re.S).group(1))
        latents = [r[0] for r in data["latents"]]
        print(f"page: {page} ({page.stat().st_size / 1024:.0f} KiB, {len(latents)} latents in the table)")
        check(not re.search(r"\b(src|href)\s*=|@import|url\(|https?://", text), "the page loads nothing from outside")

        profile = work / ".chromium-profile"
        dom = browser(exe, profile, "--dump-dom", page.as_uri())
        check(dom.returncode == 0, f"chromium --dump-dom exits 0 ({dom.returncode})")
        html = dom.stdout
        rows = re.findall(r'<tr data-latent="(\d+)"', html)
        check([int(r) for r in rows] == latents,
              f"the table has one JS-built row per latent of the run's top table, in order ({len(rows)} rows)")
        first = latents[0]
        check(f"<h2>Latent {first}</h2>" in html, f"the page opens on the first latent ({first})")
        top = data["examples"][str(first)]["top"]
        box = re.search(r'<div class="top" id="top-examples">(.*?)</div><h3>', html, re.S)
        spans = re.findall(r'<span class="(tok\b[^"]*)"[^>]*>([^<]*)</span>', box.group(1)) if box else []
        n_tokens = sum(len(e[5]) for e in top)
        check(len(spans) == n_tokens and n_tokens > 0, f"its top examples are rendered ({len(spans)} token spans)")
        centres = [t for c, t in spans if "c" in c.split()]
        check(len(centres) == len(top), f"each example's own token is outlined ({len(centres)} of {len(top)})")
        shaded = len(re.findall(r'<span class="tok\b[^"]*"[^>]*style="background: rgba', box.group(1))) if box else 0
        check(shaded > 0, f"tokens are shaded by influence ({shaded} shaded)")
        check('id="bottom-examples"' in html, "the bottom examples section is rendered")

        other = latents[min(3, len(latents) - 1)]
        dom2 = browser(exe, profile, "--dump-dom", page.as_uri() + f"#{other}")
        check(f"<h2>Latent {other}</h2>" in dom2.stdout and f'<tr data-latent="{other}" class="sel"' in dom2.stdout,
              f"page.html#{other} opens on latent {other}, selected in the table")

        shot = browser(exe, profile, "--hide-scrollbars", f"--screenshot={png}", f"--window-size={args.window_size}",
                       page.as_uri())
        ok = shot.returncode == 0 and png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        check(ok, f"screenshot written: {png}" + (f" ({png.stat().st_size / 1024:.0f} KiB)" if ok else ""))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
