"""Single-head self-attention for the score network, in two formulations of one function.

:func:`dot_product_attention` is ``softmax(q k^T / sqrt(C)) v`` of each example, either
through :func:`jax.nn.dot_product_attention` (fused by XLA, cuDNN flash attention on GPUs) or
``"chunked"``: a loop over a few examples at a time, organised for a CPU's caches, with a
custom VJP that recomputes the attention weights per chunk instead of storing [B, L, L]
arrays. :class:`~vdm_jax.models.unet.AttentionBlock` chooses between them with its
``attention`` field.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from vdm_jax.errors import UserError

__all__ = ["ATTENTION_KINDS", "dot_product_attention"]


#: The attention formulations :func:`dot_product_attention` offers.
ATTENTION_KINDS = ("dot_product", "chunked")

# The chunked attention runs over the batch in chunks whose [b, L, L] float32 logits fit in
# this many bytes (a few MiB stay in a CPU's caches).
_ATTENTION_CHUNK_BYTES = 4 << 20


def _attention_batch_chunk(batch: int, length: int) -> int:
    """Examples per chunk of the chunked attention's loop (a divisor of ``batch``)."""
    fits = max(1, _ATTENTION_CHUNK_BYTES // (4 * length * length))
    return max((d for d in range(1, min(fits, batch) + 1) if batch % d == 0), default=1)


def _chunked(fn, chunk: int, *arrays):
    """``fn`` over the leading axis of ``arrays`` in chunks of ``chunk`` (a ``lax.map``).

    A loop rather than unrolled chunks: XLA runs the iterations in turn, so each chunk's
    temporaries stay in the caches (unrolled, it interleaves the chunks and is slower).
    """
    batch = arrays[0].shape[0]
    if chunk >= batch:
        return fn(*arrays)
    split = [a.reshape(batch // chunk, chunk, *a.shape[1:]) for a in arrays]
    out = jax.lax.map(lambda xs: fn(*xs), split)
    return jax.tree.map(lambda o: o.reshape(batch, *o.shape[2:]), out)


def _attention_forward(q, k, v):
    """(softmax(q k^T / sqrt(C)) v, logsumexp of the scaled logits) of [b, L, C] inputs."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
    largest = jnp.max(logits, axis=-1, keepdims=True)
    unnormalised = jnp.exp((logits - largest) * scale)  # float32 [b, L, L], max 1
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    out = jnp.einsum(
        "bqk,bkc->bqc", unnormalised.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return (out / total).astype(v.dtype), largest * scale + jnp.log(total)


def _transposed(x):
    """x with its last two axes swapped, materialised: XLA would otherwise fold the transpose
    into the following matmul, and a matmul with a transposed left operand is about four times
    slower on the CPU (XLA's YNNPACK/Eigen kernels) than a copy followed by a plain one."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def _attention_backward(q, k, v, out, logsumexp, d_out):
    """Gradients (dq, dk, dv) of the attention of [b, L, C] inputs, recomputing the weights.

    Works with the transposed [b, keys, queries] weights, so that dv and dk are plain matmuls;
    only dq needs the weights' gradient transposed back (see :func:`_transposed`).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits_t = jnp.einsum("bkc,bqc->bkq", k, q, preferred_element_type=jnp.float32)
    weights_t = jnp.exp(logits_t * scale - jnp.swapaxes(logsumexp, -1, -2))  # f32 [b, Lk, Lq]
    d_v = jnp.einsum("bkq,bqc->bkc", weights_t.astype(d_out.dtype), d_out,
                     preferred_element_type=jnp.float32)  # fmt: skip
    d_weights_t = jnp.einsum("bkc,bqc->bkq", v, d_out, preferred_element_type=jnp.float32)
    # Softmax backward: rowsum(d_weights * weights) = rowsum(d_out * out), one per query.
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, None, :]
    d_logits_t = (weights_t * (d_weights_t - row) * scale).astype(q.dtype)
    d_k = jnp.einsum("bkq,bqc->bkc", d_logits_t, q, preferred_element_type=jnp.float32)
    d_q = jnp.einsum("bqk,bkc->bqc", _transposed(d_logits_t), k, preferred_element_type=jnp.float32)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, chunk):
    return _chunked(lambda q, k, v: _attention_forward(q, k, v)[0], chunk, q, k, v)


def _attention_fwd(q, k, v, chunk):
    out, logsumexp = _chunked(_attention_forward, chunk, q, k, v)
    return out, (q, k, v, out, logsumexp)


def _attention_bwd(chunk, residuals, d_out):
    return _chunked(_attention_backward, chunk, *residuals, d_out)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _textbook_attention(q, k, v):
    """softmax(q k^T / sqrt(C)) v of [b, L, C] inputs, float32 logits and softmax."""
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / math.sqrt(q.shape[-1]), axis=-1)  # float32 [b, L, L]
    return jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    kind: str = "dot_product",
    custom_gradient: bool = False,
) -> jax.Array:
    """Single-head attention ``softmax(q k^T / sqrt(C)) v`` of each example.

    The logits and softmax are float32 (the inputs may be bfloat16). Two formulations of the
    same function (equal to float32 rounding):

    - ``"dot_product"``: :func:`jax.nn.dot_product_attention`, which XLA fuses and which uses
      cuDNN's flash attention on GPUs where it applies. Every transformation works.
    - ``"chunked"``: organised for a CPU's caches: the batch runs a few examples at a time, a
      loop whose [b, L, L] logits fit in a few MiB. With ``custom_gradient`` (what
      ``ScoreUNet`` uses for training) the gradient is a custom VJP that recomputes the
      attention weights per chunk, as flash attention does, instead of storing [B, L, L]
      arrays, and places the transposes so that every matmul is a plain one
      (``_attention_backward``). A custom VJP supports reverse-mode differentiation only
      (``jax.grad``, ``jax.vjp``); without ``custom_gradient`` every transformation works.

    Args:
      query, key, value: arrays [B, L, C] of one dtype.
      kind: one of :data:`ATTENTION_KINDS`.
      custom_gradient: with ``kind="chunked"``, use its custom VJP (reverse mode only).

    Returns:
      array [B, L, C] in the inputs' dtype.
    """
    if kind == "dot_product":
        out = jax.nn.dot_product_attention(query[:, :, None], key[:, :, None], value[:, :, None])
        return out[:, :, 0]
    if kind != "chunked":
        raise UserError(f"attention kind must be one of {ATTENTION_KINDS}, got {kind!r}")
    batch, length, _ = query.shape
    chunk = _attention_batch_chunk(batch, length)
    if custom_gradient:
        return _attention(query, key, value, chunk)
    return _chunked(_textbook_attention, chunk, query, key, value)
