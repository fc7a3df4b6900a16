"""Qualitative check of predictions: one GIF per (video, expression) with the predicted mask (and the
ground truth, side by side, when the split has it) over the frames, plus an index.html page."""
from __future__ import annotations

import csv
import html
import io
import json
import os
import warnings

import cv2
import numpy as np
from PIL import Image, ImageDraw

from projects.sasasa2va.utils.io import atomic_write_bytes, atomic_write_text

PRED_COLOR = (255, 64, 64)
GT_COLOR = (64, 200, 64)


def overlay(frame: np.ndarray, mask: np.ndarray, color=PRED_COLOR, alpha: float = 0.45) -> np.ndarray:
    """Tint the mask area and outline it, so both the extent and the edge stay visible."""
    out = frame.astype(np.float32).copy()
    m = np.asarray(mask) != 0
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, dtype=np.float32)
    out = out.astype(np.uint8)
    if m.any():
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), 1)
    return out


def _fit(h: int, w: int, max_side: int) -> tuple[int, int]:
    s = min(1.0, max_side / max(h, w))
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


def compose_frame(frame: np.ndarray, pred: np.ndarray, gt: np.ndarray | None = None, max_side: int = 480,
                  caption: str = "", progress: float | None = None) -> Image.Image:
    """[prediction | ground truth] panel, downscaled so each half's longest side is <= max_side.

    A progress bar under the panels (and the caption, e.g. a frame counter) keeps consecutive GIF
    frames distinct; Pillow merges identical frames, and the GIF would lose its one-frame-per-frame
    correspondence with the video.
    """
    h, w = _fit(frame.shape[0], frame.shape[1], max_side)
    small = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)

    def resize_mask(m):
        return cv2.resize((np.asarray(m) != 0).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0

    panels = [("pred", overlay(small, resize_mask(pred), PRED_COLOR))]
    if gt is not None:
        panels.append(("GT", overlay(small, resize_mask(gt), GT_COLOR)))
    images = []
    for label, arr in panels:
        im = Image.fromarray(arr)
        draw = ImageDraw.Draw(im)
        text = f"{label} {caption}".strip()
        draw.rectangle([0, 0, min(w - 1, 6 * len(text) + 5), 11], fill=(0, 0, 0))
        draw.text((2, 0), text, fill=(255, 255, 255))
        images.append(np.asarray(im))
    canvas = np.concatenate(images, axis=1)
    if progress is not None:
        bar = np.zeros((4, canvas.shape[1], 3), np.uint8)
        bar[:, : max(1, int(round(progress * canvas.shape[1])))] = 255
        canvas = np.concatenate([canvas, bar], axis=0)
    return Image.fromarray(canvas)


def gif_frame(frame: Image.Image) -> Image.Image:
    """An RGB frame in 256 colours by fast octree: ~1 ms for a 480x270 frame, where Pillow's GIF writer
    quantizes by median cut (~45 ms, ~80 % of a 200-frame demo's wall time on a CPU) -- a mean error of
    ~3 of 255 instead of ~2, invisible in an overlay preview."""
    if frame.mode != "RGB":
        return frame
    return frame.quantize(256, method=Image.Quantize.FASTOCTREE)


def write_gif(frames: list[Image.Image], out_path: str, fps: float = 8.0) -> None:
    """Looping GIF written atomically (encode in memory, then rename)."""
    if not frames:
        raise ValueError(f"{out_path}: no frames to write")
    frames = [gif_frame(f) for f in frames]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:],
                   duration=int(round(1000 / fps)), loop=0)
    atomic_write_bytes(out_path, buf.getvalue())


_METRICS = "the per-expression CSV (columns video, exp_id, J&F) or JSON ({'rows': [...]}) of tools/eval_mevis.py"


