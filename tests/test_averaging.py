"""Selective averaging (spec evaluation.md §3.3, §11.3): probability store, weighted / binary ensembles,
greedy forward selection and the select_modes CLI, on synthetic runs."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from projects.sasasa2va.datasets.rle import encode_mask
from projects.sasasa2va.evaluation import averaging as avg
from projects.sasasa2va.evaluation.results_io import make_entry, read_results, write_results
from projects.sasasa2va.metrics import evaluate_split, jf_from_masks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W, T = 20, 28, 3


def square(r0, c0, size):
    m = np.zeros((H, W), dtype=bool)
    m[r0:r0 + size, c0:c0 + size] = True
    return m


def make_split(root, gts):
    """gts: {(vid, eid): bool [T,H,W]} -> split folder with JPEGs, meta_expressions.json, mask_dict.json."""
    meta, mask_dict = {"videos": {}}, {}
    for k, ((vid, eid), gt) in enumerate(gts.items()):
        frames = [f"{i:05d}" for i in range(gt.shape[0])]
        if vid not in meta["videos"]:
            os.makedirs(os.path.join(root, "JPEGImages", vid))
            for f in frames:
                Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(os.path.join(root, "JPEGImages", vid, f + ".jpg"))
            meta["videos"][vid] = {"frames": frames, "expressions": {}}
        meta["videos"][vid]["expressions"][eid] = {"exp": f"thing {eid}", "obj_id": [0], "anno_id": [str(k)]}
        mask_dict[str(k)] = [encode_mask(g) if g.any() else None for g in gt]
    json.dump(meta, open(os.path.join(root, "meta_expressions.json"), "w"))
    json.dump(mask_dict, open(os.path.join(root, "mask_dict.json"), "w"))
    return root


GT = {("v1", "0"): np.stack([square(3, 3, 8)] * T), ("v1", "1"): np.stack([square(10, 15, 6)] * T),
      ("v2", "0"): np.stack([square(5, 10, 7)] * T)}


def probs_missing_frame(gt, miss):
    """Confident (0.9 / 0.1) on every frame except `miss`, where the object gets only 0.2."""
    p = np.where(gt, 0.9, 0.1).astype(np.float32)
    p[miss][gt[miss]] = 0.2
    return p


@pytest.fixture()
def world(tmp_path):
    split = make_split(str(tmp_path / "valid_u"), GT)
    runs = {}
    garbage = np.zeros((H, W), bool)
    garbage[:4, :] = True
    makers = {
        "uniform": lambda g: probs_missing_frame(g, 0),          # A: misses frame 0
        "q_frame": lambda g: probs_missing_frame(g, 1),          # B: misses frame 1
        "wrap_around": lambda g: probs_missing_frame(g, 2),      # C: misses frame 2
        "junk": lambda g: np.where(garbage[None] | np.zeros_like(g), 0.9, 0.1).astype(np.float32),
    }
    for name, fn in makers.items():
        d = str(tmp_path / "runs" / name)
        for (vid, eid), g in GT.items():
            avg.save_probs(d, vid, eid, fn(g))
        runs[name] = d
    return {"split": split, "runs": runs, "root": str(tmp_path / "runs"), "tmp": tmp_path}


def score(masks_by_key):
    vals = [jf_from_masks(GT[k], m) for k, m in masks_by_key.items()]
    return np.mean([(j + f) / 2 for j, f in vals])


def test_quantize_probs_edge_values():
    """round(255 p) with ties to even, NaN -> 0, +-inf and out-of-range values clipped, any float dtype
    (rounded in float32), bool -> 0/255, uint8 kept; checked against the plain float32 formula."""
    def plain(p):
        p = np.nan_to_num(np.asarray(p).astype(np.float32), nan=0.0)
        with np.errstate(over="ignore"):
            return np.clip(np.rint(p * np.float32(255.0)), 0, 255).astype(np.uint8)

    edge = [np.nan, np.inf, -np.inf, -0.3, 0.0, 0.5 / 255, 1.5 / 255, 2.5 / 255, 0.5, 1.0, 1.7, 3e38, -3e38]
    got = avg.quantize_probs(np.array(edge, dtype=np.float32))
    assert got.tolist() == [0, 255, 0, 0, 0, 0, 2, 2, 128, 255, 255, 255, 0]  # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    rng = np.random.default_rng(3)
    for dtype in (np.float16, np.float32, np.float64):
        with np.errstate(over="ignore"):  # +-3e38 -> +-inf in float16
            p = np.concatenate([rng.normal(0.5, 0.6, 5000), (np.arange(256) + 0.5) / 255, edge]).astype(dtype)
        q = avg.quantize_probs(p.reshape(1, -1, 1))
        assert q.dtype == np.uint8 and q.shape == (1, p.size, 1)
        assert np.array_equal(q.ravel(), plain(p)), dtype
    mask = rng.random((2, 3, 4)) > 0.5
    assert np.array_equal(avg.quantize_probs(mask), mask.astype(np.uint8) * 255)
    u8 = rng.integers(0, 256, (2, 3, 4), dtype=np.uint8)
    assert avg.quantize_probs(u8) is u8


def test_store_round_trip_and_no_temp_files(world, tmp_path):
    d = str(tmp_path / "store")
    p = np.random.default_rng(0).random((2, 5, 6))
    path = avg.save_probs(d, "vid", "3", p)
    assert path == os.path.join(d, "probs", "vid", "3.npz")
    q = avg.load_probs(d, "vid", "3")
    assert q.dtype == np.uint8 and np.array_equal(q, np.rint(p * 255).astype(np.uint8))
    avg.save_probs(d, "vid", "10", q)                       # uint8 stored as is
    assert avg.list_probs(d) == [("vid", "10"), ("vid", "3")]
    assert sorted(os.listdir(os.path.join(d, "probs", "vid"))) == ["10.npz", "3.npz"]
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        avg.load_probs(d, "vid", "nope")
    with pytest.raises(ValueError):
        avg.save_probs(d, "vid", "bad", np.zeros((5, 6)))


def test_atomic_writes_get_the_umask_mode(tmp_path):
    from projects.sasasa2va.utils.io import FILE_MODE, atomic_write_text

    with open(tmp_path / "plain", "w") as f:
        f.write("x")
    atomic_write_text(str(tmp_path / "atomic"), "x")
    # a plain open() under the process umask is the reference (mkstemp alone gives 0600)
    assert os.stat(tmp_path / "atomic").st_mode & 0o777 == os.stat(tmp_path / "plain").st_mode & 0o777 == FILE_MODE


def test_atomic_write_failure_leaves_nothing(tmp_path, monkeypatch):
    d = str(tmp_path / "store")
    os.makedirs(os.path.join(d, "probs", "vid"))

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        avg.save_probs(d, "vid", "0", np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(OSError):
        write_results(str(tmp_path / "results.json"), [], {"split": "x"})
    assert os.listdir(os.path.join(d, "probs", "vid")) == []
    assert not [f for f in os.listdir(tmp_path) if f != "store"]


def test_ensemble_of_complementary_runs_beats_each_single(world):
    r = world["runs"]
    members = [r["uniform"], r["q_frame"], r["wrap_around"]]
    singles = [score({(v, e): avg.load_probs(d, v, e) > 127 for v, e in GT}) for d in members]
    ens = {(v, e): m for v, e, m in avg.ensemble(members)}
    assert set(ens) == set(GT)
    assert score(ens) == pytest.approx(1.0)
    assert max(singles) < 0.8


def test_weights_follow_the_heavier_run(world):
    r = world["runs"]
    a, b = avg.load_probs(r["uniform"], "v1", "0"), avg.load_probs(r["junk"], "v1", "0")
    heavy_a = avg.ensemble_masks([a, b], weights=[3, 1])
    heavy_b = avg.ensemble_masks([a, b], weights=[1, 3])
    assert np.array_equal(heavy_a, (0.75 * a / 255 + 0.25 * b / 255) > 0.5)
    assert np.array_equal(heavy_b[1], b[1] > 127) and not np.array_equal(heavy_a, heavy_b)
    with pytest.raises(ValueError):
        avg.ensemble_masks([a, b], weights=[1])
    with pytest.raises(ValueError):
        avg.ensemble_masks([a, b], weights=[0, 0])


def test_integer_mean_equals_the_float32_definition():
    """ensemble_masks' integer path (equal weights, uint8, > 0.5) against the float32 definition: every
    combination of values for 1-3 members, sums at and around the threshold (ties included) for 4-12 members,
    and random maps; weights or another threshold take the definition itself."""
    def both(members):
        fast = avg.ensemble_masks(members)
        slow = avg._weighted_mean_over(members, np.ones(len(members)), 0.5, "probs", 0.5)
        return fast, slow

    v = np.arange(256, dtype=np.uint8)
    grids = {1: [v], 2: [a.ravel() for a in np.meshgrid(v, v)], 3: [a.ravel() for a in np.meshgrid(v, v, v)]}
    for n, members in grids.items():
        fast, slow = both(members)
        assert np.array_equal(fast, slow), n
    rng = np.random.default_rng(0)
    for n in range(4, 13):
        q = rng.integers(0, 256, size=(400000, n), dtype=np.uint8)
        total = q.sum(1, dtype=np.int64)
        q = q[np.abs(2 * total - 255 * n) <= 6]  # the rows whose sum is within 3 of 255 n / 2
        assert len(q) > 2000
        members = [np.ascontiguousarray(q[:, j]) for j in range(n)]
        fast, slow = both(members)
        assert np.array_equal(fast, slow), n
        if n % 2 == 0:
            assert (2 * q.sum(1, dtype=np.int64) == 255 * n).any()  # ties were among them
    members = [rng.integers(0, 256, (3, 17, 29), dtype=np.uint8) for _ in range(5)]
    fast, slow = both(members)
    assert np.array_equal(fast, slow) and fast.shape == (3, 17, 29) and 0 < fast.mean() < 1
    weighted = avg.ensemble_masks(members, weights=[1, 2, 1, 1, 1])
    assert np.array_equal(weighted, avg._weighted_mean_over(members, np.array([1., 2, 1, 1, 1]), 0.5, "probs", 0.5))
    assert not np.array_equal(weighted, fast)


def test_binary_voting_differs_from_probability_mean():
    p1 = np.full((1, 2, 2), 1.0, np.float32)
    p2 = np.full((1, 2, 2), 0.4, np.float32)
    assert avg.ensemble_masks([p1, p2, p2], voting="probs").all()          # mean 0.6
    assert not avg.ensemble_masks([p1, p2, p2], voting="binary").any()     # votes 1/3
    assert avg.ensemble_masks([p1, p1, p2], voting="binary").all()         # strict majority
    with pytest.raises(ValueError):
        avg.ensemble_masks([p1], voting="median")


def test_greedy_selection_picks_the_complementary_pair(world, capsys):
    r = world["runs"]
    runs = [r["uniform"], r["q_frame"], r["junk"]]
    res = avg.greedy_select(runs, world["split"], log=print)
    assert res["names"] == ["uniform", "q_frame"]
    assert res["J&F"] == pytest.approx(1.0)
    assert [s["members"] for s in res["steps"]] == [["uniform"], ["uniform", "q_frame"],
                                                     ["uniform", "q_frame", "junk"]]
    assert len(res["steps"][0]["candidates"]) == 3 and len(res["steps"][2]["candidates"]) == 1
    assert res["steps"][2]["J&F"] < res["steps"][1]["J&F"]
    out = capsys.readouterr().out
    assert "step 1" in out and "step 3" in out
    assert "junk" in res["table"] and res["table"].count("*") == 3


def test_greedy_ties_go_to_fewer_members(world, tmp_path):
    r = world["runs"]
    twin = str(tmp_path / "twin" / "uniform_copy")
    for v, e in GT:
        avg.save_probs(twin, v, e, avg.load_probs(r["uniform"], v, e))
    res = avg.greedy_select([r["uniform"], twin], world["split"], max_members=2)
    assert res["names"] == ["uniform"]
    assert res["steps"][1]["J&F"] == pytest.approx(res["steps"][0]["J&F"])


def test_greedy_needs_complete_runs(world, tmp_path):
    part = str(tmp_path / "partial")
    avg.save_probs(part, "v1", "0", np.zeros((T, H, W)))
    with pytest.raises(ValueError, match="lacks"):
        avg.greedy_select([world["runs"]["uniform"], part], world["split"])


def test_default_members_are_the_five_modes_present(world):
    runs = avg.discover_runs([world["root"]])
    assert [avg.run_name(x) for x in runs] == ["junk", "q_frame", "uniform", "wrap_around"]
    assert [avg.run_name(x) for x in avg.default_members(runs)] == ["uniform", "q_frame", "wrap_around"]


def test_modes_match_frame_sampling():
    from projects.sasasa2va.hf.models import frame_sampling as fs

    assert avg.MODES == tuple(fs.MODES)


def test_write_ensemble_results_and_score(world, tmp_path):
    r = world["runs"]
    out = str(tmp_path / "ens" / "results.json")
    meta = avg.write_ensemble_results([r["uniform"], r["q_frame"], r["wrap_around"]], out, world["split"])
    res, m = read_results(out)
    assert m["num_expressions"] == 3 and m["num_videos"] == 2 and m["mode"] == "ensemble"
    assert meta["members"] == ["uniform", "q_frame", "wrap_around"]
    e = res["v1"]["1"]
    assert e["frames"] == ["00000", "00001", "00002"] and e["status"] == "ok" and e["index"] == 1
    assert e["exp"] == "<image>\nPlease segment thing 1."
    assert evaluate_split(world["split"], results_path=out)["J&F"] == pytest.approx(1.0)
    assert [f for f in os.listdir(tmp_path / "ens")] == ["results.json"]
    foreign = tmp_path / "foreign"  # a run holding an expression the split lacks: another split's
    shutil.copytree(r["uniform"], foreign)
    avg.save_probs(str(foreign), "v1", "99", avg.load_probs(str(foreign), "v1", "1"))
    with pytest.raises(ValueError, match=r"has 1 expression\(s\) that .* does not, e.g. v1/99: a run of another"):
        avg.write_ensemble_results([r["q_frame"], str(foreign)], str(tmp_path / "ens2" / "results.json"),
                                   world["split"], allow_incomplete=True)
    assert not (tmp_path / "ens2").exists()


def test_agreeing_members_drop_the_run_that_lost_the_object():
    """Per-expression selection (spec §3.3 (c)): a member whose mask misses the consensus is left out, so it
    cannot pull the others' uncertain frames below the threshold; nothing dropped means the plain mean."""
    gt = GT[("v1", "0")]
    garbage = np.zeros_like(gt)
    garbage[:, 14:, :] = True                                          # away from the object (rows 3-10)
    members = [avg.quantize_probs(probs_missing_frame(gt, 0)), avg.quantize_probs(probs_missing_frame(gt, 1)),
               avg.quantize_probs(np.where(garbage, 0.9, 0.1))]
    plain = avg.ensemble_masks(members)
    assert not plain[0][gt[0]].any() and not plain[1][gt[1]].any()  # 0.2 + 0.9 + 0.1 < 1.5 on the lost frames
    assert avg.agreeing_members(members, min_iou=0.5) == [0, 1]
    kept = avg.ensemble_masks(members[:2])
    assert np.array_equal(kept, gt)                                    # 0.2 + 0.9 > 1.0: both frames back
    for off in (None, 0.0):
        assert avg.agreeing_members(members, min_iou=off) == [0, 1, 2]
    assert avg.agreeing_members(members, min_iou=1.0) == [0, 1, 2]    # none reaches the consensus: all kept
    assert avg.agreeing_members(members[2:], min_iou=0.9) == [0]      # a lone member is its own consensus
    one_frame = [m[:1] for m in members]  # frame 0 alone: the consensus is empty, like member 0's mask (IoU 1)
    assert avg.agreeing_members(one_frame, min_iou=0.5) == [0]
    # 45 frames (two chunks of _CHUNK): the IoUs over the whole expression decide, as computed here at once
    rng = np.random.default_rng(5)
    noisy = [np.clip(rng.normal(0.5, 0.3, (45, H, W)) + 0.15 * k, 0, 1) for k in range(4)]
    consensus = np.mean(noisy, axis=0) > 0.5
    ious = [(np.count_nonzero((p > 0.5) & consensus) / np.count_nonzero((p > 0.5) | consensus)) for p in noisy]
    for cut in sorted(ious):
        assert avg.agreeing_members(noisy, min_iou=cut) == [i for i, v in enumerate(ious) if v >= cut], (cut, ious)


