"""What each model learns: a Task (init, loss, optional evaluate / summaries) per model, run by the
one shared loop in `synthmri_jax.training.trainer`."""
