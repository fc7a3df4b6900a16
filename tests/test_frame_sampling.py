"""Frame sampling: spec evaluation.md §1.3-1.7 worked examples and §8.2 index tables."""
import math
from collections import Counter

import pytest
import torch

from projects.sasasa2va.hf.models.frame_sampling import (
    MODES, DecodePlan, combine_decoded_logits, decode_plan, select_indices, seg_prompt_indices,
    split_clips, training_indices)

LENGTHS = [1, 2, 7, 13, 50, 64, 99, 100, 101, 150, 155, 300, 1000]


def runs(seq):
    """[(value, count), ...] of consecutive runs, the spec's 'a x n' notation."""
    out = []
    for v in seq:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return [tuple(r) for r in out]


def q_list(L):
    """A plausible q_frame list: uniform positions (covers every frame when L <= 100)."""
    return [i * L // 100 for i in range(100)]


def plan_for(L, mode, **kw):
    sel = q_list(L) if mode == "q_frame" else None
    return decode_plan(L, mode, select_indices(L, mode, selected=sel), **kw)


def fake_logits(plan):
    """Decode call j returns a constant map equal to its prompt index."""
    return torch.tensor(plan.prompt_index, dtype=torch.float32)[:, None, None].expand(-1, 2, 3).clone()


# --------------------------------------------------------------------------- oracle (spec tables)
def oracle_indices(L, mode):
    uniform = [math.floor(i * L / 100) for i in range(100)]
    wrap = sorted(i % L for i in range(100))
    if mode in ("uniform", "uniform_plus", "q_frame"):
        return uniform  # q_frame: our test list
    if mode == "wrap_around":
        return wrap
    return wrap if L <= 100 else uniform


def oracle_plan(L, mode):
    """(path, decode_frames, prompt_index) straight from the §1.5 table."""
    floor_map = [math.floor(10 * f / L) for f in range(L)]
    if L == 100:
        return "A", list(range(L)), [f // 10 for f in range(L)]
    if L > 100:
        if mode in ("wrap_around", "q_frame"):
            return "C", list(range(100)), [f // 10 for f in range(100)]
        return "A", list(range(L)), floor_map
    if mode == "uniform":
        return "A", list(range(L)), floor_map
    if mode in ("wrap_around", "wrap_around_plus"):
        q, r = divmod(100, L)
        first_pos = [f * q + min(f, r) for f in range(L)]  # start of frame f's run in the wrap list
        return "A", list(range(L)), [p // 10 for p in first_pos]
    S = oracle_indices(L, mode)
    return "B", S, [j // 10 for j in range(100)]


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("mode", MODES)
def test_index_tables_match_spec(L, mode):
    sel = q_list(L) if mode == "q_frame" else None
    S = select_indices(L, mode, selected=sel)
    assert S == oracle_indices(L, mode)
    plan = decode_plan(L, mode, S)
    path, frames, prompts = oracle_plan(L, mode)
    assert (plan.path, plan.decode_frames, plan.prompt_index) == (path, frames, prompts)
    assert plan.num_frames == L
    assert plan.propagate == (path == "C")
    clips = split_clips(S)
    assert [c[0] for c in clips] == S[::10] and sum(clips, []) == S


# --------------------------------------------------------------------------- §1.6 worked examples
def test_L7_uniform():
    S = select_indices(7, "uniform")
    assert runs(S) == [(0, 15), (1, 14), (2, 14), (3, 15), (4, 14), (5, 14), (6, 14)]
    clips = [runs(c) for c in split_clips(S)]
    assert clips == [[(0, 10)], [(0, 5), (1, 5)], [(1, 9), (2, 1)], [(2, 10)], [(2, 3), (3, 7)],
                     [(3, 8), (4, 2)], [(4, 10)], [(4, 2), (5, 8)], [(5, 6), (6, 4)], [(6, 10)]]
    assert [c[0] for c in split_clips(S)] == [0, 0, 1, 2, 2, 3, 4, 4, 5, 6]
    plan = decode_plan(7, "uniform", S)
    assert plan.path == "A" and plan.prompt_index == [0, 1, 2, 4, 5, 7, 8]


def test_L7_wrap():
    for mode in ("wrap_around", "wrap_around_plus"):
        S = select_indices(7, mode)
        assert runs(S) == [(0, 15), (1, 15), (2, 14), (3, 14), (4, 14), (5, 14), (6, 14)]
        assert [runs(c) for c in split_clips(S)] == [
            [(0, 10)], [(0, 5), (1, 5)], [(1, 10)], [(2, 10)], [(2, 4), (3, 6)], [(3, 8), (4, 2)],
            [(4, 10)], [(4, 2), (5, 8)], [(5, 6), (6, 4)], [(6, 10)]]
        plan = decode_plan(7, mode, S)
        assert plan.path == "A" and plan.prompt_index == [0, 1, 3, 4, 5, 7, 8]


def test_L7_uniform_plus_weights():
    S = select_indices(7, "uniform_plus")
    plan = decode_plan(7, "uniform_plus", S)
    assert plan.path == "B" and plan.decode_frames == S and len(plan.prompt_index) == 100
    out = combine_decoded_logits(plan, fake_logits(plan))
    assert out.shape == (7, 2, 3)
    expected = {0: {0: 10, 1: 5}, 1: {1: 5, 2: 9}, 2: {2: 1, 3: 10, 4: 3}, 3: {4: 7, 5: 8},
                4: {5: 2, 6: 10, 7: 2}, 5: {7: 8, 8: 6}, 6: {8: 4, 9: 10}}
    for f, w in expected.items():
        mean = sum(k * n for k, n in w.items()) / sum(w.values())
        assert torch.allclose(out[f], torch.full((2, 3), mean)), f


def test_L50():
    S = select_indices(50, "uniform")
    for mode in ("uniform_plus", "wrap_around", "wrap_around_plus"):
        assert select_indices(50, mode) == S
    assert S == [f for f in range(50) for _ in range(2)]
    for k, clip in enumerate(split_clips(S)):
        assert clip[0] == 5 * k
        assert clip[1:] == [5 * k, 5 * k + 1, 5 * k + 1, 5 * k + 2, 5 * k + 2, 5 * k + 3, 5 * k + 3,
                            5 * k + 4, 5 * k + 4]
    for mode in ("uniform", "wrap_around", "wrap_around_plus"):
        plan = decode_plan(50, mode, S)
        assert plan.path == "A" and plan.prompt_index == [f // 5 for f in range(50)]
    plus = decode_plan(50, "uniform_plus", S)
    assert plus.path == "B" and len(plus.decode_frames) == 100
    # both copies of a frame lie in one clip -> same result as uniform
    out = combine_decoded_logits(plus, fake_logits(plus))
    assert out[:, 0, 0].tolist() == [float(f // 5) for f in range(50)]


def test_L100_all_modes_identical():
    identity = list(range(100))
    plans = set()
    for mode in MODES:
        S = select_indices(100, mode, selected=identity if mode == "q_frame" else None)
        assert S == identity
        p = decode_plan(100, mode, S)
        plans.add((p.path, tuple(p.decode_frames), tuple(p.prompt_index), p.propagate))
        assert [c[0] for c in split_clips(S)] == list(range(0, 100, 10))
    assert plans == {("A", tuple(identity), tuple(f // 10 for f in identity), False)}
    # Q2: q_frame with L = 100 uses f // 10 whatever the list says
    odd = sorted([0] * 2 + list(range(2, 100)))
    assert decode_plan(100, "q_frame", odd).prompt_index == [f // 10 for f in range(100)]


def test_L150():
    S = select_indices(150, "uniform")
    for k, clip in enumerate(split_clips(S)):
        assert clip == [15 * k + d for d in (0, 1, 3, 4, 6, 7, 9, 10, 12, 13)]
    assert set(range(150)) - set(S) == {f for f in range(150) if f % 3 == 2}
    for mode in ("uniform", "uniform_plus", "wrap_around_plus"):
        assert select_indices(150, mode) == S
        plan = decode_plan(150, mode, S)
        assert plan.path == "A" and plan.prompt_index == [f // 15 for f in range(150)]
    W = select_indices(150, "wrap_around")
    assert split_clips(W) == [list(range(10 * k, 10 * k + 10)) for k in range(10)]
    for mode, idx in (("wrap_around", W), ("q_frame", S)):
        plan = decode_plan(150, mode, idx)
        assert plan == DecodePlan("C", list(range(100)), [f // 10 for f in range(100)], 150, True)


def test_L300():
    S = select_indices(300, "uniform")
    assert S == [3 * i for i in range(100)]
    assert split_clips(S)[4] == list(range(120, 150, 3))
    assert decode_plan(300, "uniform", S).prompt_index == [f // 30 for f in range(300)]
    for mode in ("wrap_around", "q_frame"):
        idx = S if mode == "q_frame" else select_indices(300, mode)
        plan = decode_plan(300, mode, idx)
        assert plan.path == "C" and plan.decode_frames == list(range(100)) and plan.propagate


def test_path_c_combine_returns_conditioning_outputs():
    plan = plan_for(300, "wrap_around")
    logits = fake_logits(plan)
    assert combine_decoded_logits(plan, logits) is logits


def test_path_a_combine_orders_by_frame():
    plan = plan_for(13, "uniform")
    out = combine_decoded_logits(plan, fake_logits(plan))
    assert out[:, 0, 0].tolist() == [float(10 * f // 13) for f in range(13)]
    with pytest.raises(ValueError, match="decode calls"):
        combine_decoded_logits(plan, torch.zeros(5, 2, 2))


# --------------------------------------------------------------------------- mode equivalences
@pytest.mark.parametrize("L", [101, 150, 155, 300, 1000])
def test_long_uniform_equals_plus_modes(L):
    plans = {tuple(select_indices(L, m)) for m in ("uniform", "uniform_plus", "wrap_around_plus")}
    assert len(plans) == 1
    ps = {(p.path, tuple(p.prompt_index)) for p in (plan_for(L, m) for m in
                                                    ("uniform", "uniform_plus", "wrap_around_plus"))}
    assert len(ps) == 1


@pytest.mark.parametrize("L", range(1, 100))
def test_short_wrap_equals_wrap_plus_and_multiplicities(L):
    assert select_indices(L, "wrap_around") == select_indices(L, "wrap_around_plus")
    assert plan_for(L, "wrap_around") == plan_for(L, "wrap_around_plus")
    cu = Counter(select_indices(L, "uniform"))
    cw = Counter(select_indices(L, "wrap_around"))
    for f in range(L):
        assert cu[f] == math.ceil(100 * (f + 1) / L) - math.ceil(100 * f / L)
        assert cw[f] == 100 // L + (1 if f < 100 % L else 0)
    assert set(cu) == set(cw) == set(range(L))


def test_floor_rule_key_frame_quirk():
    assert plan_for(13, "uniform").prompt_index[1] == 0 and split_clips(select_indices(13, "uniform"))[1][0] == 1
    assert plan_for(64, "uniform").prompt_index[19] == 2 and split_clips(select_indices(64, "uniform"))[3][0] == 19
    assert plan_for(155, "uniform").prompt_index[15] == 0 and split_clips(select_indices(155, "uniform"))[1][0] == 15
    # for L > 100 clip k's key frame is fl(kL/10), and fl(10 fl(kL/10) / L) = k - 1 exactly when kL is not a
    # multiple of 10 (k = 1 decides it): the quirk shows for every L not divisible by 10
    for L in range(101, 400):
        keys = split_clips(select_indices(L, "uniform"))
        m = plan_for(L, "uniform").prompt_index
        assert any(m[keys[k][0]] == k - 1 for k in range(1, 10)) == (L % 10 != 0), L


def test_L1():
    for mode in MODES:
        assert select_indices(1, mode, selected=[0] * 100 if mode == "q_frame" else None) == [0] * 100
    assert plan_for(1, "uniform").prompt_index == [0]
    plus = plan_for(1, "uniform_plus")
    out = combine_decoded_logits(plus, fake_logits(plus))
    assert out.shape == (1, 2, 3) and torch.allclose(out, torch.full((1, 2, 3), 4.5))


# --------------------------------------------------------------------------- Q1, Q3, Q4, Q5
def test_q_frame_anchor_fix():
    sel = sorted([5, 5] + [2 * i + 7 for i in range(98)])  # frame 5 twice; anchors spread over 7..201
    faithful = decode_plan(250, "q_frame", sel)
    assert faithful.decode_frames == list(range(100)) and faithful.path == "C"
    fixed = decode_plan(250, "q_frame", sel, q_frame_anchor_fix=True)
    assert fixed.path == "C" and fixed.propagate
    assert fixed.decode_frames == sorted(set(sel)) and len(fixed.decode_frames) == 99
    first = {}
    for j, f in enumerate(sel):
        first.setdefault(f, j // 10)
    assert fixed.prompt_index == [first[f] for f in fixed.decode_frames]
    # the fix leaves the other modes and short videos unchanged
    assert decode_plan(250, "wrap_around", list(range(100)), q_frame_anchor_fix=True) == \
        decode_plan(250, "wrap_around", list(range(100)))


def test_q_frame_uncovered_faithful_vs_fixed():
    sel = [4 if f == 3 else f for f in q_list(7)]  # frame 3 never selected
    faithful = decode_plan(7, "q_frame", sel)
    assert faithful.path == "B" and len(faithful.decode_frames) == 100
    out = combine_decoded_logits(faithful, fake_logits(faithful))
    assert torch.isnan(out[3]).all() and not torch.isnan(out[[0, 1, 2, 4, 5, 6]]).any()
    assert not (torch.sigmoid(out[3]) > 0.5).any()  # NaN -> empty mask
    fixed = decode_plan(7, "q_frame", sel, uncovered_fix=True)
    assert len(fixed.decode_frames) == 101 and fixed.decode_frames[-1] == 3
    # nearest selected frames are 2 and 4 (tie -> 2); its last copy is at position 42 -> clip 4
    assert fixed.prompt_index[-1] == 4
    out = combine_decoded_logits(fixed, fake_logits(fixed))
    assert not torch.isnan(out).any() and torch.allclose(out[3], torch.full((2, 3), 4.0))


def test_probability_averaging_option():
    plan = DecodePlan("B", [0, 0, 0, 1], [0, 1, 2, 3], 2, False)
    logits = torch.tensor([8.0, 9.0, -1024.0, 3.0])[:, None, None].expand(-1, 2, 2).clone()
    faithful = combine_decoded_logits(plan, logits)
    assert (faithful[0] < -300).all()  # one 'no object' copy vetoes the frame (Q4)
    probs = combine_decoded_logits(plan, logits, average="probs")
    p = (torch.sigmoid(torch.tensor(8.0)) + torch.sigmoid(torch.tensor(9.0))) / 3
    assert torch.allclose(torch.sigmoid(probs[0]), p.expand(2, 2), atol=1e-6)
    assert torch.allclose(probs[1], torch.full((2, 2), 3.0), atol=1e-5)
    all_absent = combine_decoded_logits(DecodePlan("B", [0], [0], 1, False), torch.full((1, 2, 2), -1024.0),
                                        average="probs")
    assert torch.isfinite(all_absent).all() and (all_absent == -1024).all()
    with pytest.raises(ValueError):
        combine_decoded_logits(plan, logits, average="median")


def test_seg_prompt_indices():
    assert seg_prompt_indices(0) is None
    assert seg_prompt_indices(3) == [0, 1, 2, 2, 2, 2, 2, 2, 2, 2]
    assert seg_prompt_indices(12) == list(range(10))
    assert seg_prompt_indices(10) == list(range(10))
    assert seg_prompt_indices(1, num_clips=4) == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        seg_prompt_indices(-1)


# --------------------------------------------------------------------------- training, generalisation, errors
def test_training_indices():
    assert training_indices(7) == select_indices(7, "wrap_around")
    assert training_indices(100) == list(range(100))
    assert training_indices(250) == list(range(100))
    assert training_indices(250, strategy="uniform") == [i * 250 // 100 for i in range(100)]
    assert training_indices(7, num_samples=20) == sorted(i % 7 for i in range(20))
    with pytest.raises(ValueError, match="strategy"):
        training_indices(7, strategy="random")


def test_generalised_clip_count():
    # num_samples = 4 clips x 5 frames
    S = select_indices(13, "uniform", num_samples=20)
    assert S == [i * 13 // 20 for i in range(20)]
    assert [len(c) for c in split_clips(S, 4)] == [5] * 4
    assert decode_plan(13, "uniform", S, num_clips=4).prompt_index == [4 * f // 13 for f in range(13)]
    W = select_indices(30, "wrap_around", num_samples=20)
    plan = decode_plan(30, "wrap_around", W, num_clips=4)
    assert plan.path == "C" and plan.prompt_index == [f // 5 for f in range(20)]
    plus = decode_plan(13, "uniform_plus", S, num_clips=4)
    assert plus.path == "B" and plus.prompt_index == [j // 5 for j in range(20)]
    with pytest.raises(ValueError, match="multiple of num_clips"):
        split_clips(list(range(20)), 3)


def test_input_validation():
    with pytest.raises(ValueError, match="q_frame.*selected"):
        select_indices(50, "q_frame")
    with pytest.raises(ValueError, match="exactly 100"):
        select_indices(50, "q_frame", selected=list(range(50)))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        select_indices(50, "q_frame", selected=[0] * 99 + [50])
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        select_indices(50, "q_frame", selected=[0] * 99 + [1.5])
    with pytest.raises(ValueError, match="unknown frame-sampling mode"):
        select_indices(50, "default")
    with pytest.raises(ValueError, match="num_frames"):
        select_indices(0, "uniform")
    with pytest.raises(ValueError, match="select_indices"):
        decode_plan(50, "uniform", select_indices(50, "wrap_around")[::-1])
    with pytest.raises(ValueError, match="unknown"):
        decode_plan(50, "bogus", list(range(100)))
