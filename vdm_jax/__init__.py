"""vdm_jax: Variational Diffusion Models (Kingma, Salimans, Poole, Ho 2021) in JAX.

The maths as pure functions (:mod:`vdm_jax.diffusion`, :mod:`vdm_jax.losses`), noise
schedules as small Flax modules (:mod:`vdm_jax.schedules`), the paper's score network
(:mod:`vdm_jax.nets`) and the input pipelines (:mod:`vdm_jax.data`). Conventions: gamma = -log SNR,
alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma); losses are per example in nats unless a
name says bits/dim.
"""

from vdm_jax.diffusion import (
    alpha_sigma,
    ancestral_step,
    encode,
    posterior,
    predict_x,
    q_sample,
    q_step,
    snr,
    transition,
)
from vdm_jax.losses import (
    bits_per_dim,
    decoder_log_probs,
    diffusion_loss_continuous,
    diffusion_loss_discrete,
    prior_kl,
    reconstruction_nll,
)
from vdm_jax.nets import (
    AttentionBlock,
    ResNetBlock,
    ScoreUNet,
    base2_fourier_features,
    largest_group_count,
    timestep_embedding,
)
from vdm_jax.schedules import (
    DenseMonotone,
    FixedLinearSchedule,
    LearnedLinearSchedule,
    MonotonicSchedule,
    emit_variance_gradient,
    fixed_linear,
    gamma_and_derivative,
    gamma_with_variance_gradient,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionBlock",
    "DenseMonotone",
    "FixedLinearSchedule",
    "LearnedLinearSchedule",
    "MonotonicSchedule",
    "ResNetBlock",
    "ScoreUNet",
    "alpha_sigma",
    "ancestral_step",
    "base2_fourier_features",
    "bits_per_dim",
    "decoder_log_probs",
    "diffusion_loss_continuous",
    "diffusion_loss_discrete",
    "emit_variance_gradient",
    "encode",
    "fixed_linear",
    "gamma_and_derivative",
    "gamma_with_variance_gradient",
    "largest_group_count",
    "posterior",
    "predict_x",
    "prior_kl",
    "q_sample",
    "q_step",
    "reconstruction_nll",
    "snr",
    "timestep_embedding",
    "transition",
]
