"""`llmctl plot`: a real PNG with the curves of several runs; a clear exit 2 without matplotlib."""

import json
import shutil
import struct
import sys

import numpy as np

from conftest import invoke


def _second_run(tmp_path, tiny_run):
    """A copy of the tiny run whose losses are 0.5 lower: a second, distinguishable curve."""
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(tiny_run / "config.yaml", other / "config.yaml")
    rows = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        for k in ("loss", "val_loss"):
            if k in r:
                r[k] -= 0.5
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return other


def test_plot_writes_a_png_with_curves(runner, tiny_run, tmp_path):
    import matplotlib.image

    out = tmp_path / "curves.png"
    r = invoke(runner, "plot", tiny_run, _second_run(tmp_path, tiny_run), "-o", out, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["output"] == str(out) and len(info["runs"]) == 2 and info["points"] > 10
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (800, 480)
    img = matplotlib.image.imread(out)[..., :3]  # (H, W, 3) floats in [0, 1]
    # each run's colour (matplotlib's first two) runs across most of the chart's width: curves, not just a legend
    for hex_colour in ("1f77b4", "ff7f0e"):
        rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (0, 2, 4)])
        columns = np.unique(np.nonzero(np.abs(img - rgb).sum(-1) < 0.1)[1])
        assert len(columns) > 400, (hex_colour, len(columns))
    assert len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50


def test_plot_without_matplotlib_exits_2(runner, tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    r = invoke(runner, "plot", tiny_run, "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and "pip install 'llmctl[plot]'" in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_plot_bad_input(runner, tiny_run, tmp_path):
    r = invoke(runner, "plot", tmp_path / "nope", "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and "run not found" in r.stderr
    r = invoke(runner, "plot", tiny_run, "-o", tmp_path / "x.jpg")
    assert r.exit_code == 2 and ".png" in r.stderr
