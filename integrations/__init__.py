"""Framework integrations (torch layers and optimizers, geoopt, JAX / optax).

Installed as ``tuckerman.integrations``; the core never imports it. The integrations arrive
with the torch and JAX issues; this package is empty until then.
"""
