# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A VDM in your own JAX code
#
# This tutorial trains a Variational Diffusion Model on the 8x8 digits that ship with
# scikit-learn, with a network and a training loop of our own in plain JAX and optax. Besides
# the command line's split of the data, it takes from `vdm_jax` only pure functions: the
# forward process (`q_sample`), the three terms of the bound (`prior_kl`,
# `reconstruction_nll`, `diffusion_loss_continuous`), a learned noise schedule
# (`LearnedLinearSchedule` with `gamma_and_derivative`) and one step of the sampler
# (`ancestral_step`). It runs in a minute or two on a laptop CPU.
#
# Conventions: gamma(t) = -log SNR(t) increases with t; the bound's terms are per example in
# nats and `bits_per_dim` converts them.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import vdm_jax as vdm
from vdm_jax.training.sources import digits_source

OUT = os.environ.get("VDM_TUTORIAL_OUT", "tutorial_out")
os.makedirs(OUT, exist_ok=True)
STEPS = int(os.environ.get("VDM_TUTORIAL_STEPS", "4000"))

# %% [markdown]
# ## The data
#
# 1797 grey images of 8x8 pixels with 17 levels (0..16): integers, so the model's decoder is
# a categorical over a vocabulary of V = 17 values. We take the command line's split
# (`vdm_jax.training.sources.digits_source`: 1500 training and 297 test images, in a fixed
# shuffled order), so the test bound below is comparable with `python -m vdm_jax
# --config=digits`.

# %%
train_split, test_split = digits_source("train"), digits_source("test")
VOCAB = train_split.info.vocab_size  # 17


def all_images(source):
    return jnp.asarray(np.stack([source[i]["image"] for i in range(len(source))]))


train_images, test_images = all_images(train_split), all_images(test_split)  # uint8 [N, 8, 8, 1]
NUM_DIMS = 8 * 8 * 1
print(train_images.shape, test_images.shape)

# %% [markdown]
# ## Our own network
#
# An MLP that predicts the noise eps from z_t and gamma_t: the flattened latent and a
# sinusoidal embedding of gamma go through two hidden layers, and the output is added to z_t
# (as in the paper's network, eps_hat = z_t + f(z_t)). Parameters are a plain dict.

# %%
HIDDEN = 512


def init_mlp(key):
    sizes = [NUM_DIMS + 32, HIDDEN, HIDDEN, NUM_DIMS]
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m), "b": jnp.zeros(n)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def embed(gamma):  # gamma [B] -> [B, 32]
    frequencies = jnp.exp(jnp.linspace(0.0, np.log(1000.0), 16))
    angles = (gamma[:, None] + 14.0) / 20.0 * frequencies
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def mlp(params, z_t, gamma_t):  # z_t [B, 8, 8, 1], gamma_t [B] -> eps_hat [B, 8, 8, 1]
    h = jnp.concatenate([z_t.reshape(len(z_t), -1), embed(gamma_t)], axis=-1)
    for layer in params[:-1]:
        h = jax.nn.silu(h @ layer["w"] + layer["b"])
    out = h @ params[-1]["w"] + params[-1]["b"]
    return z_t + out.reshape(z_t.shape)


# %% [markdown]
# ## The schedule and the bound
#
# `LearnedLinearSchedule` is a two-parameter Flax module: gamma(t) = gamma_0 + (gamma_1 -
# gamma_0) t with learned endpoints. The bound on -log p(x) is the sum of
#
# - the prior term KL(q(z_1|x) || N(0, I)), from gamma_1;
# - the reconstruction term -log p(x|z_0), from gamma_0 and the categorical decoder;
# - the continuous-time diffusion term 1/2 gamma'(t) ||eps - eps_hat||^2 at one random t
#   per image, an unbiased estimate of the integral over t.

# %%
schedule = vdm.LearnedLinearSchedule(gamma_min=-8.0, gamma_max=6.0)


def bound(params, images, key):
    """Per-example terms (nats) of the bound for integer images [B, 8, 8, 1]."""
    gamma_fn = lambda t: schedule.apply(params["schedule"], t)  # noqa: E731
    x = vdm.encode(images, VOCAB)  # integers -> [-1, 1]
    batch = len(x)
    key_0, key_t, key_eps = jax.random.split(key, 3)
    gamma_0, gamma_1 = gamma_fn(jnp.zeros(())), gamma_fn(jnp.ones(()))

    prior = vdm.prior_kl(x, gamma_1)
    z_0 = vdm.q_sample(x, gamma_0, jax.random.normal(key_0, x.shape))
    reconstruction = vdm.reconstruction_nll(images, z_0, gamma_0, VOCAB)

    # Antithetic times: one uniform offset shared by the batch, evenly spread.
    t = jnp.mod(jax.random.uniform(key_t, ()) + jnp.arange(batch) / batch, 1.0)
    gamma_t, dgamma_dt = vdm.gamma_and_derivative(gamma_fn, t)
    eps = jax.random.normal(key_eps, x.shape)
    z_t = vdm.q_sample(x, gamma_t, eps)
    eps_hat = mlp(params["net"], z_t, gamma_t)
    diffusion = vdm.diffusion_loss_continuous(eps, eps_hat, dgamma_dt)
    return prior, reconstruction, diffusion


def loss_fn(params, images, key):
    prior, reconstruction, diffusion = bound(params, images, key)
    return jnp.mean(vdm.bits_per_dim(prior + reconstruction + diffusion, NUM_DIMS))


# %% [markdown]
# ## The training loop
#
# Adam with a short warm-up and a cosine decay; one key for the run, folded with the step.

