"""Shared pieces of the problems: an MLP trunk, stacked task heads, batches."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def init_mlp(key, sizes: Sequence[int]) -> list[dict]:
  """He-initialised dense layers ``sizes[0] -> … -> sizes[-1]``."""
  layers = []
  for key, fan_in, fan_out in zip(jax.random.split(key, len(sizes) - 1),
                                  sizes[:-1], sizes[1:]):
    layers.append({
        "w": jax.random.normal(key, (fan_in, fan_out)) * np.sqrt(2.0 / fan_in),
        "b": jnp.zeros((fan_out,)),
    })
  return layers


def apply_mlp(layers: Sequence[dict], inputs):
  """ReLU after every layer (the trunk's output is a ReLU feature)."""
  hidden = inputs
  for layer in layers:
    hidden = jax.nn.relu(hidden @ layer["w"] + layer["b"])
  return hidden


def init_heads(key, num_tasks: int, fan_in: int, fan_out: int) -> dict:
  """One linear head per task, stacked: ``w[T, fan_in, fan_out]``."""
  return {
      "w": jax.random.normal(key, (num_tasks, fan_in, fan_out))
           * np.sqrt(1.0 / fan_in),
      "b": jnp.zeros((num_tasks, fan_out)),
  }


def apply_heads(heads: dict, features):
  """``features[N, H]`` -> ``[N, T, fan_out]``."""
  return jnp.einsum("nh,tho->nto", features, heads["w"]) + heads["b"]
