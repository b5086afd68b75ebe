"""MuLAN against VDM at equal steps and equal network: one config per data set and model.

    python -m vdm_jax --config=experiments/mulan_vs_vdm/config.py:digits,mulan \
        --workdir=runs/mulan_digits
    python -m vdm_jax --config=experiments/mulan_vs_vdm/config.py:folder,linear,300 \
        --config.data.data_dir=DATA --workdir=runs/linear_folder

``get_config("DATA,MODEL[,STEPS][,smoke]")``:

- DATA ``digits``: the bundled 8x8 digits and their config's network (2 blocks x 32
  channels, batch 32, AdamW 2e-3); ``folder``: a folder of 32x32 RGB images
  (``data.data_dir``, default :data:`DATA`, the subset ``run.py`` writes) with the bundled
  CIFAR-10 config's model shrunk to 2 blocks x 32 channels, batch 16, AdamW 1e-3.
- MODEL ``linear``: VDM with the learned linear schedule (its endpoints learn); ``monotonic``:
  VDM with the paper's learned monotonic network (endpoints trained by the bound, shape by the
  variance-minimising gradient of appendix I.2); ``mulan``: MuLAN (the bundled ``*_mulan``
  configs' model: a per-pixel polynomial schedule between fixed endpoints, conditioned on a
  gaussian latent of 8 dimensions against N(0, I) (a true bound, comparable with VDM's) from
  an encoder of 1 block x 32 channels; the score network predicts v, as the authors').
- STEPS: training steps (default :data:`STEPS`); the test bound is evaluated, and a
  checkpoint kept, at a third, two thirds and the end.
- ``smoke``: the smoke model, a few steps, on one device.

All three models of a data set share the U-Net (blocks, channels, attention, dropout), the
batch, the optimiser and the steps. The learning rate is constant after its warm-up (no
decay), so the parameters at step n are those of an n-step run of the same config, and the
reconstruction term is computed with the full softmax (``model.reconstruction_window = 0``,
the only formulation MuLAN has) in all three, so their steps/s compare like with like.
"""

from vdm_jax.configs import base, cifar10, cifar10_mulan, digits, digits_mulan
from vdm_jax.errors import UserError

#: Training steps of each model by data set (the study's, sized for a shared 2-core CPU).
STEPS = {"digits": 900, "folder": 300}
#: Where run.py writes its subset of an image folder by default.
DATA = "/tmp/vdm_mulan_vs_vdm/data"
DATASETS = ("digits", "folder")
MODELS = ("linear", "monotonic", "mulan")
_VDM = {
    "linear": {"schedule": "learned_linear", "variance_gradient": False},
    "monotonic": {"schedule": "monotonic", "variance_gradient": True},
}


def _folder(mulan: bool):
    config = cifar10_mulan.get_config() if mulan else cifar10.get_config()
    config.data.name = "folder"
    config.data.data_dir = DATA
    config.model.n_layer = 2
    config.model.n_embd = 32
    # CPU formulations of the same function.
    config.model.attention = "chunked"
    config.model.batch_pieces = 2
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 50
    # A short run evaluates the moving average of its parameters: at the paper's 0.9999 it
    # would still be mostly the initial parameters after a few hundred steps.
    config.optimizer.ema_decay = 0.95
    config.training.batch_size = 16
    config.eval.batch_size = 50
    config.eval.discrete_timesteps = 0
    if mulan:  # the digits' MuLAN sizes: a gaussian latent (a true bound), a small encoder
        config.model.latent_kind = "gaussian"
        config.model.latent_size = 8
        config.model.encoder_n_layer = 1
        config.model.encoder_n_embd = 32
        config.model.schedule_features = 64
        config.model.norm_min_group_size = 4  # the U-Net's GroupNorm, as VDM's
    return config


def get_config(arg: str = "digits,mulan"):
    """The study's config for one data set and model (see the module docstring)."""
    dataset, model, *options = arg.split(",")
    if dataset not in DATASETS:
        raise UserError(f"unknown data set {dataset!r} in {arg!r}: choose from {DATASETS}")
    if model not in MODELS:
        raise UserError(f"unknown model {model!r} in {arg!r}: choose from {MODELS}")
    smoke = "smoke" in options
    numbers = [int(option) for option in options if option.isdigit()]
    steps = numbers[0] if numbers else (3 if smoke else STEPS[dataset])
    mulan = model == "mulan"
    if dataset == "digits":
        config = digits_mulan.get_config() if mulan else digits.get_config()
    else:
        config = _folder(mulan)
    if smoke:
        config = base.smoke(config)
        config.parallel.num_devices = 1  # it runs the protocol's code, not a device layout
    if not mulan:
        for field, value in _VDM[model].items():
            config.model[field] = value
    config.model.reconstruction_window = 0
    config.training.num_train_steps = steps
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
    config.optimizer.decay_steps = 0
    third = max(steps // 3, 1)
    config.training.eval_every = third
    config.training.checkpoint_every = third
    config.training.keep_checkpoints = 4
    config.training.log_every = max(steps // 12, 1)
    config.training.sample_every = 0  # one small grid at the end; not part of the study
    config.sampling.num_samples = 16
    config.sampling.sampling_steps = 20
    return config
