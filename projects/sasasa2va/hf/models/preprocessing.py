"""Image preprocessing for the MLLM (448 px, KFC key frames + grids, dynamic tiles) and SAM2 (1024 px).

Pixel-exactness matters because the checkpoints were fine-tuned on these exact pipelines (spec
evaluation.md §1.2, model_training_reference.md §4): the grid is composed at the frames' original
resolution and only then resized; resizes ignore the aspect ratio.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@lru_cache(maxsize=8)
def _mllm_pipeline(size: int) -> T.Compose:
    return T.Compose([
        T.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def mllm_transform(pil: Image.Image, size: int = 448) -> torch.Tensor:
    """RGB -> size x size bicubic (torchvision on the PIL image) -> [0,1] -> ImageNet norm; [3,size,size]."""
    return _mllm_pipeline(int(size))(pil.convert("RGB"))


def check_same_size(frames, where: str = "") -> None:
    """Raise a ValueError naming the frames whose (W, H) differs from frame 0 (spec pitfall 26)."""
    frames = list(frames)
    if not frames:
        return
    ref = frames[0].size
    bad = [(i, f.size) for i, f in enumerate(frames) if f.size != ref]
    if bad:
        shown = ", ".join(f"frame {i} is {w}x{h}" for i, (w, h) in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}all frames must have the same size (W x H); frame 0 is {ref[0]}x{ref[1]} "
                         f"but {shown}{more}")


def make_grid(pils, grid: int = 3) -> Image.Image:
    """Paste frames at original resolution into a black (grid*W) x (grid*H) RGB canvas, row-major.

    Frame j goes to column j % grid, row j // grid; cells beyond the given frames stay black.
    """
    pils = list(pils)
    if not pils:
        raise ValueError("make_grid: expected at least one frame, got none")
    if len(pils) > grid * grid:
        raise ValueError(f"make_grid: {len(pils)} frames do not fit a {grid}x{grid} grid "
                         f"(at most {grid * grid} expected)")
    check_same_size(pils, where="make_grid")
    w, h = pils[0].size
    canvas = Image.new("RGB", (grid * w, grid * h))
    for j, img in enumerate(pils):
        canvas.paste(img.convert("RGB"), ((j % grid) * w, (j // grid) * h))
    return canvas


def kfc_mllm_images(frames, indices, num_clips: int = 10, grid: int = 3, size: int = 448,
                    cache: dict | None = None) -> torch.Tensor:
    """Key Frame Compression images, [2*num_clips, 3, size, size] ordered key_0, grid_0, key_1, ...

    `frames` is the video's frame list (all of one size), `indices` the sampled positions
    (num_clips * clip_len of them). Key = first frame of each clip, grid = its other frames.
    `cache` (one dict per video, reusable across expressions) maps ("key", size, (i,)) and
    ("grid", size, grid, (i, ...)) to tensors, so repeated key frames and grids are built once.
    """
    frames = list(frames)
    indices = [int(i) for i in indices]
    if num_clips < 1 or len(indices) % num_clips != 0 or not indices:
        raise ValueError(f"kfc_mllm_images: {len(indices)} indices do not split into {num_clips} equal clips")
    clip_len = len(indices) // num_clips
    if clip_len - 1 > grid * grid or clip_len < 2:
        raise ValueError(f"kfc_mllm_images: clip length {clip_len} needs 1 key frame + 1..{grid * grid} "
                         f"grid frames for grid={grid}")
    bad = [i for i in indices if not 0 <= i < len(frames)]
    if bad:
        raise ValueError(f"kfc_mllm_images: indices {bad[:10]} out of range for {len(frames)} frames")
    check_same_size(frames, where="kfc_mllm_images")
    if cache is None:
        cache = {}
    out = []
    for c in range(num_clips):
        clip = indices[c * clip_len:(c + 1) * clip_len]
        for which in (0, 1):
            image_id = kfc_image_key(clip, which, grid, size)
            if image_id not in cache:
                cache[image_id] = kfc_image(frames, clip, which, grid, size)
            out.append(cache[image_id])
    return torch.stack(out)


def kfc_image_key(clip, which: int, grid: int = 3, size: int = 448) -> tuple:
    """Cache key of ``kfc_image(frames, clip, which, grid, size)``: ("key", size, (i,)) or
    ("grid", size, grid, (i, ...)) -- equal for every clip that shows the same frames."""
    if which == 0:
        return ("key", size, (int(clip[0]),))
    return ("grid", size, grid, tuple(int(i) for i in clip[1:]))


def kfc_image(frames, clip, which: int, grid: int = 3, size: int = 448) -> torch.Tensor:
    """One KFC image of a clip (frame indices): ``which`` 0 = its key frame, 1 = the grid of the others."""
    if which == 0:
        return mllm_transform(frames[clip[0]], size)
    return mllm_transform(make_grid([frames[i] for i in clip[1:]], grid), size)


def sam2_resize(pil: Image.Image, size: int = 1024) -> torch.Tensor:
    """RGB frame -> uint8 [3, size, size] with PIL's default resampling (aspect ratio not kept)."""
    img = pil.convert("RGB").resize((size, size))
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def sam2_normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [3,S,S] or [N,3,S,S] -> float32 (x/255 - mean)/std, on the input's device."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise ValueError(f"sam2_normalize expects a uint8 tensor (values 0..255), got "
                         f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"sam2_normalize expects [3,S,S] or [N,3,S,S], got shape {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _tile_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Candidate (cols, rows) grids with min_num <= cols*rows <= max_num, by increasing tile count."""
    grids = {(i, j) for n in range(min_num, max_num + 1)
             for i in range(1, n + 1) for j in range(1, n + 1) if min_num <= i * j <= max_num}
    return sorted(grids, key=lambda g: g[0] * g[1])


def _closest_grid(aspect: float, grids, width: int, height: int, image_size: int) -> tuple[int, int]:
    """Grid whose aspect is closest; on an exact tie the later (more tiles) grid wins when the image
    has more than half of that grid's pixel area (InternVL's rule)."""
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for g in grids:
        diff = abs(aspect - g[0] / g[1])
        if diff < best_diff:
            best, best_diff = g, diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * g[0] * g[1]:
            best = g
    return best


def dynamic_preprocess(pil: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                       use_thumbnail: bool = True) -> list[Image.Image]:
    """InternVL dynamic tiling: resize to the closest cols x rows grid of image_size tiles, crop the tiles
    row-major, and append an image_size thumbnail of the whole image when there is more than one tile."""
    width, height = pil.size
    cols, rows = _closest_grid(width / height, _tile_grids(min_num, max_num), width, height, image_size)
    resized = pil.resize((image_size * cols, image_size * rows))
    tiles = []
    for k in range(cols * rows):
        x, y = (k % cols) * image_size, (k // cols) * image_size
        tiles.append(resized.crop((x, y, x + image_size, y + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(pil.resize((image_size, image_size)))
    return tiles
