"""Synthetic generator: every layout reads back with the readers, masks sit on the drawn shapes,
expressions are unambiguous, and the same seed gives byte-identical files."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from projects.sasasa2va.datasets import synthetic as S
from projects.sasasa2va.datasets.readers import (
    annotation_mask,
    expression_masks,
    load_frame,
    load_mask_dict,
    load_refsav_sample,
    read_meta_expressions,
    read_refcoco,
    read_refsav,
    read_refytvos,
    read_selected_frames,
)

SMALL = dict(num_train_videos=3, num_valid_u_videos=3, num_valid_videos=2, num_revos_videos=2,
             num_rvos_videos=2, num_sav_videos=2, num_images=4, min_frames=5, max_frames=9)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = S.generate_all(str(root), seed=3, **SMALL)
    return root, summary


def _saturation(pixels: np.ndarray) -> float:
    """Mean (max - min) over RGB: high on the saturated shapes, low on the grey background."""
    p = pixels.astype(int)
    return float((p.max(-1) - p.min(-1)).mean())


def _tree_digest(root) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_layout_and_summary(synth):
    root, summary = synth
    for rel in [
        "mevis/train/meta_expressions.json", "mevis/train/mask_dict.json", "mevis/valid_u/mask_dict.json",
        "mevis/valid/meta_expressions.json", "mevis_q_frame/valid/selected_frames.json",
        "mevis_q_frame/valid_u/selected_frames.json", "revos/meta_expressions_train_.json", "revos/mask_dict.json",
        "rvos/meta_expressions/train/meta_expressions.json", "rvos/mask_dict.pkl", "Ref-SAV.json",
        "ref_seg/refcoco/instances.json", "ref_seg/refcoco/refs(unc).p", "ref_seg/refcoco+/refs(unc).p",
        "ref_seg/refcocog/refs(umd).p", "synthetic_info.json",
    ]:
        assert (root / rel).is_file(), rel
    assert not (root / "mevis/valid/mask_dict.json").exists()  # like the real split: GT hidden
    assert summary["mevis"]["train"]["videos"] == 3 and summary["mevis"]["valid"]["videos"] == 2
    lo, hi = summary["object_size_frac_of_short_side"]
    assert 0.2 <= lo <= hi <= 0.33
    assert not list(root.rglob(".tmp_*"))  # atomic writes left nothing behind


@pytest.mark.parametrize("split", ["train", "valid_u"])
def test_mevis_masks_match_frames(synth, split):
    root, _ = synth
    base = root / "mevis" / split
    recs = read_meta_expressions(str(base / "meta_expressions.json"), str(base / "JPEGImages"),
                                 require_anno_id=True, check_frames=True)
    md = load_mask_dict(str(base / "mask_dict.json"))
    for rec in recs.values():
        assert 5 <= rec.num_frames <= 9
        frames = np.stack([np.asarray(load_frame(rec, i)) for i in range(rec.num_frames)])
        targets = set()
        for e in rec.expressions.values():
            assert e.text.strip() and e.anno_ids
            targets.update(e.obj_ids)
            m = expression_masks(rec, e.exp_id, md)
            assert m.shape == frames.shape[:3] and m.any()
            assert _saturation(frames[m]) > 120  # the mask sits on a saturated shape
            if len(e.anno_ids) == 2:  # OR over two anno ids
                a = expression_masks(rec, e.exp_id, {k: md[k] for k in e.anno_ids[:1]} | {e.anno_ids[1]: [None] * rec.num_frames})
                assert a.sum() < m.sum()
        # every object is somebody's target, so ignoring the expression cannot work
        n_obj = max(targets) + 1
        assert targets == set(range(n_obj))
        union = np.zeros(frames.shape[:3], bool)
        for e in rec.expressions.values():
            union |= expression_masks(rec, e.exp_id, md)
        assert _saturation(frames[~union]) < 40  # everything outside the objects is grey background


MOTION_MEANING = {  # phrase -> the property it names, derived below from each object's drawn geometry
    "that does not move": "static", "that stays still": "static",
    "that leaves the frame": "leaves", "that moves out of the view": "leaves",
    "that appears later": "late", "that shows up in the middle of the video": "late",
    **{f"{verb} {word}": d for d, word in (("left", "to the left"), ("right", "to the right"), ("up", "up"),
                                          ("down", "down"))
       for verb in ("moving", "that keeps moving", "that moves")},
}


def _observed_motion(scene) -> list[set]:
    """Per object, what its pixels do over the video (drawn without occlusion, the labels on the
    object not used): its direction or 'static', 'leaves' (gone at the end), 'late' (absent at first)."""
    out = []
    for o in scene.objects:
        centres = []
        for t in range(scene.num_frames):
            u = t / (scene.num_frames - 1)
            m = S._raster(S.shape_polygon(o.shape, *o.center(u), o.size, o.rotation), scene.height, scene.width) \
                if o.drawn(u) else np.zeros((scene.height, scene.width), bool)
            ys, xs = np.nonzero(m)
            centres.append((xs.mean(), ys.mean()) if len(xs) else None)
        seen = [c for c in centres if c is not None]
        dx, dy = seen[-1][0] - seen[0][0], seen[-1][1] - seen[0][1]
        props = {"static"} if max(abs(dx), abs(dy)) < 1 else \
            {("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")}
        if centres[-1] is None:
            props.add("leaves")
        elif "static" not in props and centres[-1] == centres[-2]:
            props.add("stops")  # moved, then still over the last frames
        if centres[0] is None:
            props.add("late")
        out.append(props)
    return out


def test_expressions_are_unambiguous():
    """Each generated expression names exactly its targets among all objects of the scene: appearance
    words by the objects' colours and shapes, motion phrases by what the objects' pixels do."""
    opts = S.SyntheticOptions()
    n_exp, n_app, multi, n_motion_only = 0, 0, 0, 0
    for i in range(40):
        rng = S._rng(7, "check", i)
        scene = S.make_scene(rng, "v", opts)
        exps = S.make_expressions(scene, rng, 0.5)
        assert 2 <= len(scene.objects) <= 4 and len({(o.color, o.shape) for o in scene.objects}) == len(scene.objects)
        multi += len(scene.objects) >= 3
        observed = _observed_motion(scene) if scene.num_frames > 1 else None
        for e in exps:
            n_exp += 1
            n_app += e.kind == "appearance"
            words = e.text.split()
            colors = [c for c in S.COLORS if c in words]
            shapes = [s for s in S.SHAPES if s in words or S.PLURAL[s] in words]
            match = [o.obj_id for o in scene.objects
                     if all(o.color == c for c in colors) and all(o.shape == s for s in shapes)]
            if e.kind == "motion":
                stops = e.text.endswith(" and then stops")
                text = e.text[:-len(" and then stops")] if stops else e.text
                phrase = max((ph for ph in MOTION_MEANING if text.endswith(" " + ph)), key=len)
                match = [k for k in match if MOTION_MEANING[phrase] in observed[k]]
                assert not stops or all("stops" in observed[k] for k in e.obj_ids), e.text
                n_motion_only += not colors
            assert sorted(e.obj_ids) == match, (e.text, [(o.color, o.shape) for o in scene.objects], observed)
    assert n_app / n_exp > 0.5 and multi > 20 and n_motion_only > 5


def test_qframe_files(synth):
    root, _ = synth
    for split in ("valid", "valid_u"):
        base = root / "mevis" / split
        recs = read_meta_expressions(str(base / "meta_expressions.json"), str(base / "JPEGImages"))
        sel = read_selected_frames(str(root / "mevis_q_frame" / split / "selected_frames.json"), recs)
        for vid, rec in recs.items():
            for lst in sel[vid].values():
                assert lst == sorted(lst) and set(lst) == set(range(rec.num_frames))


def test_qframe_indices_rules():
    rng = np.random.default_rng(0)
    vis = [False] * 30 + [True] * 10
    s = S.qframe_indices(vis, rng)
    assert len(s) == 100 and s == sorted(s) and set(s) == set(range(40))
    assert sum(i >= 30 for i in s) > sum(i < 10 for i in s)  # favours visible frames
    s = S.qframe_indices([True] * 100, rng)
    assert s == list(range(100))
    s = S.qframe_indices([i % 2 == 0 for i in range(150)], rng)
    assert len(s) == 100 == len(set(s)) and s == sorted(s) and max(s) < 150


def test_long_videos_100_and_more(tmp_path):
    S.generate_all(str(tmp_path), seed=1, formats="mevis,qframe", num_train_videos=0, num_valid_u_videos=0,
                   num_valid_videos=0, extra_lengths=(100, 103), sizes="96x64")
    base = tmp_path / "mevis" / "valid_u"
    recs = read_meta_expressions(str(base / "meta_expressions.json"), str(base / "JPEGImages"), require_anno_id=True)
    assert sorted(r.num_frames for r in recs.values()) == [100, 103]
    sel = read_selected_frames(str(tmp_path / "mevis_q_frame" / "valid_u" / "selected_frames.json"), recs)
    for vid, rec in recs.items():
        for lst in sel[vid].values():
            assert len(set(lst)) == 100 and (rec.num_frames > 100 or lst == list(range(100)))
    assert not (tmp_path / "revos").exists()


def test_revos_and_rvos(synth):
    root, _ = synth
    recs = read_meta_expressions(str(root / "revos" / "meta_expressions_train_.json"),
                                 str(root / "revos" / "JPEGImages"), require_anno_id=True, check_frames=True)
    md = load_mask_dict(str(root / "revos" / "mask_dict.json"))
    for vid, rec in recs.items():
        assert "/" in vid  # relative sub-path keys like the real ReVOS
        for e in rec.expressions.values():
            assert expression_masks(rec, e.exp_id, md).any()
    recs, md = read_refytvos(str(root / "rvos" / "meta_expressions" / "train" / "meta_expressions.json"),
                             str(root / "rvos" / "train" / "JPEGImages"), str(root / "rvos" / "mask_dict.pkl"))
    k = 0
    for rec in recs.values():
        assert rec.frame_names[1] == "00005"  # every-5th-frame stems
        frames = np.stack([np.asarray(load_frame(rec, i)) for i in range(rec.num_frames)])
        for e in rec.expressions.values():
            assert e.anno_ids == [str(k)] and len(e.obj_ids) == 1
            m = expression_masks(rec, e.exp_id, md)
            assert _saturation(frames[m]) > 120
            k += 1
    assert k == len(md)


def test_refsav(synth):
    root, _ = synth
    recs = read_refsav(str(root / "Ref-SAV.json"), str(root / "sam_v_full"))
    assert len(recs) == 2
    for rec in recs:
        frames, masks = load_refsav_sample(rec)
        anno = json.load(open(rec.anno_path))
        assert len(frames) == len(anno["masklet"]) == -(-anno["video_frame_count"] // 4)
        for oid, m in masks.items():
            vis = m.any(axis=(1, 2))
            f = np.stack(frames)
            assert _saturation(f[m]) > 90  # mp4 is lossy; still clearly on the shape
            assert vis.any()


def test_refcoco(synth):
    root, summary = synth
    seen_kinds = set()
    for name, refs_file in S.REFCOCO_SETS:
        imgs = read_refcoco(str(root / "ref_seg" / name), refs_file)
        assert imgs and sum(len(i.instances) for i in imgs) == summary["refcoco"]["train_refs_per_set"]
        from PIL import Image

        for im in imgs:
            pix = np.asarray(Image.open(im.image_path).convert("RGB"))
            assert pix.shape == (im.height, im.width, 3)
            for inst in im.instances:
                seen_kinds.add(type(inst.segmentation).__name__ if isinstance(inst.segmentation, list)
                               else type(inst.segmentation["counts"]).__name__)
                m = annotation_mask(inst.segmentation, im.height, im.width)
                assert m.any() and _saturation(pix[m]) > 120
                assert all(s.strip() for s in inst.sentences)
    assert "list" in seen_kinds  # polygons present


def test_determinism(tmp_path):
    opts = dict(SMALL, num_train_videos=2, num_valid_u_videos=1, num_valid_videos=1, num_images=3)
    S.generate_all(str(tmp_path / "a"), seed=5, **opts)
    S.generate_all(str(tmp_path / "b"), seed=5, **opts)
    S.generate_all(str(tmp_path / "c"), seed=6, **opts)
    da, db, dc = (_tree_digest(tmp_path / x) for x in "abc")
    assert da == db and any(f.endswith(".jpg") for f in da) and any(f.endswith(".mp4") for f in da)
    assert da != dc
    # rerunning into the same folder with shorter videos drops stale frames
    S.generate_all(str(tmp_path / "a"), seed=5, **dict(opts, min_frames=3, max_frames=3))
    recs = read_meta_expressions(str(tmp_path / "a/mevis/train/meta_expressions.json"),
                                 str(tmp_path / "a/mevis/train/JPEGImages"))
    for rec in recs.values():
        assert sorted(os.listdir(rec.frame_dir)) == [n + ".jpg" for n in rec.frame_names]


def test_bad_options(tmp_path):
    with pytest.raises(TypeError, match="unknown options"):
        S.generate_all(str(tmp_path), num_trian_videos=1)
    with pytest.raises(ValueError, match="min_frames"):
        S.generate_all(str(tmp_path), min_frames=10, max_frames=5)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        S.parse_sizes("320by180")
    with pytest.raises(ValueError, match="unknown formats"):
        S.generate_all(str(tmp_path), formats="mevis,kitti")


def test_cli(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_synthetic_data", os.path.join(os.path.dirname(__file__), "..", "tools", "make_synthetic_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    assert "--num-valid-u-videos" in capsys.readouterr().out
    rc = mod.main(["--root", str(tmp_path), "--quiet", "--formats", "mevis", "--num-train-videos", "1",
                   "--num-valid-u-videos", "1", "--num-valid-videos", "0", "--min-frames", "3",
                   "--max-frames", "4", "--sizes", "64x48"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mevis"]["train"]["videos"] == 1 and out["mevis"]["train"]["sizes"] == ["64x48"]
    assert mod.main(["--root", str(tmp_path), "--quiet", "--max-objects", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--max-objects" in err and "other settings" not in err
    # the same settings again: regenerated; other settings: refused without --force, and --force leaves no
    # video of the earlier data behind
    small = ["--root", str(tmp_path), "--quiet", "--formats", "mevis", "--num-valid-u-videos", "1",
             "--num-valid-videos", "0", "--min-frames", "3", "--max-frames", "4", "--sizes", "64x48"]
    assert mod.main(small + ["--num-train-videos", "1"]) == 0
    capsys.readouterr()
    assert mod.main(small + ["--num-train-videos", "2"]) == 2
    assert "made with other settings (num_train_videos differ" in capsys.readouterr().err
    assert len(os.listdir(tmp_path / "mevis" / "train" / "JPEGImages")) == 1
    (tmp_path / "notes.txt").write_text("mine")
    assert mod.main(small + ["--num-train-videos", "2", "--force"]) == 0
    assert mod.main(small + ["--num-train-videos", "1", "--force"]) == 0
    assert len(os.listdir(tmp_path / "mevis" / "train" / "JPEGImages")) == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the generator's own entries are replaced
    assert mod.main(["--root", str(tmp_path / "notes.txt"), "--quiet"]) == 2
    # --force killed while removing the earlier data: the record (synthetic_info.json) went first, so what is
    # left is never taken for complete data
    capsys.readouterr()
    real_rmtree = mod.shutil.rmtree

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt

    mod.shutil.rmtree = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            mod.main(small + ["--num-train-videos", "2", "--force"])
    finally:
        mod.shutil.rmtree = real_rmtree
    assert not (tmp_path / "synthetic_info.json").exists() and (tmp_path / "mevis").is_dir()


def test_expression_kind_reads_how_the_text_picks_its_target():
    assert S.expression_kind("the red circle moving up", 1) == "colour"
    assert S.expression_kind("the star that is yellow.", 1) == "colour"
    assert S.expression_kind("the only triangle", 1) == "shape"
    assert S.expression_kind("the object that keeps moving to the left", 1) == "motion-only"
    assert S.expression_kind("the two red objects", 2) == "plural"
    assert set(S.EXPRESSION_KINDS) == {"colour", "shape", "motion-only", "plural"}
    rng = np.random.default_rng(3)  # every kind occurs in a generated split
    kinds = set()
    for i in range(12):
        scene = S.make_scene(rng, f"v{i}", S.SyntheticOptions())
        kinds |= {S.expression_kind(e.text, len(e.obj_ids)) for e in S.make_expressions(scene, rng)}
    assert kinds == set(S.EXPRESSION_KINDS)
