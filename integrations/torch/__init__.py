"""PyTorch integration: Tucker-factorized layers, model conversion and compression reports.

Installed as ``tuckerman.integrations.torch``; needs ``torch`` (``pip install tuckerman[torch]``).

- :class:`TuckerLinear`, :class:`TuckerConv2d`: drop-in ``nn.Linear`` / ``nn.Conv2d`` whose weight
  is a Tucker tensor held at the current rank; the forward pass never forms the weight.
- :class:`TDLRT`: the rank-adaptive optimizer (two gradient evaluations per step, or one with
  ``one_pass=True``), with optimizer state carried through rank changes.
- :func:`tuckerize`: convert a model's dense layers in place; :func:`compression_report` and
  :func:`format_report`: ranks, parameters and the paper's compression rate.
"""

from tuckerman.integrations.torch._convert import compression_report, format_report, tuckerize
from tuckerman.integrations.torch._layers import AbstractTuckerLayer, TuckerConv2d, TuckerLinear
from tuckerman.integrations.torch._optim import TDLRT

__all__ = [
    "AbstractTuckerLayer",
    "TDLRT",
    "TuckerConv2d",
    "TuckerLinear",
    "compression_report",
    "format_report",
    "tuckerize",
]
