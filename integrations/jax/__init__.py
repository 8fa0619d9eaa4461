"""JAX integration (in progress)."""
