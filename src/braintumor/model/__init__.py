"""Stages train_base and finetune: backbones, the input pipeline, augmentation, training."""
