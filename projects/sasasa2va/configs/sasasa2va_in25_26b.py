# SaSaSa2VA-26B: InternVL2.5-26B (InternLM2.5-20B LLM) fine-tuned from Sa2VA-26B with Key Frame Compression.
# Everything shared lives in _base_/sasasa2va_base.py; this file sets paths, sizes and repeats.
from mmengine.config import read_base
from transformers import AutoTokenizer

from projects.sasasa2va.datasets.concat import ConcatDatasetWithRepeats

with read_base():
    from ._base_.sasasa2va_base import *  # noqa: F401,F403

path = './pretrained/internvl2_5/InternVL2_5-26B'
pretrained_pth = './pretrained/Sa2VA_pth/model_in25_26b.pth'
template = 'internlm2_chat'
batch_size = 1
accumulative_counts = 8

model.update(mllm_path=path, template=template, pretrained_pth=pretrained_pth,
             trust_remote_code=True,  # the InternLM2 tokenizer is remote code in the InternVL folder
             # faithful: the reference's linear-name scan also puts LoRA on InternLM2's head `output`
             lora=dict(r=128, lora_alpha=256, lora_dropout=0.05, include_internlm2_output=True))

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
