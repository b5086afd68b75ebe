"""vdm_jax: Variational Diffusion Models (Kingma, Salimans, Poole, Ho 2021) in JAX.

This namespace is the maths and the models, importable without the training system: the forward
process and posterior (:mod:`vdm_jax.maths.diffusion`), the bound's terms
(:mod:`vdm_jax.maths.losses`), noise schedules as small Flax modules
(:mod:`vdm_jax.maths.schedules`), the paper's score network (:mod:`vdm_jax.models.unet`), the
model and its bound (:mod:`vdm_jax.models.vdm`), samplers and the ODE likelihood
(:mod:`vdm_jax.models.sampling`, :mod:`vdm_jax.models.ode`), evaluation over batches
(:mod:`vdm_jax.models.evaluation`), weightings of the bound (:mod:`vdm_jax.maths.weightings`)
and the Frechet distance (:mod:`vdm_jax.maths.frechet`). The training system (config, train
step, data, checkpoints, the trainer) is the subpackage :mod:`vdm_jax.training`; the command
line is :mod:`vdm_jax.cli` (``python -m vdm_jax``) and the bundled configs are
:mod:`vdm_jax.configs`. ``vdm_jax.pretrained`` (:mod:`vdm_jax.pretrained`, imported on first
use) reads the original code's checkpoints. ``vdm_jax.load_run(workdir)``
(:func:`vdm_jax.training.loading.load_run`, which imports the training system on first use)
gives a trained run's model, parameters and data info. ``vdm_jax.register_schedule``
(:func:`vdm_jax.models.vdm.register_schedule`) and ``vdm_jax.register_weighting``
(:func:`vdm_jax.maths.weightings.register_weighting`) add a schedule or weighting of one's own
by name, for ``make_schedule``, ``get_weighting`` and a config; a network and a data set
register in the training system (:func:`vdm_jax.training.builders.register_network`,
:func:`vdm_jax.training.source_names.register_source`).

Conventions: gamma = -log SNR, alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma); losses
are per example in nats unless a name says bits/dim.
"""

from importlib import metadata as _metadata

from vdm_jax.errors import UserError
from vdm_jax.maths import frechet, weightings
from vdm_jax.maths.diffusion import (
    alpha_sigma,
    ancestral_step,
    encode,
    eps_from_score,
    eps_from_v,
    eps_from_x,
    from_eps,
    posterior,
    predict_x,
    q_sample,
    q_step,
    score_from_eps,
    snr,
    to_eps,
    transition,
    v_from_eps,
    v_from_x,
    x_from_v,
)
from vdm_jax.maths.losses import (
    bits_per_dim,
    decoder_log_probs,
    diffusion_loss_continuous,
    diffusion_loss_discrete,
    importance_weighted_diffusion_loss,
    prior_kl,
    reconstruction_nll,
    weighted_diffusion_loss,
)
from vdm_jax.maths.schedules import (
    DenseMonotone,
    FixedLinearSchedule,
    LearnedLinearSchedule,
    MonotonicSchedule,
    ShiftedSchedule,
    UnnormalisedMonotonicSchedule,
    emit_variance_gradient,
    fixed_linear,
    gamma_and_derivative,
    gamma_with_variance_gradient,
)
from vdm_jax.maths.weightings import (
    get_weighting,
    histogram_probs,
    register_weighting,
    unregister_weighting,
)
from vdm_jax.models import evaluation, likelihood
from vdm_jax.models.embeddings import base2_fourier_features, timestep_embedding
from vdm_jax.models.evaluation import EvalResult, evaluate_bpd, independent_pixel_bpd
from vdm_jax.models.mulan import MuLAN
from vdm_jax.models.ode import (
    ODELikelihood,
    ode_log_likelihood,
    ode_log_prob_latent,
    ode_sample,
    probability_flow_drift,
    solve_probability_flow,
)
from vdm_jax.models.sampling import StepProgress, ancestral_sample, ddim_sample, dpm_solver_sample
from vdm_jax.models.unet import AttentionBlock, ResNetBlock, ScoreUNet, largest_group_count
from vdm_jax.models.vdm import (
    VDM,
    ObjectiveTerms,
    VLBTerms,
    make_schedule,
    register_schedule,
    unregister_schedule,
)

try:
    __version__ = _metadata.version("vdm-jax")  # pyproject.toml holds the one version string
except _metadata.PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "VDM",
    "AttentionBlock",
    "DenseMonotone",
    "EvalResult",
    "FixedLinearSchedule",
    "LearnedLinearSchedule",
    "MonotonicSchedule",
    "MuLAN",
    "ODELikelihood",
    "ObjectiveTerms",
    "ResNetBlock",
    "ScoreUNet",
    "ShiftedSchedule",
    "StepProgress",
    "UnnormalisedMonotonicSchedule",
    "UserError",
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
    "dpm_solver_sample",
    "emit_variance_gradient",
    "encode",
    "eps_from_score",
    "eps_from_v",
    "eps_from_x",
    "evaluate_bpd",
    "evaluation",
    "fixed_linear",
    "frechet",
    "from_eps",
    "gamma_and_derivative",
    "gamma_with_variance_gradient",
    "get_weighting",
    "histogram_probs",
    "importance_weighted_diffusion_loss",
    "independent_pixel_bpd",
    "largest_group_count",
    "likelihood",
    "load_run",
    "make_schedule",
    "ode_log_likelihood",
    "ode_log_prob_latent",
    "ode_sample",
    "posterior",
    "predict_x",
    "pretrained",
    "prior_kl",
    "probability_flow_drift",
    "q_sample",
    "q_step",
    "reconstruction_nll",
    "register_schedule",
    "register_weighting",
    "score_from_eps",
    "snr",
    "solve_probability_flow",
    "timestep_embedding",
    "to_eps",
    "transition",
    "unregister_schedule",
    "unregister_weighting",
    "v_from_eps",
    "v_from_x",
    "weighted_diffusion_loss",
    "weightings",
    "x_from_v",
]


def __getattr__(name: str):
    # load_run belongs to the training system (orbax, grain) and pretrained reads files (etils):
    # imported on first use, so that `import vdm_jax` stays the maths and the models.
    if name == "load_run":
        from vdm_jax.training.loading import load_run

        return load_run
    if name == "pretrained":
        import vdm_jax.pretrained

        return vdm_jax.pretrained
    raise AttributeError(f"module 'vdm_jax' has no attribute {name!r}")
