"""synthmri_jax: useful and private synthetic 3D brain MRI cohorts in JAX/Flax."""

__version__ = "0.1.0"
