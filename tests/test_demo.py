"""tools/demo.py: a user's own video (frame folder or mp4) -> overlay GIF + per-frame PNG masks."""
from __future__ import annotations

import os
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(root, exported tiny model folder with random trained-like weights)."""
    sys.path.insert(0, TESTS)
    from test_export import export_tiny

    root = tmp_path_factory.mktemp("demo")
    hf_dir = export_tiny(root)
    return root, hf_dir


@pytest.fixture
def scripted_loader(monkeypatch):
    """demo.load_model, then the scripted LM head (answer with 10 [SEG]) so the masks are non-trivial."""
    from test_export import ANSWER_STOP, _install_script
    from test_inference import set_answer

    from tools import demo

    real = demo.load_model
    loaded = {}

    def load(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        set_answer(_install_script(model, tok), tok, 10, stop=ANSWER_STOP)
        loaded["model"], loaded["tok"] = model, tok
        return model, tok

    monkeypatch.setattr(demo, "load_model", load)
    return loaded


def _frames(n=7, w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_frame_folder_gif_and_masks_match_predict_forward(exported, scripted_loader, tmp_path):
    from projects.sasasa2va.hf.models.templates import eval_prompt
    from tools import demo

    _, hf_dir = exported
    folder = tmp_path / "frames"
    folder.mkdir()
    arrays = _frames()
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i:05d}.png")  # lossless, so the model sees these exact pixels
    out = tmp_path / "out" / "demo.gif"
    assert demo.main(["--model", hf_dir, "--video", str(folder), "--text", "the red circle", "--mode",
                      "wrap_around", "--out", str(out), "--save-masks", "--device", "cpu", "--no-remote-code",
                      "--max-new-tokens", "40"]) == 0
    with Image.open(out) as gif:
        assert gif.n_frames == len(arrays)
    mask_files = sorted(n for n in os.listdir(tmp_path / "out" / "demo_masks") if n.endswith(".png"))
    assert mask_files == [f"{i:05d}.png" for i in range(len(arrays))]
    saved = np.stack([cv2.imread(str(tmp_path / "out" / "demo_masks" / f), cv2.IMREAD_UNCHANGED) for f in mask_files])
    assert saved.shape == (len(arrays), 48, 64) and set(np.unique(saved)) <= {0, 255}
    model, tok = scripted_loader["model"], scripted_loader["tok"]
    ref = model.predict_forward(video=[Image.fromarray(a) for a in arrays], text=eval_prompt("the red circle"),
                                tokenizer=tok, mode="wrap_around", max_new_tokens=40)
    assert ref["num_seg"] == 10
    np.testing.assert_array_equal(saved == 255, ref["prediction_masks"][0])
    assert 0 < (saved == 255).mean() < 1  # the scripted answer gives real, partial masks
    # frames not named NNNNN: a rerun keeping every other frame replaces the earlier run's masks it lists
    for i in range(len(arrays)):
        os.rename(folder / f"{i:05d}.png", folder / f"frame_{i}.png")
    masks_dir = tmp_path / "named_masks"
    common = ["--model", hf_dir, "--video", str(folder), "--text", "the red circle", "--out", str(out),
              "--save-masks", "--masks-dir", str(masks_dir), "--device", "cpu", "--no-remote-code",
              "--max-new-tokens", "40"]
    assert demo.main(common) == 0
    assert demo.main(common + ["--video-step", "2"]) == 0
    kept = sorted(n for n in os.listdir(masks_dir) if n.endswith(".png"))
    assert kept == sorted(f"frame_{i}.png" for i in range(0, len(arrays), 2))


def test_mp4_input_and_video_step(exported, scripted_loader, tmp_path):
    from tools import demo

    _, hf_dir = exported
    path = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 6.0, (64, 48))
    for a in _frames(9):
        writer.write(cv2.cvtColor(a, cv2.COLOR_RGB2BGR))
    writer.release()
    frames, names = demo.load_video(path, step=2)
    assert len(frames) == 5 and names == ["00000", "00002", "00004", "00006", "00008"]
    out = tmp_path / "clip.gif"
    assert demo.main(["--model", hf_dir, "--video", path, "--text", "the dog", "--out", str(out), "--video-step",
                      "2", "--device", "cpu", "--no-remote-code", "--max-new-tokens", "40", "--save-masks",
                      "--masks-dir", str(tmp_path / "m")]) == 0
    with Image.open(out) as gif:
        assert gif.n_frames == 5
    assert sorted(os.listdir(tmp_path / "m")) == [".demo_masks.json"] + [n + ".png" for n in names]
    (tmp_path / "m" / "00001.png").write_bytes(b"an earlier run's mask of a frame this run skips")
    assert demo.main(["--model", hf_dir, "--video", path, "--text", "the dog", "--out", str(out), "--video-step",
                      "4", "--device", "cpu", "--no-remote-code", "--max-new-tokens", "40", "--save-masks",
                      "--masks-dir", str(tmp_path / "m")]) == 0
    assert sorted(os.listdir(tmp_path / "m")) == [".demo_masks.json", "00000.png", "00004.png", "00008.png"]


@pytest.mark.parametrize("extra, message", [
    (["--mode", "q_frame"], "--selected-fids"),
    (["--selected-fids", "[0, 99]"], "outside the video"),
    (["--text", "  "], "--text is empty"),
    (["--mode", "q_frame", "--selected-fids", "[0, 1, 2]"], "expected 100 frame indices"),
    (["--save-masks", "--masks-dir", "FRAMES"], "is the input frame folder"),
    (["--save-masks", "--masks-dir", "A_FILE"], "exists and is not a folder"),
    (["--save-masks", "--masks-dir", "USER_DIR"], "holds other files (notes.txt)"),
    (["--masks-dir", "USER_DIR"], "add --save-masks"),
])
def test_bad_arguments_exit_with_a_clear_message(tmp_path, capsys, extra, message):
    from tools import demo

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, a in enumerate(_frames(3)):
        Image.fromarray(a).save(folder / f"{i}.png")
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    where = {"FRAMES": str(folder), "A_FILE": str(tmp_path / "a_file"), "USER_DIR": str(tmp_path / "user")}
    extra = [where.get(a, a) for a in extra]
    before = sorted(os.listdir(folder))
    args = ["--model", str(tmp_path / "nomodel"), "--video", str(folder), "--text", "x", "--out", str(tmp_path / "o.gif")]
    with pytest.raises(SystemExit) as exc:
        demo.main(args + extra)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert sorted(os.listdir(folder)) == before and (tmp_path / "user" / "notes.txt").read_text() == "mine"


def test_unusable_video_inputs(tmp_path):
    from tools import demo

    with pytest.raises(ValueError, match="no such video"):
        demo.load_video(str(tmp_path / "missing.mp4"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no frames"):
        demo.load_video(str(empty))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(_frames(1, 64, 48)[0]).save(mixed / "0.png")
    Image.fromarray(_frames(1, 32, 32)[0]).save(mixed / "1.png")
    with pytest.raises(ValueError, match="different sizes"):
        demo.load_video(str(mixed))
