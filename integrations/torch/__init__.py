"""PyTorch integration: Tucker-factorized layers, model conversion and compression reports.

Installed as ``tuckerman.integrations.torch``; needs ``torch`` (``pip install tuckerman[torch]``).

- :class:`TuckerLinear`, :class:`TuckerConv2d`: drop-in ``nn.Linear`` / ``nn.Conv2d`` whose weight
  is a Tucker tensor held at the current rank; the forward pass never forms the weight.
- :class:`TDLRT`: the rank-adaptive optimizer (two gradient evaluations per step, or one with
  ``one_pass=True``), with optimizer state carried through rank changes.
- :func:`tuckerize`: convert a model's dense layers in place; :func:`compression_report` and
  :func:`format_report`: ranks, parameters and the paper's compression rate.
- :func:`build_model` (:func:`lenet5`, :func:`vgg_small`, :func:`resnet18`): the paper's dense
  reference models, for MNIST- and CIFAR-sized images; :func:`train` with :class:`TrainConfig`:
  the training behind the ``tuckerman train`` command.
- :func:`add_tucker_adapters` (:class:`TuckerAdapter`, :class:`TuckerAdapterConfig`): frozen
  ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` layers plus a Tucker update trained by TDLRT
  (LoRA-like fine-tuning of CNNs and transformers); :func:`merge_adapters`,
  :func:`unmerge_adapters`, :func:`remove_adapters`, :func:`save_adapters` /
  :func:`load_adapters` (safetensors + JSON), :func:`adapter_state_dict`,
  :func:`load_adapter_state_dict`, :func:`adapter_report`.
- :class:`VisionTransformer` (:class:`ViTConfig`): a compact ViT for the adapter experiments.
- :class:`TuckerDDP`: ``DistributedDataParallel`` that is rebuilt when TDLRT changes ranks;
  give it to :class:`TDLRT` for rank decisions taken on rank 0 and broadcast.
"""

from tuckerman.integrations.torch._adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    TuckerAdapter,
    TuckerAdapterConfig,
    adapter_report,
    adapter_state_dict,
    add_tucker_adapters,
    load_adapter_state_dict,
    load_adapters,
    merge_adapters,
    remove_adapters,
    save_adapters,
    unmerge_adapters,
)
from tuckerman.integrations.torch._convert import compression_report, format_report, tuckerize
from tuckerman.integrations.torch._distributed import ReplicaSync, TuckerDDP
from tuckerman.integrations.torch._layers import AbstractTuckerLayer, TuckerConv2d, TuckerLinear
from tuckerman.integrations.torch._models import MODELS, build_model, lenet5, resnet18, vgg_small
from tuckerman.integrations.torch._optim import TDLRT
from tuckerman.integrations.torch._train import TrainConfig, train
from tuckerman.integrations.torch._vit import VisionTransformer, ViTConfig

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "AbstractTuckerLayer",
    "MODELS",
    "ReplicaSync",
    "TDLRT",
    "TrainConfig",
    "TuckerAdapter",
    "TuckerAdapterConfig",
    "TuckerConv2d",
    "TuckerDDP",
    "TuckerLinear",
    "ViTConfig",
    "VisionTransformer",
    "adapter_report",
    "adapter_state_dict",
    "add_tucker_adapters",
    "build_model",
    "compression_report",
    "format_report",
    "lenet5",
    "load_adapter_state_dict",
    "load_adapters",
    "merge_adapters",
    "remove_adapters",
    "resnet18",
    "save_adapters",
    "train",
    "tuckerize",
    "unmerge_adapters",
    "vgg_small",
]
