"""Random-weight diffusers models saved to a temp directory (no downloads), for the parity tests."""

import numpy as np
import torch


def save_random(model_cls, config: dict, directory, seed: int = 0, scale: float = 0.2):
    """Build a diffusers model with N(0, scale^2) weights (so every path matters), save it, return it."""
    torch.manual_seed(seed)
    model = model_cls(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def torch_forward(model, *args, **kwargs) -> np.ndarray:
    with torch.no_grad():
        tensors = [torch.from_numpy(np.asarray(a)) if isinstance(a, np.ndarray) else a for a in args]
        kw = {k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
        return model(*tensors, **kw).sample.numpy()
