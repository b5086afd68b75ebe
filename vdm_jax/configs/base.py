"""Every field an experiment reads, with the paper's CIFAR-10 settings as defaults.

This file is the one list of config fields: their names, defaults and (in the comment on or
above each line) what they mean. ``vdm_jax.training.config`` takes the known fields, their
types and the defaults of fields an older config lacks from here; ``--mode=show_config``
prints the comments. Data-set configs start from :func:`get_config` and override only what
differs. Fields with no value use ``placeholder`` (typed, None until set), so they can still
be set from the command line, e.g. ``--config.data.data_dir=/data/tfds``.
"""

import inspect
import io
import re
import tokenize

import ml_collections
from ml_collections import config_dict

from vdm_jax.errors import UserError

__all__ = ["VARIANTS", "field_descriptions", "get_config", "smoke", "with_variant"]


def get_config() -> ml_collections.ConfigDict:
    """The base config (CIFAR-10 as in the paper)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # seeds the parameters, the data order and every random draw of the run

    config.data = ml_collections.ConfigDict()
    # digits | cifar10 | mnist | imagenet32 | imagenet64 | folder
    config.data.name = "cifar10"
    # tfds data_dir, or the root of an image folder (name='folder').
    config.data.data_dir = config_dict.placeholder(str)
    # The paper's flips and 90-degree rotations, flagged in the batch as "conditioning".
    config.data.augment = False

    config.model = ml_collections.ConfigDict()
    config.model.n_layer = 32  # ResNet blocks of the score network (one resolution)
    config.model.n_embd = 128  # channels of the score network
    config.model.dropout_rate = 0.1  # dropout in the ResNet blocks while training
    config.model.attention_everywhere = False  # self-attention after every block, not only mid
    config.model.with_fourier_features = True  # concatenate Fourier features of z_t (appendix C)
    config.model.fourier_exponents = (6, 7)  # their frequencies 2**n * 2 pi, n in this tuple
    config.model.norm_groups = 32  # GroupNorm groups (fewer when the channels do not split)
    config.model.norm_min_group_size = 4  # fewest channels per GroupNorm group (1: exact groups)
    # Concatenate the batch's float flag "conditioning" (augmented or not) to the time embedding.
    config.model.conditioning_input = False
    config.model.num_classes = 0  # > 0: class-conditional (label num_classes = unconditional)
    config.model.dtype = "float32"  # float32 | bfloat16 activations (parameters stay float32)
    config.model.schedule = "learned_linear"  # fixed_linear | learned_linear | monotonic
    config.model.gamma_min = -13.3  # gamma(0) = -log SNR at t = 0 (initial value if learned)
    config.model.gamma_max = 5.0  # gamma(1) = -log SNR at t = 1 (initial value if learned)
    config.model.schedule_features = 1024  # width of the monotonic schedule's network
    config.model.timesteps = 0  # T of the bound: 0 is continuous time, T > 0 discrete times i/T
    config.model.antithetic_time_sampling = True  # a batch's times (u + i/B) mod 1
    config.model.variance_gradient = False  # train the schedule's shape (appendix I.2); T = 0
    # dot_product (jax.nn.dot_product_attention: cuDNN flash attention on GPUs) | chunked (CPUs)
    config.model.attention = "dot_product"
    config.model.batch_pieces = 1  # run the network on the batch in N pieces (2: 2-core CPUs)
    config.model.reconstruction_window = 0  # > 0: windowed decoder normaliser (4: CPUs), same value
    config.model.remat = False  # recompute each block in the backward pass (less memory)
    config.model.parameterization = "eps"  # eps | v | x: what the score network predicts

    # What training minimises (Kingma & Gao 2023). Evaluation is always the bound (w = 1).
    config.objective = ml_collections.ConfigDict()
    # elbo | sigmoid | edm | edm_monotonic | v_mse | min_snr (see vdm_jax.maths.weightings)
    config.objective.weighting = "elbo"
    config.objective.bias = 0.0  # sigmoid: w = sigmoid(bias - lambda)
    config.objective.sigma_data = 0.5  # edm, edm_monotonic
    config.objective.p_mean = -1.2  # edm, edm_monotonic: mean of log sigma
    config.objective.p_std = 1.2  # edm, edm_monotonic: std of log sigma
    config.objective.snr_gamma = 5.0  # min_snr: min(SNR, snr_gamma) / SNR
    # schedule: the schedule's uniform t | adaptive: a learned histogram over lambda (T = 0)
    config.objective.noise_levels = "schedule"
    config.objective.noise_bins = 100  # adaptive: equal bins of [gamma(0), gamma(1)]
    config.objective.noise_floor = 0.1  # adaptive: share of the uniform density mixed in
    config.objective.noise_ema_decay = 0.99  # adaptive: EMA decay of the histogram

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 2e-4  # AdamW's peak learning rate
    config.optimizer.b1 = 0.9  # Adam's first-moment decay
    config.optimizer.b2 = 0.99  # Adam's second-moment decay
    config.optimizer.eps = 1e-8  # Adam's epsilon
    config.optimizer.weight_decay = 0.01  # decoupled weight decay of kernels and embeddings
    config.optimizer.warmup_steps = 100  # linear warm-up of the learning rate over these steps
    config.optimizer.decay_steps = 0  # > 0: cosine decay over this many steps after warm-up
    config.optimizer.end_learning_rate_factor = 0.0  # the decay ends at this x learning_rate
    config.optimizer.clip_norm = 0.0  # > 0: clip the global gradient norm to this value
    config.optimizer.ema_decay = 0.9999  # decay of the parameters' moving average (eval, samples)

    config.training = ml_collections.ConfigDict()
    config.training.batch_size = 128  # global, over all devices and hosts
    config.training.num_train_steps = 10_000_000  # optimizer updates of the whole run
    config.training.log_every = 100  # steps between metric lines (metrics.jsonl, TensorBoard)
    config.training.eval_every = 10_000  # steps between evaluations (0: only at the end)
    config.training.checkpoint_every = 5_000  # steps between checkpoints
    config.training.keep_checkpoints = 3  # the newest checkpoints kept on disk
    config.training.steps_per_dispatch = 1  # > 1: lax.scan over several steps per call
    config.training.sample_every = 50_000  # steps between PNG grids of samples (0: at the end)
    # A non-finite loss, gradient or parameter stops training (0), or N > 0: skip such updates
    # (parameters unchanged, counted in the metric skipped_updates), stopping after N in a row.
    config.training.skip_nonfinite_updates = 0

    config.parallel = ml_collections.ConfigDict()
    config.parallel.mode = "jit"  # jit (mesh and shardings) | pmap
    config.parallel.num_devices = -1  # devices to use; -1: all (over all processes)
    # The mesh: data x fsdp devices, one of them -1 (the rest). fsdp > 1 shards every
    # parameter of at least fsdp_min_size elements (and its EMA and Adam moments) over the
    # fsdp axis; 'jit' mode only.
    config.parallel.data = -1
    config.parallel.fsdp = 1  # devices each large parameter is sharded over (see data)
    config.parallel.fsdp_min_size = 2**16  # smaller parameters stay replicated under fsdp

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 256  # global evaluation batch (the last one padded and masked)
    # The split of one exact evaluation pass: 'train' or 'test'; tfds data sets also take
    # split expressions such as 'test[:1000]'.
    config.eval.split = "test"
    config.eval.discrete_timesteps = 0  # > 0: also the discrete-time bound at this T (e.g. 1000)

    config.sampling = ml_collections.ConfigDict()
    config.sampling.num_samples = 64  # images in a grid of samples
    config.sampling.sampler = "ancestral"  # ancestral | ddim | ode
    config.sampling.sampling_steps = 1000  # denoising steps of ancestral and DDIM sampling
    config.sampling.decode = "argmax"  # argmax | sample: how z_0 becomes integer pixels
    return config


def field_descriptions() -> dict[str, str]:
    """What each field of :func:`get_config` means, by dotted name (``'training.batch_size'``):
    the comment at the end of the field's line, or else the comment lines right above it,
    joined into one line."""
    source = inspect.getsource(get_config)
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    out, above = {}, []
    for number, line in enumerate(source.splitlines(), start=1):
        if line.strip().startswith("#"):
            above.append(comments[number])
            continue
        field = re.match(r"\s*config\.([\w.]+)\s*=(?!\s*ml_collections\.ConfigDict\()", line)
        if field:
            out[field.group(1)] = comments.get(number) or " ".join(above)
        above = []
    return out


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink any config to a few cheap steps that run anywhere (a CPU in seconds)."""
    config.model.n_layer = 1
    config.model.n_embd = 16
    config.model.schedule_features = 16
    config.model.dropout_rate = 0.0
    config.training.batch_size = 16
    config.training.num_train_steps = 4
    config.training.log_every = 2
    config.training.eval_every = 4
    config.training.checkpoint_every = 2
    config.training.sample_every = 0
    config.optimizer.warmup_steps = 0
    config.optimizer.ema_decay = 0.9
    config.eval.batch_size = 64
    config.sampling.num_samples = 16
    config.sampling.sampling_steps = 10
    return config


VARIANTS = {"smoke": smoke}


def with_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """Apply the named variant ('' for none; 'smoke') to a config."""
    if not variant:
        return config
    if variant not in VARIANTS:
        raise UserError(f"unknown config variant {variant!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[variant](config)
