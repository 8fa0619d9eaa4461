"""Data-parallel TDLRT: :class:`TuckerDDP`, DistributedDataParallel that follows rank changes.

``torch.nn.parallel.DistributedDataParallel`` (DDP) registers its gradient hooks and buckets on
the ``Parameter`` objects it finds at construction. A TDLRT step replaces the parameters of every
Tucker layer by new ones of other shapes (augmented bases before the second gradient evaluation,
truncated ranks after the step), so a DDP built once would stop averaging their gradients.
:class:`TuckerDDP` checks, at each forward pass with autograd on, whether the model's parameters
are still the objects its DDP was built on and builds a new DDP when they are not.

Every shape decision is identical on all replicas by construction: the augmented sizes are a
function of the current shapes alone, and the truncated ranks are decided on rank 0 of the
process group and broadcast (see :class:`ReplicaSync`, which :class:`TDLRT` uses when it is
given a :class:`TuckerDDP`).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

__all__ = ["ReplicaSync", "TuckerDDP", "check_not_sharded", "resolve_model"]

_LAUNCH_HINT = (
    "call torch.distributed.init_process_group(backend) first (torchrun sets RANK, WORLD_SIZE, "
    "MASTER_ADDR and MASTER_PORT for it), or pass process_group="
)


def _dist() -> Any:
    """``torch.distributed``, or a clear error on a torch build without it."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(
            "this torch build has no torch.distributed support (torch.distributed.is_available() "
            "is False): TuckerDDP needs it"
        )
    return dist


def _sharded_classes() -> tuple[type, ...]:
    """FSDP (both APIs) module classes of this torch version."""
    import importlib

    classes: list[type] = []
    for module, name in (
        ("torch.distributed.fsdp", "FullyShardedDataParallel"),  # FSDP1
        ("torch.distributed.fsdp", "FSDPModule"),  # fully_shard (FSDP2), torch >= 2.6
        ("torch.distributed._composable.fsdp", "FSDPModule"),  # fully_shard, torch 2.4-2.5
    ):
        with contextlib.suppress(ImportError, AttributeError):
            cls = getattr(importlib.import_module(module), name)
            if cls not in classes:
                classes.append(cls)
    return tuple(classes)


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


_FSDP_WHY = (
    "FSDP shards parameters across ranks (flat, padded shards, or DTensor shards) and keeps "
    "them as objects of fixed shapes, while TDLRT needs each Tucker layer's whole core and "
    "factors on every rank (QR and SVD of the core's unfoldings) and replaces them by new "
    "parameters of other shapes at every step. Tucker layers are small by design: use "
    "TuckerDDP (data parallelism with a full copy of the compressed model on each rank)."
)


def check_not_sharded(model: nn.Module, owner: str) -> None:
    """Raise a ``TypeError`` when ``model`` is (or contains) an FSDP or DTensor-sharded module.

    Parameters
    ----------
    model : nn.Module
    owner : str
        Names the caller in the message.
    """
    sharded = _sharded_classes()
    dtensor = _dtensor_class()
    for name, module in model.named_modules():
        if sharded and isinstance(module, sharded):
            where = f"submodule {name!r}" if name else "the model"
            raise TypeError(
                f"{owner}: {where} is wrapped by {type(module).__name__} (FSDP), which is not "
                f"supported. {_FSDP_WHY}"
            )
    if dtensor is not None:
        for name, p in model.named_parameters():
            if isinstance(p, dtensor) or isinstance(getattr(p, "data", None), dtensor):
                raise TypeError(
                    f"{owner}: parameter {name!r} of shape {tuple(p.shape)} is a DTensor "
                    f"(sharded by FSDP or tensor parallelism), which is not supported. {_FSDP_WHY}"
                )


