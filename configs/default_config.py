"""The configuration `python train.py` uses. Edit the values here.

Every key and its meaning is in hybridmednet/config.py; keys not listed here keep
those defaults. Unknown keys are an error when the model is built.
"""

from hybridmednet.config import Config as _Defaults


class Config(_Defaults):
    MODEL = {
        **_Defaults.MODEL,
        'backbone': 'convnext_base',  # or 'swin_base', 'efficientnetv2_m', ... (hybridmednet models)
        'use_modern_attention': True,  # False -> classic CBAM
        'use_cross_scale_attention': True,
        'num_heads': 8,
        'num_classes': 14,
        'pretrained': True,  # ImageNet weights; or a path to a local weights file
    }
    TRAIN = {
        **_Defaults.TRAIN,
        'batch_size': 32,
        'epochs': 50,
        'learning_rate': 1e-4,
        'weight_decay': 1e-4,
        'lr_scheduler': 'cosine',
        'warmup_epochs': 5,
        'gradient_accumulation_steps': 1,
        'mixed_precision': True,
        'early_stopping_patience': 10,
    }
    DATA = {
        **_Defaults.DATA,
        'data_dir': None,  # None -> the built-in synthetic sample dataset
        'labels_file': None,  # e.g. 'Data_Entry_2017.csv'
        'image_size': 224,
        'num_workers': 4,
        'use_albumentations': False,
    }
