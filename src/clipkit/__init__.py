"""clipkit: train CLIP and SigLIP contrastive vision-language models on open_clip towers."""

__version__ = "0.1.0"