# %%
key = jax.random.key(0)
params = {
    "net": init_mlp(jax.random.fold_in(key, 1)),
    "schedule": schedule.init(jax.random.fold_in(key, 2), jnp.zeros(())),
}
initial_schedule = params["schedule"]
learning_rate = optax.warmup_cosine_decay_schedule(0.0, 2e-3, 200, STEPS)
optimizer = optax.adam(learning_rate)
opt_state = optimizer.init(params)


@jax.jit
def train_step(params, opt_state, step):
    step_key = jax.random.fold_in(key, step)
    index = jax.random.randint(jax.random.fold_in(step_key, 0), (128,), 0, len(train_images))
    loss, grads = jax.value_and_grad(loss_fn)(params, train_images[index], step_key)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss


losses = []
for step in range(STEPS):
    params, opt_state, loss = train_step(params, opt_state, step)
    losses.append(float(loss))
    if step % 500 == 0 or step == STEPS - 1:
        print(f"step {step:5d}  train bound {np.mean(losses[-100:]):.3f} bits/dim")

# %% [markdown]
# ## How good is it?
#
# The test bound, averaged over 20 draws of (t, noise) per image, against the best model that
# treats every pixel independently (`independent_pixel_bpd`). This MLP, after a minute of
# training on 1500 images, does not get below that figure on the test images: it overfits
# (compare its train bound above) and, seeing the pixels as a flat vector, it knows nothing
# of their neighbours. The convolutional `ScoreUNet` that
# `python -m vdm_jax --config=digits` trains does beat it.

# %%
terms = jax.jit(bound)
draws = [terms(params, test_images, jax.random.fold_in(key, 10_000 + i)) for i in range(20)]
prior, reconstruction, diffusion = (np.mean(np.stack(d), axis=0) for d in zip(*draws, strict=True))
to_bpd = 1.0 / (NUM_DIMS * np.log(2.0))
test_bpd = float(np.mean(prior + reconstruction + diffusion) * to_bpd)
baseline = vdm.independent_pixel_bpd(np.asarray(train_images), np.asarray(test_images), VOCAB)
print(
    f"test bound {test_bpd:.3f} bits/dim (prior {np.mean(prior) * to_bpd:.4f}, "
    f"reconstruction {np.mean(reconstruction) * to_bpd:.4f}, "
    f"diffusion {np.mean(diffusion) * to_bpd:.3f}); "
    f"independent pixels {baseline:.3f} bits/dim"
)

# %% [markdown]
# ## The learned schedule
#
# Training moved the endpoints: gamma_0 trades the reconstruction term against the diffusion
# term, gamma_1 the prior term. In continuous time the diffusion term depends on the schedule
# only through its endpoints (the paper's invariance to the noise schedule), so a linear
# schedule loses nothing in the bound.

# %%
t = jnp.linspace(0.0, 1.0, 101)
gamma_learned = schedule.apply(params["schedule"], t)
gamma_initial = schedule.apply(initial_schedule, t)
fig, (ax_gamma, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
ax_gamma.plot(t, gamma_learned, label="learned")
ax_gamma.plot(t, gamma_initial, "--", color="grey", label="initial")
ax_gamma.set_xlabel("t")
ax_gamma.set_ylabel("gamma(t) = -log SNR(t)")
ax_gamma.set_title(f"gamma(0) = {gamma_learned[0]:.2f}, gamma(1) = {gamma_learned[-1]:.2f}")
ax_gamma.legend()
ax_loss.plot(np.convolve(losses, np.ones(50) / 50, mode="valid"))
ax_loss.set_yscale("log")
ax_loss.set_xlabel("step")
ax_loss.set_ylabel("train bound, bits/dim (moving average)")
fig.savefig(os.path.join(OUT, "schedule_and_loss.png"))

# %% [markdown]
# ## Sampling
#
# The ancestral sampler walks the discrete-time generative model from z_1 ~ N(0, I) down to
# z_0 in T steps: each is a sample of p(z_s|z_t) = q(z_s|z_t, x = x_hat(z_t)), which
# `ancestral_step` computes from the predicted noise. The decoder's most likely value turns
# z_0 into pixels.


# %%
@jax.jit
def sample(params, key, num=64, num_steps=200):
    gamma = schedule.apply(params["schedule"], jnp.linspace(0.0, 1.0, num_steps + 1))
    shape = (num, 8, 8, 1)

    def step(z_t, i):  # i = T, ..., 1: from t = i / T to s = (i - 1) / T
        gamma_t = jnp.full((num,), gamma[i])
        eps_hat = mlp(params["net"], z_t, gamma_t)
        noise = jax.random.normal(jax.random.fold_in(key, i), shape)
        return vdm.ancestral_step(z_t, eps_hat, gamma[i - 1], gamma[i], noise), None

    z_1 = jax.random.normal(jax.random.fold_in(key, 0), shape)
    z_0, _ = jax.lax.scan(step, z_1, jnp.arange(num_steps, 0, -1))
    return jnp.argmax(vdm.decoder_log_probs(z_0, gamma[0], VOCAB), axis=-1)


samples = np.asarray(sample(params, jax.random.key(1)))
fig, axes = plt.subplots(8, 8, figsize=(5, 5))
for image, ax in zip(samples, axes.flat, strict=True):
    ax.imshow(image[..., 0], cmap="gray_r", vmin=0, vmax=VOCAB - 1)
    ax.axis("off")
fig.suptitle("samples, 200 ancestral steps")
fig.savefig(os.path.join(OUT, "samples.png"))
print(f"wrote {OUT}/schedule_and_loss.png and {OUT}/samples.png")
