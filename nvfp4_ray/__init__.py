"""nvfp4-ray: quantize Hugging Face checkpoints to NVFP4 compressed-tensors checkpoints on Ray."""

__version__ = "0.1.0"
