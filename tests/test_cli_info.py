"""`gradsae info` tells the truth about where each backend runs."""

import json

import torch

from gradsae.cli import main


def test_info_says_whether_triton_has_a_gpu(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    tri = info["backends"].get("triton")
    assert info["backends"]["reference"]["available"] is True
    if not torch.cuda.is_available():
        assert "interpreter only" in info["triton"] or info["triton"].startswith("unavailable")
        if tri is not None:
            assert tri["available"] is False and tri["reason"]
        assert main(["info"]) == 0
        text = capsys.readouterr().out
        line = next(ln for ln in text.splitlines() if ln.strip().startswith("triton ") and "no" in ln)
        assert " yes" not in line
