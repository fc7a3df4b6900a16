"""Image preprocessing: MLLM transform, KFC grids/order, SAM2 resize/normalise, dynamic tiling."""
import numpy as np
import pytest
import torch
from PIL import Image

from projects.sasasa2va.hf.models.preprocessing import (
    IMAGENET_MEAN, IMAGENET_STD, check_same_size, dynamic_preprocess, kfc_mllm_images, make_grid,
    mllm_transform, sam2_normalize, sam2_resize)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
           (128, 0, 0), (0, 128, 0), (0, 0, 128), (200, 200, 200), (60, 60, 60), (10, 200, 90)]


def solid(colour, size=(40, 30)):
    return Image.new("RGB", size, colour)


def normed(colour):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)])


def test_mllm_transform_shape_and_values():
    t = mllm_transform(solid((255, 0, 0), (50, 20)), size=56)
    assert t.shape == (3, 56, 56) and t.dtype == torch.float32
    assert torch.allclose(t[:, 10, 10], normed((255, 0, 0)), atol=1e-5)
    gray = mllm_transform(Image.new("L", (20, 20), 128), size=28)  # non-RGB is converted
    assert gray.shape == (3, 28, 28)


def test_make_grid_cells():
    frames = [solid(COLOURS[j]) for j in range(7)]
    g = make_grid(frames, grid=3)
    assert g.size == (120, 90) and g.mode == "RGB"
    arr = np.asarray(g)
    for j in range(9):
        row, col = j // 3, j % 3
        cell = arr[row * 30:(row + 1) * 30, col * 40:(col + 1) * 40]
        expected = COLOURS[j] if j < 7 else (0, 0, 0)
        assert (cell == np.array(expected, dtype=np.uint8)).all(), j
    with pytest.raises(ValueError, match="do not fit"):
        make_grid([solid(COLOURS[0])] * 10, grid=3)


def test_kfc_order_and_cache():
    frames = [solid(COLOURS[f]) for f in range(12)]
    indices = [f for f in range(10) for _ in range(2)]  # 2 clips of 10: 0,0,1,1,...
    cache = {}
    out = kfc_mllm_images(frames, indices, num_clips=2, grid=3, size=28, cache=cache)
    assert out.shape == (4, 3, 28, 28)
    # key frames are the first index of each clip
    assert torch.allclose(out[0], mllm_transform(frames[0], 28))
    assert torch.allclose(out[2], mllm_transform(frames[5], 28))
    # grids are the other 9 frames of each clip, row-major
    assert torch.allclose(out[1], mllm_transform(make_grid([frames[i] for i in indices[1:10]]), 28))
    assert torch.allclose(out[3], mllm_transform(make_grid([frames[i] for i in indices[11:20]]), 28))
    assert len(cache) == 4
    # repeated key frames / grids are built once and reused
    same = [0] * 20
    cache2 = {}
    out2 = kfc_mllm_images(frames, same, num_clips=2, size=28, cache=cache2)
    assert len(cache2) == 2 and torch.equal(out2[0], out2[2])


def test_kfc_errors():
    frames = [solid(COLOURS[0])] * 3 + [solid(COLOURS[1], (20, 20))]
    with pytest.raises(ValueError, match="frame 3 is 20x20"):
        kfc_mllm_images(frames, [0] * 19 + [3], num_clips=2, size=28)
    with pytest.raises(ValueError, match="equal clips"):
        kfc_mllm_images(frames, [0] * 19, num_clips=2, size=28)
    with pytest.raises(ValueError, match="out of range"):
        kfc_mllm_images(frames, [0] * 19 + [9], num_clips=2, size=28)


def test_check_same_size_message():
    check_same_size([solid(COLOURS[0])] * 3)
    with pytest.raises(ValueError) as e:
        check_same_size([solid(COLOURS[0]), solid(COLOURS[0]), solid(COLOURS[0], (41, 30))], where="video v1")
    msg = str(e.value)
    assert "video v1" in msg and "frame 0 is 40x30" in msg and "frame 2 is 41x30" in msg


def test_sam2_resize_and_normalize():
    img = Image.new("RGB", (64, 32), (10, 20, 30))
    img.paste((250, 0, 0), (0, 0, 32, 32))
    x = sam2_resize(img, size=16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    assert x[:, 4, 2].tolist() == [250, 0, 0] and x[:, 4, 13].tolist() == [10, 20, 30]  # aspect squashed
    ref = torch.from_numpy(np.array(img.resize((16, 16)))).permute(2, 0, 1)
    assert torch.equal(x, ref)
    y = sam2_normalize(x)
    assert y.dtype == torch.float32 and y.shape == (3, 16, 16)
    assert torch.allclose(y[:, 4, 13], normed((10, 20, 30)), atol=1e-6)
    batch = sam2_normalize(torch.stack([x, x]))
    assert batch.shape == (2, 3, 16, 16) and torch.equal(batch[1], y)
    with pytest.raises(ValueError, match="uint8"):
        sam2_normalize(x.float())
    with pytest.raises(ValueError, match="shape"):
        sam2_normalize(x[:2])


@pytest.mark.parametrize("size,expected_tiles", [
    ((448, 448), 1),          # square, fits one tile -> no thumbnail
    ((896, 448), 2 + 1),      # 2:1 -> 2x1 grid + thumbnail
    ((448, 1344), 3 + 1),     # 1:3 -> 1x3 grid + thumbnail
    ((800, 800), 4 + 1),      # square tie 1x1/2x2/3x3: 2x2 (area > half of 4 tiles, not of 9)
    ((1800, 1800), 9 + 1),    # area > half of 3x3 tiles
    ((6000, 500), 12 + 1),    # very wide -> 12x1
])
def test_dynamic_preprocess_counts(size, expected_tiles):
    tiles = dynamic_preprocess(Image.new("RGB", size, (1, 2, 3)), image_size=448)
    assert len(tiles) == expected_tiles
    assert all(t.size == (448, 448) for t in tiles)


def test_dynamic_preprocess_tile_order_and_options():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 0, 0), (100, 0, 200, 100))  # right half red
    tiles = dynamic_preprocess(img, max_num=4, image_size=50)
    assert len(tiles) == 3  # 2x1 + thumbnail
    assert np.asarray(tiles[0])[25, 25].tolist() == [0, 0, 0] and np.asarray(tiles[1])[25, 25].tolist() == [255, 0, 0]
    assert len(dynamic_preprocess(img, max_num=4, image_size=50, use_thumbnail=False)) == 2
    assert len(dynamic_preprocess(img, max_num=1, image_size=50)) == 1
