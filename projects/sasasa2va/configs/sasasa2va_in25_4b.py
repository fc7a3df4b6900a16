# SaSaSa2VA-4B: InternVL2.5-4B (Qwen2.5-3B LLM) fine-tuned from Sa2VA-4B with Key Frame Compression.
# Everything shared lives in _base_/sasasa2va_base.py; this file sets paths, sizes and repeats.
from mmengine.config import read_base
from transformers import AutoTokenizer

from projects.sasasa2va.datasets.concat import ConcatDatasetWithRepeats

with read_base():
    from ._base_.sasasa2va_base import *  # noqa: F401,F403

path = './pretrained/internvl2_5/InternVL2_5-4B'
pretrained_pth = './pretrained/Sa2VA_pth/model_in25_4b.pth'
template = 'phi3_chat'  # faithful: the 4B model was trained with phi3_chat on a Qwen2.5 tokenizer
batch_size = 2
accumulative_counts = 4

model.update(mllm_path=path, template=template, pretrained_pth=pretrained_pth)

tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=path,
                 trust_remote_code=True, padding_side='right')
data_args = dict(tokenizer=tokenizer, template_name=template, special_tokens=special_tokens, max_length=max_length)
train_dataset = dict(type=ConcatDatasetWithRepeats, datasets=[
    dict(refcoco, repeats=4, **data_args),
    dict(refcoco_plus, repeats=4, **data_args),
    dict(refcocog, repeats=4, **data_args),
    dict(revos, repeats=2, **data_args),
    dict(mevis, repeats=5, **data_args),
    dict(refytvos, repeats=2, **data_args),
    dict(refsav, repeats=3, **data_args),
])
train_dataloader.update(batch_size=batch_size, dataset=train_dataset)
train_dataloader.sampler.update(per_device_batch_size=batch_size * accumulative_counts)
optim_wrapper.update(accumulative_counts=accumulative_counts)
