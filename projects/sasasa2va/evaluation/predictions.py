"""One expression through a model's ``predict_forward``: the task and the normalized output the runner
stores, the model's accepted keywords checked once, and any failure kept as that expression's result."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

logger = logging.getLogger("sasasa2va.eval")


@dataclass
class ExpressionTask:
    """One expression of the current video, ready for the model."""

    index: int
    video_id: str
    exp_id: str
    text: str               # expression fed to the model (the blind text in the language-blind control)
    prompt: str             # eval_prompt(text), also stored as results "exp"
    selected_fids: list[int] | None = None


@dataclass
class ExpressionOutput:
    """Normalised model output for one expression. status: ok | no_seg | failed."""

    status: str
    prediction: str = ""
    masks: np.ndarray | None = None   # bool [T,H,W]
    probs: np.ndarray | None = None   # [T,H,W]: float32 in [0,1], or uint8 round(255 p) (quantize_probs)
    num_seg: int = 0
    error: str | None = None
    seconds: float = 0.0


@dataclass
class PredictOptions:
    return_probs: bool | str = True  # True: float32; evaluate_shard asks models that offer it for "uint8"
    extra_kwargs: dict = field(default_factory=dict)  # forwarded to predict_forward (model fix options)
    pass_return_probs: bool = True  # False: predict_forward does not take it (e.g. an official export's code)
    fitted: bool = False  # fit_options_to_model has checked these against the model


def predict_forward_accepts(model, names) -> dict:
    """{name: whether model.predict_forward takes that keyword} (a ``**kwargs`` takes every name)."""
    import inspect

    try:
        params = inspect.signature(model.predict_forward).parameters
    except (TypeError, ValueError):
        return {n: True for n in names}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    return {n: var_kw or n in params for n in names}


def fit_options_to_model(model, options: PredictOptions) -> PredictOptions:
    """The official Sa2VA / SaSaSa2VA exports' predict_forward has the reference signature: without
    ``return_probs`` (their binary masks then serve as 0/1 probabilities for averaging) and without this
    repository's option keywords, which are refused here, before any prediction, by name."""
    if options.fitted:
        return options
    accepts = predict_forward_accepts(model, ["mode", "selected_fids", "return_probs", *options.extra_kwargs])
    if not (accepts["mode"] and accepts["selected_fids"]):
        raise ValueError("the model's predict_forward takes no mode / selected_fids (a Sa2VA export's own code? "
                         "SaSaSa2VA's five modes need them); load it with --no-remote-code")
    refused = sorted(k for k in options.extra_kwargs if not accepts[k])
    if refused:
        raise ValueError(f"the model's predict_forward takes no {refused} (its folder's own code, e.g. an official "
                         f"export); drop these options, or load it with --no-remote-code")
    if not accepts["return_probs"]:
        logger.warning("the model's predict_forward takes no return_probs (an official export's code?): its "
                       "binary masks are stored as 0/1 probabilities for selective averaging")
    return dataclasses.replace(options, pass_return_probs=accepts["return_probs"], fitted=True)


def failed_output(error: str, prediction: str = "", seconds: float = 0.0) -> ExpressionOutput:
    return ExpressionOutput(status="failed", prediction=prediction, error=error, seconds=seconds)


def _first_array(value, what: str, shape: tuple[int, int, int], dtype) -> np.ndarray | None:
    """The first [T,H,W] array of a result field as ``dtype``; ``dtype=None`` (probabilities): uint8
    stays uint8 (already quantized), anything else becomes float32."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            return None
        value = value[0]
    if hasattr(value, "detach"):
        value = value.detach()
        if dtype is None and value.dtype.is_floating_point:
            value = value.float()
        value = value.cpu().numpy()
    arr = np.asarray(value)
    if arr.shape != shape:
        raise ValueError(f"model returned {what} of shape {arr.shape}, expected [T,H,W] = {list(shape)}")
    if dtype is None:
        dtype = np.uint8 if arr.dtype == np.uint8 else np.float32
    return arr.astype(dtype, copy=False)


def normalize_output(raw: Any, num_frames: int, hw: tuple[int, int]) -> ExpressionOutput:
    """Check a predict_forward result against the video and convert it (raises ValueError)."""
    if not isinstance(raw, dict):
        raise ValueError(f"predict_forward returned {type(raw).__name__}, expected a dict")
    shape = (num_frames, int(hw[0]), int(hw[1]))
    status = raw.get("status", "ok")
    if status not in ("ok", "no_seg"):
        raise ValueError(f"predict_forward returned status {status!r}, expected 'ok' or 'no_seg'")
    text = raw.get("prediction", "")
    text = text if isinstance(text, str) else str(text)
    masks = _first_array(raw.get("prediction_masks"), "prediction_masks", shape, bool)
    probs = _first_array(raw.get("probabilities"), "probabilities", shape, None)
    if masks is None:
        if status == "ok":
            raise ValueError("predict_forward returned status 'ok' without prediction_masks")
        masks = np.zeros(shape, dtype=bool)
    if probs is None:
        probs = masks.astype(np.float32)
    num_seg = int(raw.get("num_seg", 0 if status == "no_seg" else 1))
    if status == "no_seg":
        return ExpressionOutput("no_seg", text, masks, probs, num_seg,
                                error=f"no [SEG] token in the generated text (status no_seg, num_seg={num_seg})")
    return ExpressionOutput("ok", text, masks, probs, num_seg)


def probs_request(model, return_probs):
    """What to ask ``model`` for: uint8 probabilities (quantized on its device, what the run stores anyway)
    when it lists them in ``probs_formats``, else ``return_probs`` as given."""
    if return_probs is True and "uint8" in getattr(model, "probs_formats", ()):
        return "uint8"
    return return_probs


def predict_one(model, tokenizer, frames, task: ExpressionTask, mode: str, options: PredictOptions,
                hw: tuple[int, int]) -> ExpressionOutput:
    """predict_forward for one expression; any exception becomes a failed output."""
    import torch

    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            probs = {"return_probs": options.return_probs} if options.pass_return_probs else {}
            raw = model.predict_forward(video=frames, text=task.prompt, tokenizer=tokenizer, mode=mode,
                                        selected_fids=task.selected_fids, **probs, **options.extra_kwargs)
        out = normalize_output(raw, len(frames), hw)
    except Exception as exc:  # recorded per expression; the run goes on
        logger.debug("expression %s/%s failed", task.video_id, task.exp_id, exc_info=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return failed_output(f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0)
    out.seconds = time.perf_counter() - t0
    return out


def predict_video(model, tokenizer, frames, items: Sequence[ExpressionTask], mode: str,
                  options: PredictOptions, on_result: Callable[[int, ExpressionOutput], None] | None = None
                  ) -> list[ExpressionOutput]:
    """Outputs for every expression of one video in one mode (same order as ``items``): one
    predict_forward call per expression.

    The runner uses this per-expression path for models without ``predict_video`` (see
    ``supports_shared_path``; SaSaSa2VAChatModel goes through ``_run_video_shared`` instead). A
    replacement may report each output early through ``on_result(i, output)`` (written immediately)
    and return the rest.
    """
    hw = (frames[0].size[1], frames[0].size[0])
    outs = []
    for i, task in enumerate(items):
        out = predict_one(model, tokenizer, frames, task, mode, options, hw)
        if on_result is not None:
            on_result(i, out)
        outs.append(out)
    return outs
