"""The visualisation page in headless Chromium: every GIF is shown, decoded, next to its expression and J&F.

Chromium comes from Debian's packages (tools/install_browser.sh, run by .ci/run, which also makes a missing browser
an error via SASASA2VA_REQUIRE_BROWSER=1); elsewhere the test skips without it.
"""
import os
import pathlib
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from tests.test_visualize import make_page


def _find_chromium():
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


CHROMIUM = _find_chromium()
# CI (.ci/run) installs Chromium and sets SASASA2VA_REQUIRE_BROWSER=1: there a missing browser fails.
if CHROMIUM is None and os.environ.get("SASASA2VA_REQUIRE_BROWSER") == "1":
    raise RuntimeError("SASASA2VA_REQUIRE_BROWSER=1 but chromium is not installed; run tools/install_browser.sh")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (/usr/bin/chromium or `chromium` on PATH); "
                             "install it with tools/install_browser.sh")

EXPECTED = [  # (gif, video, exp_id, expression text as rendered, J&F cell)
    ("gifs/vid/0.gif", "vid", "0", "the <red> car", "100.00"),
    ("gifs/vid/1.gif", "vid", "1", "the dog", "0.00"),
]


def _chromium(tmp_path, url, *extra):
    """Run headless Chromium once on url with a fresh profile; returns its stdout."""
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    env = dict(os.environ, HOME=str(profile), XDG_CONFIG_HOME=str(profile / "config"),
               XDG_CACHE_HOME=str(profile / "cache"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", *extra, url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, f"chromium failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return r.stdout


class _Rows(HTMLParser):
    """Table rows of the dumped DOM: cell texts and the attributes of the row's <img>."""

    def __init__(self):
        super().__init__()
        self.rows, self._row, self._cell = [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self._row = {"cells": [], "img": None}
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img" and self._row is not None:
            self._row["img"] = dict(attrs)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _rendered_rows(tmp_path, index):
    dom = _chromium(tmp_path, index.as_uri(), "--dump-dom")
    assert "<table" in dom, dom[:2000]
    parser = _Rows()
    parser.feed(dom)
    return {row["img"]["src"]: row for row in parser.rows if row["img"] is not None}


def _panel(gif_path):
    """Part of the GIF's first frame that is the same in every frame: both panels below their captions
    and above the progress bar (those two change from frame to frame)."""
    frame = np.asarray(Image.open(gif_path).convert("RGB"))
    return frame[12:48]


def _screenshot(tmp_path, index):
    path = tmp_path / f"shot-{len(list(tmp_path.glob('shot-*.png')))}.png"
    _chromium(tmp_path, index.as_uri(), f"--screenshot={path}", "--window-size=1200,900", "--hide-scrollbars")
    shot = np.asarray(Image.open(path).convert("RGB"))
    assert shot.shape[:2] == (900, 1200), shot.shape
    return shot


def _found_in(shot, template):
    import cv2

    score = cv2.matchTemplate(shot, template, cv2.TM_SQDIFF_NORMED)
    return float(score.min()) < 0.01


def test_page_renders_gifs_in_chromium(tmp_path):
    out = pathlib.Path(make_page(tmp_path)[2])
    index = out / "index.html"

    rows = _rendered_rows(tmp_path, index)
    assert sorted(rows) == sorted(e[0] for e in EXPECTED)
    for gif, video, exp_id, text, score in EXPECTED:
        row = rows[gif]
        assert row["cells"][:4] == [video, exp_id, text, score], row
        assert row["img"].get("data-loaded") == "1", f"{gif} did not decode in chromium: {row}"
        assert "missing" not in row["cells"][4], row

    templates = {gif: _panel(out / gif) for gif, *_ in EXPECTED}
    assert not np.array_equal(*templates.values())
    shot = _screenshot(tmp_path, index)
    colours = np.unique(shot.reshape(-1, 3), axis=0)
    assert len(colours) > 20, f"screenshot looks blank: {len(colours)} distinct colours"
    for gif, template in templates.items():
        assert _found_in(shot, template), f"{gif} not visible in the screenshot"

    # Negative control: a GIF that is gone is reported as not loaded, and is not in the screenshot.
    os.remove(out / "gifs" / "vid" / "1.gif")
    rows = _rendered_rows(tmp_path, index)
    assert rows["gifs/vid/0.gif"]["img"].get("data-loaded") == "1"
    assert rows["gifs/vid/1.gif"]["img"].get("data-loaded") == "0", rows["gifs/vid/1.gif"]
    assert "missing: gifs/vid/1.gif" in rows["gifs/vid/1.gif"]["cells"][4]
    shot = _screenshot(tmp_path, index)
    assert _found_in(shot, templates["gifs/vid/0.gif"])
    assert not _found_in(shot, templates["gifs/vid/1.gif"])
