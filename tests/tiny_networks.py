"""Score networks for tests about everything but the network: they compile in a moment, also
op by op, where the U-Net compiles hundreds of operations."""

import flax.linen as nn
import jax.numpy as jnp


class PixelNet(nn.Module):
    """A cheap score network with the ScoreUNet signature: one dense layer per pixel over
    (z, gamma_t)."""

    @nn.compact
    def __call__(self, z, gamma_t, labels=None, *, train=False):
        g = jnp.broadcast_to(jnp.reshape(gamma_t, (-1, 1, 1, 1)), z.shape)
        return nn.Dense(z.shape[-1])(jnp.concatenate([z, g], axis=-1))
