"""Augmentation presets over torchvision.transforms.v2, the on-device batched path, and MixUp/CutMix.

- ``build_train_transform`` / ``build_eval_transform``: PIL image -> normalised tensor (image files);
- ``BatchAugment``: uint8 batch on the device -> augmented normalised batch (whole data set as one tensor);
- ``build_batch_mix``: MixUp / CutMix on a batch, soft targets;
- ``PRESETS``: preset name -> one-line description.
"""
from visionkit.transforms.batch import BatchAugment
from visionkit.transforms.mix import BatchMix, build_batch_mix
from visionkit.transforms.presets import PRESETS, build_eval_transform, build_train_transform, is_small

__all__ = ["PRESETS", "BatchAugment", "BatchMix", "build_batch_mix", "build_eval_transform", "build_train_transform",
           "is_small"]
