"""The README must stay true: its Python example runs, and its commands exist."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        ns: dict = {}
        exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - our own README
        out = ns.get("out")
        if out is not None:
            assert out.indices.shape[-1] == 16


def test_make_targets_named_in_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"^make (\w[\w-]*)", README, flags=re.M)):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"README names 'make {target}' but the Makefile lacks it"


def test_ci_calls_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_cli_info_runs():
    res = subprocess.run([sys.executable, "-m", "gradsae", "info"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    assert "reference" in res.stdout and "yes" in res.stdout