def test_min_iou_scored_as_applied(world, tmp_path):
    """greedy_select's score of a set with min_iou is what applying the set with min_iou scores."""
    r = world["runs"]
    members = [r["uniform"], r["q_frame"], r["junk"]]
    plain_out, sel_out = str(tmp_path / "plain" / "results.json"), str(tmp_path / "sel" / "results.json")
    avg.write_ensemble_results(members, plain_out, world["split"])
    meta = avg.write_ensemble_results(members, sel_out, world["split"], min_iou=0.5)
    assert meta["min_iou"] == 0.5 and read_results(sel_out)[1]["min_iou"] == 0.5
    plain, sel = (evaluate_split(world["split"], results_path=p)["J&F"] for p in (plain_out, sel_out))
    assert sel == pytest.approx(1.0) and plain < 0.9
    records = avg_records(world["split"])
    scored = avg._score_subsets([[0, 1, 2]], records[0], records[1], members, [1.0] * 3, 0.5, "probs", 1,
                                min_iou=0.5)
    assert scored[0]["J&F"] == pytest.approx(sel)
    res = avg.greedy_select(members, world["split"], min_iou=0.5)
    assert res["min_iou"] == 0.5 and res["J&F"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="min_iou must be in"):
        avg.write_ensemble_results(members, str(tmp_path / "bad" / "results.json"), world["split"], min_iou=1.5)
    with pytest.raises(ValueError, match="min_iou must be in"):
        avg.greedy_select(members, world["split"], min_iou=float("nan"))


