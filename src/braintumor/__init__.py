"""Leak-free brain-tumor MRI classification: data, training, evaluation, Grad-CAM and app."""

__version__ = "0.1.0"
