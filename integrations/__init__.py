"""Framework integrations (torch layers and optimizers, geoopt, JAX / optax).

Installed as ``tuckerman.integrations``; the core never imports it. Each subpackage needs its
framework: ``tuckerman.integrations.torch`` (layers, the TDLRT optimizer, model conversion,
adapters, DDP, the ``tuckerman train`` command), ``tuckerman.integrations.geoopt`` (the manifold
for geoopt's Riemannian optimizers) and ``tuckerman.integrations.jax`` (pure layer functions and
optax-style TDLRT transforms).
"""