def test_cli_min_iou_travels_from_selection_to_apply(world, tmp_path):
    tool = os.path.join(ROOT, "tools", "select_modes.py")
    r = world["runs"]
    chosen = str(tmp_path / "chosen.json")
    out = subprocess.run([sys.executable, tool, "--runs", r["uniform"], r["q_frame"], r["junk"], "--split-dir",
                          world["split"], "--out", chosen, "--min-iou", "0.5", "--no-progress"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.load(open(chosen))["min_iou"] == 0.5
    res = str(tmp_path / "apply" / "results.json")
    out = subprocess.run([sys.executable, tool, "--runs", world["root"], "--split-dir", world["split"],
                          "--members", "uniform,q_frame,junk", "--members-json", chosen, "--write-results", res],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "not allowed with argument" in out.stderr  # one source of members
    json.dump({**json.load(open(chosen)), "names": ["uniform", "q_frame", "junk"], "weights": [1.0] * 3},
              open(chosen, "w"))  # the junk run too: the apply step must drop it
    out = subprocess.run([sys.executable, tool, "--runs", world["root"], "--split-dir", world["split"],
                          "--members-json", chosen, "--write-results", res, "--no-progress"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "members below IoU 0.5 with the consensus dropped" in out.stdout
    assert read_results(res)[1]["min_iou"] == 0.5
    assert evaluate_split(world["split"], results_path=res)["J&F"] == pytest.approx(1.0)
    bad = subprocess.run([sys.executable, tool, "--runs", world["root"], "--split-dir", world["split"],
                          "--members-json", chosen, "--write-results", res, "--min-iou", "1.5"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--min-iou must be in [0, 1]" in bad.stderr


def avg_records(split):
    from projects.sasasa2va.datasets.readers import load_mask_dict, read_meta_expressions

    return (read_meta_expressions(os.path.join(split, "meta_expressions.json"), os.path.join(split, "JPEGImages")),
            load_mask_dict(os.path.join(split, "mask_dict.json")))


def test_runs_without_probs_fall_back_to_results_json(world, tmp_path):
    d = str(tmp_path / "old" / "uniform_plus")
    entries = [make_entry(i, v, e, [f"{t:05d}" for t in range(T)], GT[(v, e)]) for i, (v, e) in enumerate(GT)]
    write_results(os.path.join(d, "results.json"), entries, {"split": "valid_u", "mode": "uniform_plus"})
    assert avg.run_mode(d) == "uniform_plus"
    p = avg.load_member(d, "v1", "0")
    assert p.dtype == np.uint8 and set(np.unique(p)) <= {0, 255}
    assert np.array_equal(p > 127, GT[("v1", "0")])
    res = avg.greedy_select([world["runs"]["junk"], d], world["split"], voting="binary")
    assert res["names"] == ["uniform_plus"] and res["J&F"] == pytest.approx(1.0)


def test_cli_select_then_apply(world, tmp_path):
    tool = os.path.join(ROOT, "tools", "select_modes.py")
    chosen = str(tmp_path / "chosen.json")
    r = world["runs"]
    out = subprocess.run([sys.executable, tool, "--runs", r["uniform"], r["q_frame"], r["junk"],
                          "--split-dir", world["split"], "--out", chosen], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "step" in out.stdout and "candidate" in out.stdout and "chosen: uniform + q_frame" in out.stdout
    data = json.load(open(chosen))
    assert data["names"] == ["uniform", "q_frame"] and len(data["steps"]) == 3
    n_exps = len(GT)
    for step in (1, 2, 3):  # a bar per step over the split's expressions (stderr; stdout keeps the table)
        assert f"step {step}: 100%" in out.stderr and f"{n_exps}/{n_exps}" in out.stderr, out.stderr
    res = str(tmp_path / "apply" / "results.json")
    out = subprocess.run([sys.executable, tool, "--runs", world["root"], "--split-dir", world["split"],
                          "--members-json", chosen, "--write-results", res], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert read_results(res)[1]["members"] == ["uniform", "q_frame"]
    assert "average: 100%" in out.stderr, out.stderr
    quiet = subprocess.run([sys.executable, tool, "--runs", world["root"], "--split-dir", world["split"],
                            "--members-json", chosen, "--write-results", res, "--overwrite", "--no-progress",
                            "--workers", "1"], capture_output=True, text=True)
    assert quiet.returncode == 0 and "%" not in quiet.stderr, quiet.stderr
    # --members takes comma lists too; explicit --voting / --threshold win over the chosen set's
    res2 = str(tmp_path / "apply2" / "results.json")
    out = subprocess.run([sys.executable, tool, "--runs", world["root"], "--split-dir", world["split"],
                          "--members", "uniform,q_frame", "--write-results", res2], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert read_results(res2)[1]["members"] == ["uniform", "q_frame"] and "probs voting, threshold 0.5" in out.stdout
    out = subprocess.run([sys.executable, tool, "--runs", world["root"], "--split-dir", world["split"],
                          "--members-json", chosen, "--voting", "binary", "--threshold", "0.6",
                          "--write-results", str(tmp_path / "apply3" / "results.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "binary voting, threshold 0.6" in out.stdout
    # outputs: an existing file only with --overwrite, never inside a run; members must be complete
    base = [sys.executable, tool, "--runs", world["root"], "--split-dir", world["split"]]
    out = subprocess.run(base + ["--members", "uniform", "--write-results", res2], capture_output=True, text=True)
    assert out.returncode == 2 and "exists; pass --overwrite" in out.stderr
    assert subprocess.run(base + ["--members", "uniform", "--write-results", res2, "--overwrite"],
                          capture_output=True, text=True).returncode == 0
    inside = os.path.join(r["uniform"], "results.json")
    out = subprocess.run(base + ["--members", "q_frame", "--write-results", inside, "--overwrite"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "inside the run" in out.stderr
    out = subprocess.run(base + ["--members", "uniform", "--write-results", os.path.join(res2, "results.json")],
                         capture_output=True, text=True)  # under a file: refused before any work
    assert out.returncode == 2 and f"{res2} is a file, not a folder" in out.stderr
    part = tmp_path / "runs2" / "partial"
    shutil.copytree(r["uniform"], part)
    victim = sorted(p for p in part.rglob("*.npz"))[0]
    victim.unlink()
    if (part / "results.json").exists():
        (part / "results.json").unlink()
    cmd = [sys.executable, tool, "--runs", str(part), r["q_frame"], "--split-dir", world["split"], "--members",
           "partial,q_frame", "--write-results", str(tmp_path / "apply4" / "results.json")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2 and "lacks 1 expression(s)" in out.stderr
    assert subprocess.run(cmd + ["--allow-incomplete"], capture_output=True, text=True).returncode == 0
    out = subprocess.run(base + ["--members", "uniform", "--weights", "1", "x", "--write-results",
                                 str(tmp_path / "apply5.json")], capture_output=True, text=True)
    assert out.returncode == 2 and "'x' is not a number" in out.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{names: 1}")
    out = subprocess.run(base + ["--members-json", str(bad), "--write-results", str(tmp_path / "apply6.json")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "bad.json: not valid JSON" in out.stderr
    # an ensemble written among the runs can be written again (its folder is not an evaluation run)
    ens = tmp_path / "runs3"
    shutil.copytree(r["uniform"], ens / "uniform")
    shutil.copytree(r["q_frame"], ens / "q_frame")
    cmd = [sys.executable, tool, "--runs", str(ens), "--split-dir", world["split"], "--members", "uniform,q_frame",
           "--write-results", str(ens / "ensemble" / "results.json")]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    again = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