def load_metrics(path: str) -> dict[tuple[str, str], float]:
    """{(video, exp_id): J&F} from the per-expression CSV or the JSON written by tools/eval_mevis.py; any other
    file is refused naming it and what was expected (csv / json alone would not say which file failed)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: metrics file not found")
    try:
        with open(path, "r", encoding="utf-8", newline="") as f:
            if path.lower().endswith(".json"):
                data = json.load(f)
                rows = data.get("rows") if isinstance(data, dict) else data
                if not isinstance(rows, list):
                    raise ValueError(f"{path}: expected a list of per-expression rows under 'rows'")
            else:
                reader = csv.DictReader(f)
                rows = list(reader)
                if reader.fieldnames is None:
                    raise ValueError(f"{path}: empty; expected {_METRICS}")
                if not {"video", "exp_id", "J&F"} <= set(reader.fieldnames):  # (even with no rows)
                    raise ValueError(f"{path}: rows need 'video', 'exp_id' and 'J&F' columns, got "
                                     f"{sorted(reader.fieldnames)}; expected {_METRICS}")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; expected {_METRICS}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {_METRICS}") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable CSV ({e}); expected {_METRICS}") from None
    out = {}
    for k, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: row {k}: expected an object with 'video', 'exp_id' and 'J&F', got "
                             f"{type(r).__name__}")
        if "video" not in r or "exp_id" not in r or "J&F" not in r:
            raise ValueError(f"{path}: rows need 'video', 'exp_id' and 'J&F' columns, got {sorted(map(str, r))}")
        try:
            score = float(r["J&F"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}: row {k}: 'J&F' must be a number, got {r['J&F']!r}") from None
        out[(str(r["video"]), str(r["exp_id"]))] = score
    return out


def _sample(num: int, max_frames: int | None) -> list[int]:
    if not max_frames or num <= max_frames:
        return list(range(num))
    return sorted({int(round(x)) for x in np.linspace(0, num - 1, max_frames)})


# Marks each GIF <img> with data-loaded="1" once it has decoded (naturalWidth > 0) or "0" when it could not
# be loaded, and then shows a "missing: <path>" note under it. Lazy images below the fold get their mark
# when they load; tests/test_visualize_browser.py reads these marks from headless Chromium's DOM.
_LOAD_CHECK_SCRIPT = """<script>
(function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll("img.gif"));
  function mark(img) {
    var ok = img.complete && img.naturalWidth > 0;
    img.setAttribute("data-loaded", ok ? "1" : "0");
    var note = img.parentNode.querySelector(".missing");
    if (ok && note) { note.remove(); }
    if (!ok && !note) {
      note = document.createElement("span");
      note.className = "missing";
      note.textContent = "missing: " + img.getAttribute("src");
      img.parentNode.appendChild(note);
    }
  }
  imgs.forEach(function (img) {
    img.addEventListener("load", function () { mark(img); });
    img.addEventListener("error", function () { mark(img); });
  });
  window.addEventListener("load", function () {
    imgs.forEach(function (img) { if (img.complete) { mark(img); } });
  });
})();
</script>
"""


def write_index(items: list[dict], out_path: str, title: str = "SaSaSa2VA predictions") -> None:
    """index.html: one row per GIF with video, expression id, text and (if known) J&F."""
    has_score = any(it.get("J&F") is not None for it in items)
    head = "<tr><th>video</th><th>exp</th><th>expression</th>" + ("<th>J&amp;F</th>" if has_score else "") \
        + "<th>prediction (red) | ground truth (green)</th></tr>"
    rows = []
    for it in items:
        score = ""
        if has_score:
            score = "<td>{}</td>".format("" if it.get("J&F") is None else f"{100 * it['J&F']:.2f}")
        rows.append("<tr><td>{}</td><td>{}</td><td>{}</td>{}<td><img class=\"gif\" src=\"{}\" alt=\"{}\" "
                    "loading=\"lazy\"></td></tr>".format(
                        html.escape(it["video"]), html.escape(it["exp_id"]), html.escape(it["text"]), score,
                        html.escape(it["gif"], quote=True),
                        html.escape(f"{it['video']}/{it['exp_id']}", quote=True)))
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>"
            "<style>body{{font-family:sans-serif}}td{{vertical-align:top;padding:4px}}"
            "table{{border-collapse:collapse}}tr{{border-bottom:1px solid #ccc}}"
            ".missing{{display:block;color:#b00;font-weight:bold}}</style></head>\n"
            "<body><h1>{t}</h1><table>\n{h}\n{r}\n</table>\n{s}</body></html>\n").format(
        t=html.escape(title), h=head, r="\n".join(rows), s=_LOAD_CHECK_SCRIPT)
    atomic_write_text(out_path, page)


def visualize_split(split_dir: str, results_path: str, out_dir: str, max_expressions: int | None = None,
                    metrics_path: str | None = None, max_side: int = 480, fps: float = 8.0,
                    max_frames: int | None = None) -> list[dict]:
    """GIFs under out_dir/gifs/<video>/<exp_id>.gif and out_dir/index.html; returns the listed items.

    Expressions follow the split's order; those absent from results.json are skipped with a warning;
    results holding expressions the split lacks are refused (another split's).
    """
    from projects.sasasa2va.datasets.readers import expression_masks, load_mask_dict, read_meta_expressions
    from projects.sasasa2va.evaluation.results_io import check_results_in_split, entry_masks, read_results

    meta = os.path.join(split_dir, "meta_expressions.json")
    if not os.path.isfile(meta):
        raise FileNotFoundError(f"{meta}: meta_expressions.json not found in split dir {split_dir!r}")
    records = read_meta_expressions(meta, os.path.join(split_dir, "JPEGImages"), allow_empty_text=True)
    results, _ = read_results(results_path)
    check_results_in_split(results, records, results_path, meta)
    mask_dict = None
    for name in ("mask_dict.json", "mask_dict.pkl"):
        if os.path.isfile(os.path.join(split_dir, name)):
            mask_dict = load_mask_dict(os.path.join(split_dir, name))
            break
    scores = load_metrics(metrics_path) if metrics_path else {}
    items: list[dict] = []
    for vid, rec in records.items():
        for eid, exp in rec.expressions.items():
            if max_expressions is not None and len(items) >= max_expressions:
                break
            entry = (results.get(vid) or {}).get(eid)
            if entry is None:
                warnings.warn(f"{vid}/{eid}: not in {results_path}; skipped", stacklevel=2)
                continue
            idx = _sample(rec.num_frames, max_frames)
            first = np.asarray(Image.open(rec.frame_path(0)).convert("RGB"))
            h, w = first.shape[:2]
            pred = entry_masks(entry, h, w, where=f"{results_path}: {vid}/{eid}")
            if pred.shape[0] != rec.num_frames:
                raise ValueError(f"{results_path}: {vid}/{eid} has {pred.shape[0]} masks for "
                                 f"{rec.num_frames} frames")
            gt = expression_masks(rec, eid, mask_dict, frame_indices=idx) if mask_dict is not None else None
            frames = []
            for k, i in enumerate(idx):
                img = np.asarray(Image.open(rec.frame_path(i)).convert("RGB"))
                frames.append(compose_frame(img, pred[i], None if gt is None else gt[k], max_side,
                                            caption=f"{i + 1}/{rec.num_frames}",
                                            progress=(i + 1) / rec.num_frames))
            rel = f"gifs/{vid}/{eid}.gif"
            write_gif(frames, os.path.join(out_dir, rel), fps)
            items.append({"video": vid, "exp_id": eid, "text": exp.text, "gif": rel,
                          "num_frames": len(frames), "J&F": scores.get((vid, eid))})
        if max_expressions is not None and len(items) >= max_expressions:
            break
    write_index(items, os.path.join(out_dir, "index.html"))
    return items