class ReplicaSync:
    """The collective decisions TDLRT needs to keep replicas identical by construction.

    Used by :class:`~tuckerman.integrations.torch.TDLRT` when it is given a
    :class:`TuckerDDP`; one small collective per decision:

    - :meth:`agree_ranks`: the truncated ranks of every Tucker layer, decided on rank 0 of the
      group and broadcast (one ``broadcast`` of ``sum(order)`` integers per step);
    - :meth:`any_rank`: whether any replica saw a non-finite loss or gradient (one
      ``all_reduce(MAX)`` of one integer per gradient evaluation), so all replicas refuse or
      take the same step.

    Parameters
    ----------
    process_group : ProcessGroup or None
        None: the default (world) group.
    device : torch.device
        Where the small integer tensors live for the collectives (the model's device: CPU for
        gloo, the current CUDA device for NCCL).

    Attributes
    ----------
    disagreements : int
        How many layer decisions of this replica differed from rank 0's and were overridden
        (0 when every replica computes the same thing, as it should on identical hardware).

    Examples
    --------
    >>> import torch, torch.distributed as dist
    >>> from tuckerman.integrations.torch import ReplicaSync
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> sync = ReplicaSync(None, torch.device("cpu"))
    >>> sync.agree_ranks({"conv": (4, 3, 3, 3), "fc": (5, 5)})
    {'conv': (4, 3, 3, 3), 'fc': (5, 5)}
    >>> sync.any_rank(False)
    False
    >>> dist.destroy_process_group()
    """

    def __init__(self, process_group: Any, device: torch.device) -> None:
        dist = _dist()
        if process_group is None and not dist.is_initialized():
            raise RuntimeError(f"ReplicaSync: no default process group; {_LAUNCH_HINT}")
        self.process_group = process_group
        self.device = torch.device(device)
        group = process_group if process_group is not None else dist.group.WORLD
        self._src = dist.get_global_rank(group, 0)  # rank 0 of the group, as a global rank
        self._disagreements = 0
        self._disagreements_device: torch.Tensor | None = None  # counted without host reads

    @property
    def disagreements(self) -> int:
        """How many layer decisions of this replica differed from rank 0's (read on access)."""
        n = self._disagreements
        if self._disagreements_device is not None:
            n += int(self._disagreements_device.item())
        return n

    def agree_ranks(self, ranks: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Rank 0's ranks for every layer (same keys, in the same order, on every replica)."""
        dist = _dist()
        names = list(ranks)
        flat = [int(r) for name in names for r in ranks[name]]
        # the count first: a broadcast of tensors of different sizes fails (gloo) or hangs (NCCL)
        count = torch.tensor([len(flat)], dtype=torch.int64, device=self.device)
        dist.broadcast(count, src=self._src, group=self.process_group)
        if int(count.item()) != len(flat):
            raise RuntimeError(
                f"ReplicaSync.agree_ranks: rank 0 sent {int(count.item())} ranks but this "
                f"replica's model has {len(flat)} (layers {names}): the replicas hold different "
                "models"
            )
        packed = torch.tensor(flat, dtype=torch.int64, device=self.device)
        dist.broadcast(packed, src=self._src, group=self.process_group)
        got = [int(v) for v in packed.cpu().tolist()]
        out, i = {}, 0
        for name in names:
            d = len(ranks[name])
            out[name] = tuple(got[i : i + d])
            self._disagreements += out[name] != tuple(ranks[name])
            i += d
        return out

    def broadcast_ranks(self, ranks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rank 0's rank decisions (device integer tensors, one per layer; no host read).

        One ``broadcast`` of all layers' ranks in a single flat tensor.
        """
        dist = _dist()
        sizes = [int(r.numel()) for r in ranks]
        local = torch.cat([r.reshape(-1) for r in ranks]).to(self.device)
        flat = local.clone()
        dist.broadcast(flat, src=self._src, group=self.process_group)
        differ = torch.stack(
            [torch.any(a != b) for a, b in zip(flat.split(sizes), local.split(sizes))]
        )
        count = differ.sum()
        if self._disagreements_device is None:
            self._disagreements_device = count
        else:
            self._disagreements_device = self._disagreements_device + count
        out = list(torch.split(flat.to(ranks[0].device), sizes))
        return [o.reshape(r.shape) for o, r in zip(out, ranks)]

    def all_true_each(self, flags: torch.Tensor) -> torch.Tensor:
        """Entry by entry, whether each 0/1 flag holds on every replica (one
        ``all_reduce(MIN)`` of the integer tensor; no host read)."""
        dist = _dist()
        t = flags.to(device=self.device, dtype=torch.int64).clone()
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.process_group)
        return t.to(device=flags.device)

    def average(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The mean over replicas of each tensor (one ``all_reduce`` of a flat buffer)."""
        dist = _dist()
        if not tensors:
            return []
        sizes = [int(t.numel()) for t in tensors]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.process_group)
        flat /= dist.get_world_size(self.process_group)
        return [o.reshape(t.shape) for o, t in zip(torch.split(flat, sizes), tensors)]

    def any_rank(self, flag: bool) -> bool:
        """True on every replica when ``flag`` is True on at least one."""
        dist = _dist()
        t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        return bool(int(t.item()))


def _has_init_sync() -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return "init_sync" in inspect.signature(DistributedDataParallel.__init__).parameters


class TuckerDDP(nn.Module):
    """``DistributedDataParallel`` for models with Tucker layers trained by TDLRT.

    Wraps ``module`` in a ``torch.nn.parallel.DistributedDataParallel`` and builds a new one
    whenever the model's parameters are no longer the objects the current one was built on (a
    TDLRT step replaces the Tucker layers' parameters twice: augmented before its second
    gradient evaluation, truncated after it). The check is an identity comparison of the
    parameter list at each forward pass with autograd enabled (microseconds); a build costs
    what a DDP construction costs: a shape check and a broadcast of rank 0's parameters and
    buffers (all replicas then hold rank 0's values bit for bit), and new gradient buckets.

    With autograd disabled (``torch.no_grad()`` evaluation) the forward pass calls ``module``
    directly: no collective, no rebuild, so evaluating on one rank only cannot hang.

    Give the wrapper (not the inner model) to :class:`~tuckerman.integrations.torch.TDLRT`: it
    then takes its shape decisions collectively (:class:`ReplicaSync`).

    Parameters
    ----------
    module : nn.Module
        The model, on its device (``device_ids`` as for DDP).
    broadcast_on_rebuild : bool
        Broadcast rank 0's parameters and buffers at every rebuild, as DDP does at
        construction (default). False skips that broadcast on rebuilds (DDP's ``init_sync``;
        the first build still broadcasts): replicas then stay identical only because every
        replica computes the same step from the same averaged gradients.
    **ddp_kwargs
        Passed to ``DistributedDataParallel`` at every build (``device_ids``,
        ``process_group``, ``broadcast_buffers``, ``bucket_cap_mb``,
        ``find_unused_parameters``, ``gradient_as_bucket_view``, ``static_graph``, ...).
        ``find_unused_parameters`` is not needed for TDLRT itself (every core and factor takes
        part in every forward pass); set it only when the model has parameters a forward pass
        may skip.

    Attributes
    ----------
    module : nn.Module
        The wrapped model (``state_dict`` keys are prefixed ``module.``, as with DDP).
    rebuilds : int
        How many DDP instances were built (the first one included).
    rebuild_seconds : float
        Total wall time spent building them.

    Raises
    ------
    RuntimeError
        If no process group is initialized (and none is given).
    TypeError
        If ``module`` is already wrapped by DDP, TuckerDDP or FSDP, or is sharded, or if
        ``mixed_precision`` (which adds hooks to the module at each build) is passed.

    Examples
    --------
    A one-process group on CPU (``torchrun`` starts one process per GPU and initializes the
    group from the environment):

    >>> import torch, torch.distributed as dist
    >>> from torch import nn
    >>> from tuckerman.integrations.torch import TuckerLinear, TuckerDDP, TDLRT
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(TuckerLinear(8, 6, ranks=4), nn.ReLU(), nn.Linear(6, 1))
    >>> ddp = TuckerDDP(model)
    >>> opt = TDLRT(ddp, lr=0.1, tau=0.1)
    >>> x, y = torch.randn(32, 8), torch.randn(32, 1)
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = nn.functional.mse_loss(ddp(x), y)
    ...     loss.backward()
    ...     return loss
    >>> loss = opt.step(closure)
    >>> ddp.rebuilds  # built at construction, rebuilt for the augmented bases
    2
    >>> dist.destroy_process_group()
    """

    module: nn.Module
    _ddp: DistributedDataParallel | None
    _ddp_kwargs: dict[str, Any]
    _built_on: tuple[nn.Parameter, ...]

    def __init__(
        self, module: nn.Module, *, broadcast_on_rebuild: bool = True, **ddp_kwargs: Any
    ) -> None:
        dist = _dist()
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(module, nn.Module):
            raise TypeError(f"TuckerDDP wraps an nn.Module, got {type(module).__name__}")
        if isinstance(module, (DistributedDataParallel, TuckerDDP)):
            raise TypeError(
                f"TuckerDDP: the module is already wrapped by {type(module).__name__}; pass the "
                "inner model (its .module)"
            )
        check_not_sharded(module, "TuckerDDP")
        if ddp_kwargs.get("mixed_precision") is not None:
            raise TypeError(
                "TuckerDDP: DDP's mixed_precision registers hooks on the module at every build, "
                "and TuckerDDP rebuilds DDP when ranks change; use torch.autocast instead"
            )
        group = ddp_kwargs.get("process_group")
        if group is None and ddp_kwargs.get("device_mesh") is None and not dist.is_initialized():
            raise RuntimeError(f"TuckerDDP: no default process group; {_LAUNCH_HINT}")
        if not isinstance(broadcast_on_rebuild, bool):
            raise TypeError(
                f"TuckerDDP: broadcast_on_rebuild must be a bool, got {broadcast_on_rebuild!r}"
            )
        if not broadcast_on_rebuild and not _has_init_sync():
            raise TypeError(
                f"TuckerDDP: broadcast_on_rebuild=False needs DDP's init_sync (torch "
                f"{torch.__version__} lacks it)"
            )
        super().__init__()
        self.module = module
        self.broadcast_on_rebuild = broadcast_on_rebuild
        self.rebuilds = 0
        self.rebuild_seconds = 0.0
        # plain attributes (not submodules): the DDP instance and the parameter objects it was
        # built on (strong references, so an identity test cannot be fooled by reused ids)
        object.__setattr__(self, "_ddp_kwargs", dict(ddp_kwargs))
        object.__setattr__(self, "_ddp", None)
        object.__setattr__(self, "_built_on", ())
        self._build()

    # ------------------------------------------------------------------ the DDP instance
    @property
    def process_group(self) -> Any:
        """The process group (None: the default group)."""
        mesh = self._ddp_kwargs.get("device_mesh")
        if mesh is not None:
            return mesh.get_group()
        return self._ddp_kwargs.get("process_group")

    def is_stale(self) -> bool:
        """Whether the model's parameters differ from the objects the current DDP holds."""
        params = tuple(self.module.parameters())
        built = self._built_on
        return len(params) != len(built) or any(p is not q for p, q in zip(params, built))

    def _build(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        kwargs = dict(self._ddp_kwargs)
        if self.rebuilds > 0 and not self.broadcast_on_rebuild:
            kwargs["init_sync"] = False
        object.__setattr__(self, "_ddp", None)  # drop the old reducer before building
        start = time.perf_counter()
        ddp = DistributedDataParallel(self.module, **kwargs)
        self.rebuild_seconds += time.perf_counter() - start
        self.rebuilds += 1
        object.__setattr__(self, "_ddp", ddp)
        object.__setattr__(self, "_built_on", tuple(self.module.parameters()))

    @property
    def ddp(self) -> DistributedDataParallel:
        """The current ``DistributedDataParallel`` (rebuilt first if the parameters changed).

        Rebuilding is a collective: every replica must reach it.
        """
        if self._ddp is None or self.is_stale():
            self._build()
        assert self._ddp is not None
        return self._ddp

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)`` through DDP (rebuilt if stale) when autograd is on."""
        if not torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        ddp = self.ddp
        ddp.training = self.training
        return ddp(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """DDP's ``no_sync`` (gradient accumulation without all-reduce) on the current DDP.

        Use it only between optimizer steps (the parameters must not change inside).
        """
        with self.ddp.no_sync():
            yield

    def replica_sync(self) -> ReplicaSync:
        """The :class:`ReplicaSync` on this wrapper's group and the model's device."""
        device = next(
            (p.device for p in self.module.parameters()),
            torch.device("cpu"),
        )
        return ReplicaSync(self.process_group, device)


def resolve_model(model: nn.Module) -> tuple[nn.Module, ReplicaSync | None]:
    """The model an optimizer works on, and the collective decisions it must take.

    A :class:`TuckerDDP` gives its inner model and a :class:`ReplicaSync`; a plain model gives
    itself and None. A plain ``DistributedDataParallel`` (anywhere in the model) and FSDP are
    refused with a ``TypeError`` that says what to do instead.
    """
    if isinstance(model, TuckerDDP):
        return model.module, model.replica_sync()
    import torch.distributed as dist

    if not dist.is_available():
        return model, None
    from torch.nn.parallel import DistributedDataParallel

    for name, module in model.named_modules():
        if isinstance(module, TuckerDDP):
            raise TypeError(
                f"TDLRT: submodule {name!r} is a TuckerDDP; wrap the whole model in TuckerDDP and "
                "pass the wrapper"
            )
        if isinstance(module, DistributedDataParallel):
            where = f"submodule {name!r} is" if name else "the model is"
            raise TypeError(
                f"TDLRT: {where} a plain DistributedDataParallel. DDP hooks the Parameter objects "
                "it sees at construction, and TDLRT replaces the Tucker layers' parameters when "
                "ranks change, so their gradients would silently stop being averaged. Wrap the "
                "model with tuckerman.integrations.torch.TuckerDDP(model, **ddp_kwargs) instead "
                "and pass that wrapper to TDLRT"
            )
    check_not_sharded(model, "TDLRT")
    return model, None
