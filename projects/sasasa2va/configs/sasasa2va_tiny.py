# Tiny SaSaSa2VA on the synthetic data: the embedded default that runs on a CPU.
#   bash tools/dist.sh train projects/sasasa2va/configs/sasasa2va_tiny.py 1
# tools/train.py creates the missing inputs first (see `auto_prepare`): the synthetic data
# (= tools/make_synthetic_data.py --root data/synthetic), the random tiny checkpoints
# (= tools/make_tiny_pretrained.py --out pretrained/tiny --image-size 56 --sam2-hidden-dim 128) and the
# stand-in pretraining of the tiny MLLM (= tools/pretrain_tiny.py, ~3 min), which plays the part of the
# Sa2VA checkpoint the real configs start from (pretrained_pth): without it the random MLLM's [SEG]
# states do not carry the expression and the model never learns to segment by language (README).
# Like the real configs, the pretrained MLLM (ViT, mlp1, LLM body, input embeddings) is then frozen: the
# LM head learns the answer format, text_hidden_fcs and SAM2 (decoder and image encoder) learn to segment.
from mmengine.config import read_base
from transformers import AutoTokenizer

from projects.sasasa2va.datasets.concat import ConcatDatasetWithRepeats

with read_base():
    from ._base_.sasasa2va_base import *  # noqa: F401,F403

data_root = 'data/synthetic/'
tiny_root = 'pretrained/tiny/'
path = tiny_root + 'InternVL-tiny'
template = 'qwen_chat'
batch_size = 1
accumulative_counts = 1
dataloader_num_workers = 1
# 3e-4: at 1e-3 the random-init SAM2 decoder learned colour matching only halfway (whole expressions
# segmented a neighbouring hue, blue -> cyan, green -> yellow; J&F ~50 over three seeds); README "Seed spread".
lr = 3e-4
weight_decay = 0.01
# passes over the synthetic mix (326 items with the default data); warmup is 5 % of the iterations.
max_epochs = 3
save_steps = 100
save_total_limit = 2
log_interval = 10
# Tiny model: 56 px InternViT (4 tokens per image: the 20 KFC images are 80 tokens), 256 px SAM2
# (64 x 64 low-res masks) 128 wide.
image_size = 56
tokens_per_image = 4
sam2_image_size = 256
sam2_hidden_dim = 128

# Created by tools/train.py when missing (library calls, same as the tools named above).
auto_prepare = dict(
    synthetic_data=dict(root=data_root, seed=0),
    tiny_pretrained=dict(out_dir=tiny_root, arch='qwen2', image_size=image_size, seed=0,
                         sam2_hidden_dim=sam2_hidden_dim),
    stand_in_pretraining=dict(steps=200, accumulate=8, lr=1e-3, num_objects=1, prompt_scale=6.0, seed=0),
)

model.update(
    mllm_path=path,
    template=template,
    pretrained_pth=tiny_root + 'sa2va_tiny.pth',
    sam2_config=dict(name='tiny', hidden_dim=sam2_hidden_dim),
    sam2_ckpt=tiny_root + 'sam2_tiny.pt',
    lora=None,
    freeze_vision=True,
    freeze_llm=True,
    train_mlp1=False,
    train_sam2_encoder=True,
    train_embeddings='lm_head',
    # BCE + Dice on every 64 x 64 low-res pixel: cheap at this size, steadier than 12544 sampled points
    sample_points=False,
    gradient_checkpointing=False,
)

tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=path, padding_side='right')
data_args = dict(tokenizer=tokenizer, template_name=template, special_tokens=special_tokens, max_length=max_length,
                 image_size=image_size, tokens_per_image=tokens_per_image, sam2_image_size=sam2_image_size)
train_dataset = dict(type=ConcatDatasetWithRepeats, datasets=[
    dict(refcoco, data_root=data_root + 'ref_seg/refcoco', repeats=1, **data_args),
    dict(refcoco_plus, data_root=data_root + 'ref_seg/refcoco+', repeats=1, **data_args),
    dict(refcocog, data_root=data_root + 'ref_seg/refcocog', repeats=1, **data_args),
    dict(revos, image_folder=data_root + 'revos/JPEGImages', expression_file=data_root + 'revos/meta_expressions_train_.json',
         mask_file=data_root + 'revos/mask_dict.json', repeats=1, **data_args),
    dict(mevis, image_folder=data_root + 'mevis/train/JPEGImages',
         expression_file=data_root + 'mevis/train/meta_expressions.json',
         mask_file=data_root + 'mevis/train/mask_dict.json', repeats=1, **data_args),
    dict(refytvos, image_folder=data_root + 'rvos/train/JPEGImages',
         expression_file=data_root + 'rvos/meta_expressions/train/meta_expressions.json',
         mask_file=data_root + 'rvos/mask_dict.pkl', repeats=1, **data_args),
    dict(refsav, image_folder=data_root + 'sam_v_full', expression_file=data_root + 'Ref-SAV.json', repeats=1,
         **data_args),
])
train_dataloader.update(batch_size=batch_size, num_workers=dataloader_num_workers, dataset=train_dataset)
train_dataloader.sampler.update(per_device_batch_size=batch_size * accumulative_counts)
optim_wrapper.update(accumulative_counts=accumulative_counts)
optim_wrapper.optimizer.update(lr=lr, weight_decay=weight_decay)
train_cfg.update(max_epochs=max_epochs)
param_scheduler[0].update(end=warmup_ratio * max_epochs)
param_scheduler[1].update(begin=warmup_ratio * max_epochs, end=max_epochs)
default_hooks.logger.update(interval=log_interval)
default_hooks.checkpoint.update(interval=save_steps, max_keep_ckpts=save_total_limit)
# A fixed seed makes the quickstart reproducible (the real configs leave it unset); other seeds: README.
randomness.update(seed=0)
