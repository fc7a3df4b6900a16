# Shared part of the SaSaSa2VA training configs (spec model_training.md §6, model_training_reference.md §7).
# The per-model configs import this file with `read_base()` and then set only what differs: MLLM path,
# Sa2VA .pth, template, batch size / accumulation, dataset repeats. Values only, no logic.
from mmengine.hooks import DistSamplerSeedHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from torch.optim import AdamW
from transformers import AutoTokenizer
from xtuner.dataset.samplers import LengthGroupedSampler
from xtuner.engine.runner import TrainLoop

from projects.sasasa2va.datasets.collate import sasasa2va_collate_fn
from projects.sasasa2va.datasets.concat import ConcatDatasetWithRepeats
from projects.sasasa2va.datasets.refseg import SaSaSa2VARefSeg
from projects.sasasa2va.datasets.refvos import SaSaSa2VARefVOS
from projects.sasasa2va.models.sasasa2va import SaSaSa2VAModel
from projects.sasasa2va.utils.checkpoint import RNGStateHook, SafeCheckpointHook

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
special_tokens = ['[SEG]', '<p>', '</p>', '<vp>', '</vp>']
max_length = 12288
sam2_ckpt = './pretrained/sam2/sam2_hiera_large.pt'

# Scheduler & optimizer (per-device batch x accumulation set by each config)
batch_size = 2
accumulative_counts = 4
dataloader_num_workers = 8
max_epochs = 1
optim_type = AdamW
lr = 4e-5  # official 1024 -> 4e-5
betas = (0.9, 0.999)
weight_decay = 0.05
max_norm = 1  # grad clip
warmup_ratio = 0.05

# Save / log
save_steps = 1000
save_total_limit = 2  # maximum checkpoints to keep (-1 means unlimited)
log_interval = 10

#######################################################################
#                      PART 2  Model                                  #
#######################################################################
# mllm_path / template / pretrained_pth are set by each config.
model = dict(
    type=SaSaSa2VAModel,
    mllm_path=None,
    template=None,
    pretrained_pth=None,
    sam2_config='sam2_hiera_l',
    sam2_ckpt=sam2_ckpt,
    special_tokens=special_tokens,
    lora=dict(r=128, lora_alpha=256, lora_dropout=0.05),
    freeze_vision=True,
    freeze_llm=True,
    train_mlp1=True,
    train_sam2_decoder=True,
    train_sam2_encoder=False,
    train_embeddings='new',  # rows of the added special tokens (spec §3.8); 'none' = reference behaviour
    loss_mask_weight=2.0,
    loss_dice_weight=0.5,
    llm_loss_weight=1.0,
    num_points=12544,
    sample_points=True,
    num_objects=5,
    dtype='auto',  # bf16 on CUDA, float32 on CPU
    gradient_checkpointing=True,
)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
# Paths of the training datasets (model_training_reference §7.3). Each config adds tokenizer,
# template_name, special_tokens, max_length and repeats.
refcoco = dict(type=SaSaSa2VARefSeg, data_root='./data/ref_seg/refcoco', refs_file='refs(unc).p',
               num_objects=5)
refcoco_plus = dict(type=SaSaSa2VARefSeg, data_root='./data/ref_seg/refcoco+', refs_file='refs(unc).p',
                    num_objects=5)
refcocog = dict(type=SaSaSa2VARefSeg, data_root='./data/ref_seg/refcocog', refs_file='refs(umd).p',
                num_objects=5)
revos = dict(type=SaSaSa2VARefVOS, image_folder='./data/video_datas/revos/',
             expression_file='./data/video_datas/revos/meta_expressions_train_.json',
             mask_file='./data/video_datas/revos/mask_dict.json', dataset_type='default', num_objects=5)
mevis = dict(type=SaSaSa2VARefVOS, image_folder='./data/video_datas/mevis/train/JPEGImages',
             expression_file='./data/video_datas/mevis/train/meta_expressions.json',
             mask_file='./data/video_datas/mevis/train/mask_dict.json', dataset_type='default', num_objects=5)
refytvos = dict(type=SaSaSa2VARefVOS, image_folder='./data/video_datas/rvos/train/JPEGImages/',
                expression_file='./data/video_datas/rvos/meta_expressions/train/meta_expressions.json',
                mask_file='./data/video_datas/rvos/mask_dict.pkl', dataset_type='refytvos', num_objects=5)
refsav = dict(type=SaSaSa2VARefVOS, image_folder='./data/video_datas/sam_v_full/',
              expression_file='./data/video_datas/Ref-SAV.json', mask_file=None, dataset_type='refsav',
              num_objects=5)

# The dataset itself is set by each config; sampler sizes follow its batch_size * accumulative_counts.
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=None,
    sampler=dict(type=LengthGroupedSampler, length_property='modality_length',
                 per_device_batch_size=batch_size * accumulative_counts),
    collate_fn=dict(type=sasasa2va_collate_fn),
)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
# AmpOptimWrapper is replaced by DeepSpeed (default launcher on CUDA) or by a plain OptimWrapper on
# CPU (tools/train.py).
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale='dynamic',
    dtype='bfloat16',
)

# Schedulers step every iteration (micro-batch), as the reference.
param_scheduler = [
    dict(type=LinearLR, start_factor=1e-5, by_epoch=True, begin=0, end=warmup_ratio * max_epochs,
         convert_to_iter_based=True),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warmup_ratio * max_epochs, end=max_epochs,
         convert_to_iter_based=True),
]

train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
# RNG states go into every checkpoint, so a killed and resumed run continues with the same random draws
custom_hooks = [dict(type=RNGStateHook)]
default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=log_interval),
    param_scheduler=dict(type=ParamSchedulerHook),
    # save_optimizer=True (reference: False) so that --resume also restores the AdamW moments; old
    # checkpoints removed after the new one is saved (SafeCheckpointHook), not before
    checkpoint=dict(type=SafeCheckpointHook, save_optimizer=True, by_epoch=False, interval=save_steps,
                    max_keep_ckpts=save_total_limit),
    sampler_seed=dict(type=DistSamplerSeedHook),
)
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
# The SAM2 IoU / object-score heads are trainable but never reach the loss (argmax selection), so DDP
# must tolerate unused parameters (DeepSpeed does anyway).
find_unused_parameters = True
visualizer = None
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
log_processor = dict(by_epoch=False)
