"""Noise schedules: monotonicity, exact endpoints, derivatives and the variance gradient."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vdm_jax as vdm

GRID = jnp.concatenate([jnp.linspace(0.0, 1.0, 1001), jnp.array([0.0, 1.0])])


def test_fixed_linear_values_and_checks():
    t = jnp.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(vdm.fixed_linear(t), [-13.3, -4.15, 5.0], rtol=1e-6)
    module = vdm.FixedLinearSchedule(-10.0, 4.0)
    np.testing.assert_allclose(module.apply({}, t), vdm.fixed_linear(t, -10.0, 4.0), rtol=1e-6)
    with pytest.raises(ValueError, match=r"gamma_min=2\.0, gamma_max=1\.0"):
        vdm.fixed_linear(t, 2.0, 1.0)
    with pytest.raises(ValueError, match=r"gamma_min=3\.0, gamma_max=3\.0"):
        vdm.LearnedLinearSchedule(3.0, 3.0).init(jax.random.key(0), t)


def test_monotonic_schedule_starts_as_the_linear_schedule():
    schedule = vdm.MonotonicSchedule()
    params = schedule.init(jax.random.key(0), jnp.zeros(()))
    np.testing.assert_allclose(schedule.apply(params, GRID), vdm.fixed_linear(GRID), atol=2e-5)
    assert params["params"]["l2"]["kernel"].shape == (1, 1024)


@pytest.mark.slow
def test_monotonic_schedule_shape_layers_learn_from_the_first_step():
    schedule = vdm.MonotonicSchedule(n_features=16)
    params = schedule.init(jax.random.key(0), jnp.zeros(()))
    t = jnp.linspace(0.1, 0.9, 7)
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(schedule.apply(p, t))))(params)
    assert float(jnp.max(jnp.abs(grads["params"]["l3"]["kernel"]))) > 0


@pytest.mark.slow
def test_gamma_and_derivative():
    schedule = vdm.LearnedLinearSchedule(-10.0, 6.0)
    params = schedule.init(jax.random.key(0), jnp.zeros(()))
    gamma, dgamma = vdm.gamma_and_derivative(lambda t: schedule.apply(params, t), GRID)
    np.testing.assert_allclose(gamma, vdm.fixed_linear(GRID, -10.0, 6.0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dgamma, 16.0, rtol=1e-6)

    mono = vdm.MonotonicSchedule(n_features=8)
    mparams = _perturbed(mono.init(jax.random.key(1), jnp.zeros(())), 7, 2.0)
    fn = lambda t: mono.apply(mparams, t)  # noqa: E731
    t = jnp.linspace(0.05, 0.95, 19)
    _, dgamma = vdm.gamma_and_derivative(fn, t)
    h = 1e-3
    finite_diff = (np.asarray(fn(t + h), np.float64) - np.asarray(fn(t - h), np.float64)) / (2 * h)
    np.testing.assert_allclose(dgamma, finite_diff, rtol=2e-3, atol=2e-3)
    # Any shape of t.
    gamma_2d, dgamma_2d = vdm.gamma_and_derivative(fn, t[:18].reshape(3, 6))
    assert gamma_2d.shape == dgamma_2d.shape == (3, 6)


def _perturbed(params, seed, scale):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)],
    )


_SCHEDULES = {
    "learned_linear": vdm.LearnedLinearSchedule(),
    "monotonic": vdm.MonotonicSchedule(n_features=32),
}


@functools.cache  # on first use, not while pytest collects the module
def _initial_params():
    return {k: s.init(jax.random.key(0), jnp.zeros(())) for k, s in _SCHEDULES.items()}


@jax.jit
def _schedule_checks(params_by_kind):
    out = {}
    for kind, schedule in _SCHEDULES.items():
        params = params_by_kind[kind]
        gamma = schedule.apply(params, GRID)
        endpoints = schedule.apply(params, method=schedule.endpoints)

        def at(p, t, schedule=schedule):
            return schedule.apply(p, t)

        grads = [jax.grad(at, argnums=(0, 1))(params, jnp.float32(t)) for t in (0.0, 1.0)]
        out[kind] = (gamma, endpoints, grads)
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 20.0))
def test_every_schedule_is_monotonic_with_exact_endpoints_for_random_parameters(seed, scale):
    params = {k: _perturbed(p, seed, scale) for k, p in _initial_params().items()}
    for gamma, (gamma_0, gamma_1), grads in _schedule_checks(params).values():
        gamma = np.asarray(gamma)
        assert np.all(np.diff(gamma[:-2]) >= 0)
        # gamma(0) and gamma(1) are the endpoints to the last bit.
        assert gamma[-2] == gamma_0 and gamma[0] == gamma_0
        assert gamma[-1] == gamma_1 and gamma[-3] == gamma_1
        assert gamma_1 >= gamma_0
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


class _Toy(nn.Module):
    """A VLB-like loss whose 'network' and prior also depend on the schedule."""

    variance_gradient: bool

    def setup(self):
        self.schedule = vdm.MonotonicSchedule(n_features=8)
        self.w = self.param("w", nn.initializers.constant(0.3), ())

    def __call__(self, x, t, eps):
        if self.variance_gradient:
            gamma, dgamma, channel = vdm.gamma_with_variance_gradient(self.schedule, t)
        else:
            gamma, dgamma = vdm.gamma_and_derivative(self.schedule, t)
        z = vdm.q_sample(x, gamma, eps)
        eps_hat = self.w * z * (1.0 + 0.1 * gamma[:, None])
        l_diff = vdm.diffusion_loss_continuous(eps, eps_hat, dgamma)
        if self.variance_gradient:
            l_diff = vdm.emit_variance_gradient(l_diff, channel)
        _, gamma_1 = self.schedule.endpoints()
        return vdm.prior_kl(x, gamma_1) + l_diff, l_diff


@pytest.mark.slow
def test_variance_gradient_is_squared_loss_gradient_for_shape_and_vlb_gradient_elsewhere():
    x = jax.random.normal(jax.random.key(0), (32, 5))
    eps = jax.random.normal(jax.random.key(1), (32, 5))
    t = jax.random.uniform(jax.random.key(2), (32,))
    plain, vm = _Toy(False), _Toy(True)
    params = plain.init(jax.random.key(3), x, t, eps)
    params["params"]["schedule"]["l3"] = _perturbed(params["params"]["schedule"]["l3"], 4, 1.0)

    # Jitted: op by op, every operation of the forward and backward passes compiles alone.
    vm_grads = jax.jit(jax.grad(lambda p: jnp.mean(vm.apply(p, x, t, eps)[0])))(params)
    vlb_grads = jax.jit(jax.grad(lambda p: jnp.mean(plain.apply(p, x, t, eps)[0])))(params)
    sq_grads = jax.jit(jax.grad(lambda p: jnp.mean(plain.apply(p, x, t, eps)[1] ** 2)))(params)
    vm_grads, vlb_grads, sq_grads = (g["params"] for g in (vm_grads, vlb_grads, sq_grads))
    np.testing.assert_allclose(vm.apply(params, x, t, eps)[0], plain.apply(params, x, t, eps)[0])

    def close(actual, desired):
        # float32 sums of terms of either sign: compare against the gradient's own scale.
        scale = float(jnp.max(jnp.abs(desired)))
        np.testing.assert_allclose(actual, desired, rtol=1e-4, atol=1e-5 * scale)

    close(vm_grads["w"], vlb_grads["w"])
    for name in ("gamma_min", "gamma_range"):
        close(vm_grads["schedule"][name], vlb_grads["schedule"][name])
    for name in ("l2", "l3"):
        jax.tree.map(close, vm_grads["schedule"][name], sq_grads["schedule"][name])
        assert float(jnp.max(jnp.abs(sq_grads["schedule"][name]["kernel"]))) > 0
        assert not np.allclose(
            vm_grads["schedule"][name]["kernel"], vlb_grads["schedule"][name]["kernel"]
        )


def test_variance_gradient_needs_one_time_per_example():
    schedule = vdm.LearnedLinearSchedule()
    params = schedule.init(jax.random.key(0), jnp.zeros(()))

    def loss(p):
        _, _, channel = schedule.apply(p, jnp.float32(0.5), method=vdm.gamma_with_variance_gradient)
        return jnp.mean(vdm.emit_variance_gradient(jnp.ones(4), channel))

    with pytest.raises(ValueError, match=r"loss has shape \(4,\), the schedule channel \(\)"):
        jax.grad(loss)(params)


@pytest.mark.slow
def test_variance_gradient_lowers_the_loss_variance_on_gaussian_data(capsys):
    dims, data_var, batch = 8, 1.0, 512
    schedule = vdm.MonotonicSchedule(n_features=32)

    def per_example_loss(params, key, n, variance_gradient):
        def apply(module, x, t, eps):
            if variance_gradient:
                gamma, dgamma, channel = vdm.gamma_with_variance_gradient(module, t)
            else:
                gamma, dgamma = vdm.gamma_and_derivative(module, t)
            z = vdm.q_sample(x, gamma, eps)
            alpha, sigma = vdm.alpha_sigma(gamma[:, None])
            eps_hat = sigma * z / (alpha**2 * data_var + sigma**2)  # the optimal denoiser
            loss = vdm.diffusion_loss_continuous(eps, eps_hat, dgamma)
            return vdm.emit_variance_gradient(loss, channel) if variance_gradient else loss

        k_t, k_x, k_e = jax.random.split(key, 3)
        x = jnp.sqrt(data_var) * jax.random.normal(k_x, (n, dims))
        eps = jax.random.normal(k_e, (n, dims))
        t = (jax.random.uniform(k_t) + jnp.arange(n) / n) % 1.0  # antithetic-style stratified
        return nn.apply(apply, schedule)(params, x, t, eps)

    params = schedule.init(jax.random.key(0), jnp.zeros(()))
    # Only the shape trains; the endpoints stay where the VLB would hold them.
    labels = jax.tree.map_with_path(
        lambda path, _: "shape" if path[1].key in ("l2", "l3") else "frozen", params
    )
    optimizer = optax.multi_transform(
        {"shape": optax.adam(3e-2), "frozen": optax.set_to_zero()}, labels
    )

    @jax.jit
    def step(params, opt_state, key):
        grads = jax.grad(lambda p: jnp.mean(per_example_loss(p, key, batch, True)))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    evaluate = jax.jit(lambda p: per_example_loss(p, jax.random.key(99), 100_000, False))
    before = evaluate(params)
    opt_state = optimizer.init(params)
    for i in range(300):
        params, opt_state = step(params, opt_state, jax.random.fold_in(jax.random.key(1), i))
    after = evaluate(params)
    var_linear, var_trained = float(jnp.var(before)), float(jnp.var(after))
    mean = float(jnp.mean(after))
    # With the optimal denoiser L = 1/2 gamma' ||r||^2, r ~ N(0, h(gamma) I): the best schedule
    # makes 1/2 gamma' h constant, leaving L = (mean / dims) chi^2_dims, variance 2 mean^2 / dims.
    floor = 2 * mean**2 / dims
    with capsys.disabled():
        print(
            f"\nper-example diffusion loss, nats: mean {float(jnp.mean(before)):.3f}, variance"
            f" {var_linear:.1f} (linear schedule) -> mean {mean:.3f}, variance {var_trained:.1f}"
            f" after 300 variance-gradient steps; lowest possible variance {floor:.1f}"
        )
    assert floor * 0.95 < var_trained < 0.75 * var_linear
    # The mean is invariant to the shape (the endpoints did not move).
    np.testing.assert_allclose(mean, float(jnp.mean(before)), rtol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fixed", "monotonic"])
def test_shifted_schedule_moves_log_snr_by_twice_the_log_resolution_ratio(kind):
    import math

    base = vdm.FixedLinearSchedule() if kind == "fixed" else vdm.MonotonicSchedule(n_features=8)
    shifted = vdm.ShiftedSchedule(base, resolution=128, reference_resolution=64)
    params = shifted.init(jax.random.key(0), jnp.zeros(()))
    gamma = shifted.apply(params, GRID)
    base_gamma = base.apply({"params": params.get("params", {}).get("schedule", {})}, GRID)
    # log SNR(t) + 2 log(64 / 128): gamma grows by 2 log 2 at every t.
    np.testing.assert_allclose(gamma - base_gamma, 2 * math.log(2.0), rtol=1e-5)
    gamma_0, gamma_1 = shifted.apply(params, method="endpoints")
    assert float(gamma_0) == float(gamma[-2]) and float(gamma_1) == float(gamma[-1])
    # The variance gradient runs through the wrapper unchanged.
    t = jnp.linspace(0.05, 0.95, 8)
    g, dg, _ = shifted.apply(params, t, method=vdm.gamma_with_variance_gradient)
    g_ref, dg_ref = vdm.gamma_and_derivative(lambda u: shifted.apply(params, u), t)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6)
    np.testing.assert_allclose(dg, dg_ref, rtol=1e-5)
    with pytest.raises(ValueError, match="must be positive"):
        vdm.ShiftedSchedule(base, 0, 64).init(jax.random.key(0), jnp.zeros(()))
