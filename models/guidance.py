"""Classifier-free guidance for the conditional UNet, as diffusers' Stable Diffusion pipeline does it.

The unconditional and conditional passes run as one batch of 2N (one secure evaluation, not two), and
the guided prediction is eps_u + scale * (eps_c - eps_u): linear, so under MPC it costs no kernel.
"""

from __future__ import annotations

import jax.numpy as jnp


def guided_prediction(model, params, sample, uncond_context, cond_context, guidance_scale: float,
                      timestep=None, time_terms=None, controlnet_cond=None):
    """UNet2DConditionModel output with classifier-free guidance; contexts are (N, tokens, dim) each.

    ``controlnet_cond``: for a `ControlledUNet`, the control image, one per sample (N rows, not doubled).
    """
    if uncond_context.shape != cond_context.shape:
        raise ValueError(f"unconditional and conditional contexts differ in shape: {uncond_context.shape} vs {cond_context.shape}")
    doubled = jnp.concatenate([sample, sample], axis=0)
    context = jnp.concatenate([uncond_context, cond_context], axis=0)
    control = {} if controlnet_cond is None else {"controlnet_cond": controlnet_cond, "guided": True}
    eps = model.apply(params, doubled, timestep, context, time_terms=time_terms, **control)
    eps_uncond, eps_cond = jnp.split(eps, 2, axis=0)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
