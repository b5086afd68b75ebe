"""vdm_jax: Variational Diffusion Models (Kingma, Salimans, Poole, Ho 2021) in JAX.

The maths as pure functions (:mod:`vdm_jax.diffusion`, :mod:`vdm_jax.losses`), noise
schedules as small Flax modules (:mod:`vdm_jax.schedules`), the paper's score network
(:mod:`vdm_jax.nets`), the model and its bound (:mod:`vdm_jax.model`), samplers and the ODE
likelihood (:mod:`vdm_jax.sampling`), evaluation (:mod:`vdm_jax.evaluation`) and the pure train
step (:mod:`vdm_jax.train`). The training system lives in submodules imported on demand:
:mod:`vdm_jax.data` (grain input), :mod:`vdm_jax.parallel` (jit/pmap), :mod:`vdm_jax.checkpoint`
(orbax) and :mod:`vdm_jax.experiment` (config-driven runs). Conventions: gamma = -log SNR,
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
from vdm_jax.evaluation import EvalResult, evaluate_bpd, independent_pixel_bpd
from vdm_jax.losses import (
    bits_per_dim,
    decoder_log_probs,
    diffusion_loss_continuous,
    diffusion_loss_discrete,
    prior_kl,
    reconstruction_nll,
)
from vdm_jax.model import VDM, VLBTerms, make_schedule
from vdm_jax.nets import (
    AttentionBlock,
    ResNetBlock,
    ScoreUNet,
    base2_fourier_features,
    largest_group_count,
    timestep_embedding,
)
from vdm_jax.sampling import (
    ODELikelihood,
    ancestral_sample,
    ddim_sample,
    ode_log_likelihood,
    ode_log_prob_latent,
    ode_sample,
    probability_flow_drift,
    solve_probability_flow,
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
from vdm_jax.train import TrainState, eval_terms, init_state, make_optimizer, train_step

__version__ = "0.1.0"

__all__ = [
    "VDM",
    "AttentionBlock",
    "DenseMonotone",
    "EvalResult",
    "FixedLinearSchedule",
    "LearnedLinearSchedule",
    "MonotonicSchedule",
    "ODELikelihood",
    "ResNetBlock",
    "ScoreUNet",
    "TrainState",
    "VLBTerms",
    "alpha_sigma",
    "ancestral_sample",
    "ancestral_step",
    "base2_fourier_features",
    "bits_per_dim",
    "ddim_sample",
    "decoder_log_probs",
    "diffusion_loss_continuous",
    "diffusion_loss_discrete",
    "emit_variance_gradient",
    "encode",
    "eval_terms",
    "evaluate_bpd",
    "fixed_linear",
    "gamma_and_derivative",
    "gamma_with_variance_gradient",
    "independent_pixel_bpd",
    "init_state",
    "largest_group_count",
    "make_optimizer",
    "make_schedule",
    "ode_log_likelihood",
    "ode_log_prob_latent",
    "ode_sample",
    "posterior",
    "predict_x",
    "prior_kl",
    "probability_flow_drift",
    "q_sample",
    "q_step",
    "reconstruction_nll",
    "snr",
    "solve_probability_flow",
    "timestep_embedding",
    "train_step",
    "transition",
]
