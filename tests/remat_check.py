"""Shared check for the adaptive variants: the `remat` flag is honoured and changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def assert_remat_honoured(make_model, tokens_BS):
  """`make_model(remat)` with "none" and "full": same loss and gradients; remat only when asked."""
  results = []
  for remat in ("none", "full"):
    graphdef, state = nnx.split(make_model(remat))

    def loss(st, graphdef=graphdef):
      logits, _ = nnx.merge(graphdef, st)(tokens_BS)
      return jnp.mean(logits**2)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(state))
    # Each block call is a jax.checkpoint (remat) only when asked.
    assert ("remat" in jaxpr) == (remat != "none")
    results.append(jax.jit(jax.value_and_grad(loss))(state))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
