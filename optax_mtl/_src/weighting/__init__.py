"""One module per strategy; the public names are re-exported by optax_mtl."""
