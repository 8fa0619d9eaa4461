"""The fixed-rank Tucker manifold as a ``geoopt.Manifold`` on packed 1-D tensors.

A point ``X = C ×_1 U_1 ⋯ ×_d U_d`` is stored as one flat tensor ``[vec(C), vec(U_1), ...,
vec(U_d)]`` (row-major ``reshape``), so that one ``geoopt.ManifoldParameter`` can hold it; as in
every geoopt manifold, leading dimensions are batch dimensions (a stack of points is one tensor
of shape ``(..., packed_size)``) and broadcast. Every piece of mathematics is delegated to
:class:`tuckerman.FixedRankTucker`; this module only packs, unpacks, validates and loops over the
batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import geoopt
import torch

from tuckerman import (
    FixedRankTucker,
    TangentVector,
    TuckerTensor,
    core_condition,
    mode_product,
    rgrad_from_factor_grads,
)

__all__ = ["TuckerManifold"]

_DTYPES = (torch.float32, torch.float64)


class TuckerManifold(geoopt.Manifold):
    r"""Tensors of fixed multilinear rank, as a geoopt manifold of packed 1-D tensors.

    A point ``X = C ×_1 U_1 ⋯ ×_d U_d`` (orthonormal ``U_k``, core of full multilinear rank)
    is the flat tensor ``[vec(C), vec(U_1), ..., vec(U_d)]`` of length :attr:`packed_size`
    (:meth:`pack`, :meth:`unpack`), so one :class:`geoopt.ManifoldParameter` holds it and
    :class:`geoopt.optim.RiemannianSGD` / :class:`geoopt.optim.RiemannianAdam` optimize it.
    All geometry comes from :class:`tuckerman.FixedRankTucker` (embedded metric, projection
    retraction by truncated HOSVD, transport by projection); the dense tensor is never formed.

    **Packed vectors.** A packed vector ``u = [vec(Ċ), vec(U̇_1), ...]`` at ``x`` (same layout
    as the points) stands for the tangent tensor

    ``Dφ_x(u) = Ċ ×_1 U_1 ⋯ ×_d U_d + Σ_k C ×_k U̇_k ×_{j≠k} U_j``,

    the first-order change of the tensor when the packed parameter moves along ``u``. Every
    packed vector stands for some tangent tensor; the gauge ``U_kᵀ U̇_k = 0`` picks one
    representative per tensor (the tangent space proper, what :meth:`proju`,
    :meth:`egrad2rgrad` and :meth:`transp` return). :meth:`inner`, :meth:`retr` and
    :meth:`transp` accept any packed vector and act on ``Dφ_x(u)``: geoopt's optimizers form
    linear combinations of packed vectors, and this reading keeps those exact.

    **Gradients.** Autograd's gradient with respect to the packed parameter is the pair of
    core and factor gradients ``(∂f/∂C, ∂f/∂U_k)``, not the dense gradient ``G``;
    :meth:`egrad2rgrad` turns it into the Riemannian gradient (the projection of ``G``) with
    :func:`tuckerman.rgrad_from_factor_grads`. geoopt's ``weight_decay`` adds ``wd · x`` to
    that gradient, i.e. ``∂/∂C`` of ``wd ‖C‖²/2 = wd ‖X‖²/2``: its Riemannian gradient comes out
    exactly.

    Parameters
    ----------
    shape : sequence of int
        Tensor shape ``(n_1, ..., n_d)``, d >= 2.
    ranks : int or sequence of int
        Multilinear rank (feasible: ``r_k <= n_k`` and ``r_k <= prod_{j≠k} r_j``).

    Notes
    -----
    - ``expmap`` is the retraction (the exponential map of this manifold has no closed form);
      ``transp_follow_expmap`` hence equals ``transp_follow_retr``.
    - ``component_inner`` is ``inner(x, u, v, keepdim=True)``, shape ``(1,)``:
      :class:`~geoopt.optim.RiemannianAdam` then keeps one second-moment scalar per parameter
      (Riemannian Adam of Bécigneul & Ganea, 2019). An entrywise square of the packed vector
      would depend on the parametrization and would leave the gauge.
    - geoopt 0.5.1's :class:`~geoopt.optim.RiemannianSGD` with ``momentum > 0`` seeds its buffer
      with the raw packed gradient before adding the Riemannian one, so the first step also
      moves along ``momentum · Dφ_x(∂f/∂C, ∂f/∂U_k)``. That is a descent direction, but its
      factor part is weighted by ``C_(k)ᵀC_(k)``: with cores of large singular values, warm up
      the learning rate. From the second step on, the buffer is a tangent vector.
    - ``geoopt.Manifold.ndim`` is 1 here: the last axis is the packed (manifold) axis and, as in
      every geoopt manifold, leading axes are batch axes. A tensor of shape
      ``(*batch, packed_size)`` is a stack of independent points; every map broadcasts its
      arguments over the batch axes (``proju(X, u)`` with a stack ``X`` and one ``u``) and acts
      point by point. The tensor order is ``len(manifold.shape)``.
    - ``dist`` and ``logmap`` raise ``NotImplementedError`` (no closed form).

    Examples
    --------
    >>> import geoopt, torch
    >>> from tuckerman.integrations.geoopt import TuckerManifold
    >>> M = TuckerManifold((6, 7, 8), (2, 3, 2))
    >>> x = geoopt.ManifoldParameter(M.random(key=0, dtype=torch.float64), manifold=M)
    >>> target = torch.ones(6, 7, 8, dtype=torch.float64)
    >>> opt = geoopt.optim.RiemannianSGD([x], lr=0.5)
    >>> for _ in range(20):
    ...     opt.zero_grad()
    ...     loss = 0.5 * ((M.unpack(x).to_dense() - target) ** 2).sum()
    ...     loss.backward()
    ...     opt.step()
    >>> round(loss.item(), 6), M.check_point_on_manifold(x)
    (0.0, True)
    """

    name = "Tucker"
    ndim = 1
    reversible = False

    def __init__(self, shape: Sequence[int], ranks: Any) -> None:
        super().__init__()
        self._fixed_rank = FixedRankTucker(shape, ranks)
        self._sizes = [
            math.prod(self._fixed_rank.ranks),
            *(n * r for n, r in zip(self._fixed_rank.shape, self._fixed_rank.ranks)),
        ]

    # ----------------------------------------------------------------- description
    @property
    def tucker(self) -> FixedRankTucker:
        """The :class:`tuckerman.FixedRankTucker` of the same shape and ranks that does the
        mathematics (points as ``TuckerTensor``, tangents as ``TangentVector``)."""
        return self._fixed_rank

    @property
    def fixed_rank(self) -> FixedRankTucker:
        """Deprecated name of :attr:`tucker` (it read like a boolean option)."""
        warnings.warn(
            "TuckerManifold.fixed_rank is deprecated; use TuckerManifold.tucker",
            DeprecationWarning,
            stacklevel=2,
        )
        return self._fixed_rank

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the tensors on the manifold."""
        return self._fixed_rank.shape

    @property
    def ranks(self) -> tuple[int, ...]:
        """The fixed multilinear rank."""
        return self._fixed_rank.ranks

    @property
    def packed_size(self) -> int:
        """Length of a packed point: ``prod r_k + sum_k n_k r_k``."""
        return sum(self._sizes)

    @property
    def manifold_dim(self) -> int:
        """Manifold dimension ``prod r_k + sum_k (n_k r_k - r_k^2)``."""
        return self._fixed_rank.dim

    def extra_repr(self) -> str:
        return f"shape={self.shape}, ranks={self.ranks}"

    # ----------------------------------------------------------------- packing
    def _packed(self, t: Any, what: str) -> torch.Tensor:
        """``t`` as a plain tensor of shape ``(..., packed_size)``, float32/float64, or an error
        naming its shape and dtype."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(
                f"{what} has dtype {t.dtype} (shape {tuple(t.shape)}); {self} needs float32 or "
                "float64"
            )
        if t.ndim < 1 or t.shape[-1] != self.packed_size:
            raise ValueError(
                f"{what} has shape {tuple(t.shape)}, but packed tensors of {self} have shape "
                f"({self.packed_size},) = (prod{self.ranks} + sum n_k r_k), or "
                f"(..., {self.packed_size}) for a stack of them"
            )
        return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t

    def _one(self, t: Any, what: str) -> torch.Tensor:
        """A single packed tensor (no batch dimensions)."""
        t = self._packed(t, what)
        if t.ndim != 1:
            raise ValueError(
                f"{what} has shape {tuple(t.shape)}: a stack of {t.shape[:-1].numel()} packed "
                f"tensors; this method takes one, of shape ({self.packed_size},) (index the "
                "stack)"
            )
        return t

    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Views ``(core, factors)`` of one validated packed tensor (differentiable)."""
        parts = torch.split(t, self._sizes)
        core = parts[0].reshape(self.ranks)
        factors = [p.reshape(n, r) for p, n, r in zip(parts[1:], self.shape, self.ranks)]
        return core, factors

    def _point(self, t: torch.Tensor) -> TuckerTensor:
        return TuckerTensor(*self._split(t))

    def _tangent(self, t: torch.Tensor) -> TangentVector:
        return TangentVector(*self._split(t))

    def _rows(
        self, tensors: Sequence[tuple[Any, str]]
    ) -> tuple[tuple[int, ...] | None, list[tuple[torch.Tensor, ...]]]:
        """Validated packed tensors, broadcast over their batch dimensions and split into rows:
        ``(batch shape, [(x_i, u_i, ...), ...])``; the batch shape is None when all are 1-D."""
        arrays = [self._packed(t, what) for t, what in tensors]
        first, first_name = arrays[0], tensors[0][1]
        for a, (_, what) in zip(arrays[1:], tensors[1:]):
            if a.dtype != first.dtype or a.device != first.device:
                raise TypeError(
                    f"{what} has dtype {a.dtype} on {a.device}, but {first_name} has dtype "
                    f"{first.dtype} on {first.device}"
                )
        if all(a.ndim == 1 for a in arrays):
            return None, [tuple(arrays)]
        try:
            batch = tuple(torch.broadcast_shapes(*(a.shape[:-1] for a in arrays)))
        except RuntimeError as err:
            shapes = ", ".join(f"{what} {tuple(a.shape)}" for a, (_, what) in zip(arrays, tensors))
            raise ValueError(f"the batch dimensions of {shapes} do not broadcast") from err
        flat = [a.expand(*batch, self.packed_size).reshape(-1, self.packed_size) for a in arrays]
        return batch, list(zip(*(f.unbind(0) for f in flat)))

    def _batched(
        self,
        fn: Callable[..., torch.Tensor],
        tensors: Sequence[tuple[Any, str]],
        out_shape: tuple[int, ...],
    ) -> torch.Tensor:
        """``fn`` on one point (and its vectors) at a time, stacked to ``batch + out_shape``."""
        batch, rows = self._rows(tensors)
        if batch is None:
            return fn(*rows[0])
        if not rows:  # an empty batch
            like = self._packed(*tensors[0])
            return like.new_zeros((*batch, *out_shape))
        return torch.stack([fn(*row) for row in rows]).reshape(*batch, *out_shape)

    def unpack(self, packed: torch.Tensor) -> TuckerTensor:
        """The Tucker tensor of a packed point; views, differentiable.

        Use it in a model's forward pass: autograd then gives the packed parameter the core and
        factor gradients that :meth:`egrad2rgrad` expects.

        Parameters
        ----------
        packed : torch.Tensor
            Shape ``(packed_size,)``, float32 or float64.

        Returns
        -------
        TuckerTensor
            ``core`` of shape ``ranks``, ``factors[k]`` of shape ``(shape[k], ranks[k])``.

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> x = M.unpack(M.random(key=0))
        >>> x.ranks, tuple(x.to_dense().shape)
        ((2, 2, 2), (4, 5, 6))
        """
        return self._point(self._one(packed, "the packed point"))

    def pack(self, x: TuckerTensor) -> torch.Tensor:
        """The packed 1-D tensor ``[vec(C), vec(U_1), ..., vec(U_d)]`` of a Tucker tensor.

        Differentiable; the tensor is not checked to lie on the manifold
        (:meth:`check_point_on_manifold` does that).

        Parameters
        ----------
        x : TuckerTensor
            torch core and factors of this manifold's shape and ranks.

        Examples
        --------
        >>> import tuckerman as tm
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> x = M.tucker.random_point(key=0, xp="torch")
        >>> M.pack(x).shape
        torch.Size([38])
        """
        if not isinstance(x, TuckerTensor):
            raise TypeError(f"x must be a TuckerTensor, got {type(x).__name__}")
        if x.shape != self.shape or x.ranks != self.ranks:
            raise ValueError(
                f"x has shape {x.shape} and ranks {x.ranks}, but {self} has shape {self.shape} "
                f"and ranks {self.ranks}"
            )
        leaves = [x.core, *x.factors]
        if not all(isinstance(a, torch.Tensor) for a in leaves):
            raise TypeError(
                f"x must hold torch tensors, got {sorted({type(a).__name__ for a in leaves})}"
            )
        if x.core.dtype not in _DTYPES:
            raise TypeError(f"x has dtype {x.core.dtype}; {self} needs float32 or float64")
        return self._pack_point(x)

    def _pack_point(self, x: TuckerTensor) -> torch.Tensor:
        return torch.cat([x.core.reshape(-1), *(u.reshape(-1) for u in x.factors)])

    def unpack_tangent(self, packed: torch.Tensor) -> TangentVector:
        """The :class:`~tuckerman.TangentVector` ``(Ċ, U̇_k)`` of a packed vector; views.

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> v = M.unpack_tangent(torch.zeros(M.packed_size))
        >>> tuple(v.dcore.shape), [tuple(u.shape) for u in v.dfactors]
        ((2, 2, 2), [(4, 2), (5, 2), (6, 2)])
        """
        return self._tangent(self._one(packed, "the packed vector"))

    def pack_tangent(self, v: TangentVector) -> torch.Tensor:
        """The packed 1-D tensor ``[vec(Ċ), vec(U̇_1), ...]`` of a tangent vector.

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> x = M.unpack(M.random(key=0))
        >>> M.pack_tangent(M.tucker.random_tangent(x, key=1)).shape
        torch.Size([38])
        """
        if not isinstance(v, TangentVector):
            raise TypeError(f"v must be a TangentVector, got {type(v).__name__}")
        shapes = [tuple(u.shape) for u in v.dfactors]
        expected = [(n, r) for n, r in zip(self.shape, self.ranks)]
        if tuple(v.dcore.shape) != self.ranks or shapes != expected:
            raise ValueError(
                f"v has dcore shape {tuple(v.dcore.shape)} and dfactor shapes {shapes}, but "
                f"tangent vectors of {self} have {self.ranks} and {expected}"
            )
        return self._pack_tangent(v)

    def tangent_to_dense(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The tangent tensor ``Dφ_x(u)`` as a dense array of :attr:`shape` (references and
        small cases only); ``batch + shape`` for stacks.

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> x = M.random(key=0, dtype=torch.float64)
        >>> bool(torch.allclose(M.tangent_to_dense(x, x), 4 * M.unpack(x).to_dense()))
        True
        """
        return self._batched(
            lambda x1, u1: self._fixed_rank.tangent_to_dense(self._point(x1), self._tangent(u1)),
            [(x, "x"), (u, "u")],
            self.shape,
        )

    def _pack_tangent(self, v: TangentVector) -> torch.Tensor:
        return torch.cat([v.dcore.reshape(-1), *(u.reshape(-1) for u in v.dfactors)])

    # ----------------------------------------------------------------- points
    def random(
        self,
        *size: Any,
        key: Any = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> geoopt.ManifoldTensor:
        """A random point (:meth:`tuckerman.FixedRankTucker.random_point`), packed; or a stack.

        Gaussian core brought to all-orthogonal (HOSVD) form, orthonormal factors.

        Parameters
        ----------
        *size : int, optional
            geoopt's size argument: ``(packed_size,)`` for one point (the default), or
            ``(*batch, packed_size)`` for a stack of independent points.
        key : int or torch.Generator, optional
            Seed or generator. None draws a seed from torch's global generator, so
            ``torch.manual_seed`` (and geoopt's ``origin``) make it reproducible. A stack draws
            one seed per point from a generator seeded with ``key``.
        dtype : torch.dtype, optional
            float32 or float64 (default: torch's default dtype).
        device : optional

        Returns
        -------
        geoopt.ManifoldTensor

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> x = M.random(key=0, dtype=torch.float64)
        >>> x.shape, x.dtype, M.check_point_on_manifold(x)
        (torch.Size([38]), torch.float64, True)
        >>> M.random(2, 3, M.packed_size, key=0).shape    # a 2 x 3 stack of points
        torch.Size([2, 3, 38])
        """
        batch: tuple[int, ...] = ()
        if size:
            shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], Sequence) else size
            shape = tuple(int(s) for s in shape)
            if not shape or shape[-1] != self.packed_size or min(shape) < 0:
                raise ValueError(
                    f"size {shape} requested, but points of {self} have shape "
                    f"({self.packed_size},), or (..., {self.packed_size}) for a stack"
                )
            batch = shape[:-1]
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        if key is None:
            key = int(torch.randint(0, 2**62, (1,)))
        if batch:
            generator = key if isinstance(key, torch.Generator) else None
            if generator is None:
                generator = torch.Generator().manual_seed(int(key))
            seeds = torch.randint(0, 2**62, (math.prod(batch),), generator=generator).tolist()
        else:
            seeds = [key]
        points = [
            self._pack_point(
                self._fixed_rank.random_point(key=seed, xp=torch, dtype=dtype, device=device)
            )
            for seed in seeds
        ]
        packed = torch.stack(points).reshape(*batch, self.packed_size) if batch else points[0]
        return geoopt.ManifoldTensor(packed, manifold=self)

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """Bring a packed tensor back onto the manifold, keeping its tensor and, when it is
        already a point, its coordinates.

        Each factor is replaced by the ``Q`` of its QR decomposition with ``diag(R) >= 0``
        and ``R`` is folded into the core (``C ← C ×_k R_k``): the represented tensor
        ``C ×_k U_k`` is unchanged, and a factor that is already orthonormal stays as it is
        (``R = I``). geoopt's ``stabilize`` option relies on that: it re-reads the optimizer's
        buffers, stored in the point's coordinates, at the projected point. The core is not
        re-balanced (that would change the gauge). A tensor of lower multilinear rank than
        ``ranks`` has no nearest point on the (not closed) manifold; the result is then off the
        manifold and :meth:`check_point_on_manifold` says why.

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(M.packed_size, generator=g, dtype=torch.float64)
        >>> y = M.projx(x)
        >>> M.check_point_on_manifold(y)
        True
        >>> bool(torch.allclose(M.unpack(y).to_dense(), M.unpack(x).to_dense()))
        True
        >>> bool(torch.allclose(M.projx(y), y))
        True
        """
        return self._batched(self._projx, [(x, "x")], (self.packed_size,))

    def _projx(self, x: torch.Tensor) -> torch.Tensor:
        point = self._point(x)
        core, factors = point.core, []
        for k, u in enumerate(point.factors):
            q, r = torch.linalg.qr(u)
            signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(dtype=r.dtype)
            factors.append(q * signs)
            core = mode_product(core, signs[:, None] * r, k)
        return self._pack_point(TuckerTensor(core, factors))

    # ----------------------------------------------------------------- tangent vectors
    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The gauge representative of the packed vector ``u``: same tangent tensor
        ``Dφ_x(u)``, with ``U_kᵀ U̇_k = 0``.

        ``U̇_k ← U̇_k − U_k A_k``, ``Ċ ← Ċ + Σ_k C ×_k A_k`` with ``A_k = U_kᵀ U̇_k``. Idempotent;
        ``u − proju(x, u)`` spans the zero tensor, so it has norm 0 in :meth:`inner` (the
        projection is orthogonal for that metric).

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> x = M.random(key=0, dtype=torch.float64)
        >>> u = torch.randn(M.packed_size, dtype=torch.float64)
        >>> v = M.proju(x, u)
        >>> M.check_vector_on_tangent(x, v), bool(torch.allclose(M.proju(x, v), v))
        (True, True)
        """
        return self._batched(
            lambda x1, u1: self._pack_tangent(
                self._fixed_rank.project(self._point(x1), self._tangent(u1))
            ),
            [(x, "x"), (u, "u")],
            (self.packed_size,),
        )

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Riemannian gradient from autograd's gradient of the packed parameter.

        ``u = [vec(∂f/∂C), vec(∂f/∂U_1), ...]``; returns ``Ċ = ∂f/∂C``,
        ``U̇_k = (I − U_kU_kᵀ)(∂f/∂U_k)(C_(k)C_(k)ᵀ)⁻¹`` (:func:`tuckerman.rgrad_from_factor_grads`):
        the projection of the dense gradient onto the tangent space, without forming it.

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> x = M.random(key=0, dtype=torch.float64).requires_grad_()
        >>> (0.5 * (M.unpack(x).to_dense() ** 2).sum()).backward()   # f = ||X||^2/2: grad X
        >>> g = M.unpack_tangent(M.egrad2rgrad(x.detach(), x.grad))
        >>> bool(torch.allclose(g.dcore, M.unpack(x).core))      # X itself: dcore = C, dU_k = 0
        True
        >>> [float(abs(u).max()) < 1e-12 for u in g.dfactors]
        [True, True, True]
        """

        def rgrad(x1: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
            g = self._tangent(u1)
            return self._pack_tangent(
                rgrad_from_factor_grads(self._fixed_rank, self._point(x1), g.dcore, g.dfactors)
            )

        return self._batched(rgrad, [(x, "x"), (u, "the gradient")], (self.packed_size,))

    def inner(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        keepdim: bool = False,
    ) -> torch.Tensor:
        """Embedded (Frobenius) inner product ``⟨Dφ_x(u), Dφ_x(v)⟩`` of packed vectors.

        Not the Euclidean inner product of the packed vectors: in the gauge it is
        ``⟨Ċ_u, Ċ_v⟩ + Σ_k tr(U̇_kᵀ(u) U̇_k(v) C_(k)C_(k)ᵀ)`` (:meth:`FixedRankTucker.inner`);
        ``u`` and ``v`` are brought to the gauge first. ``v=None`` means ``v = u``. Shape
        ``()``, or ``(1,)`` with ``keepdim=True``; ``batch`` and ``batch + (1,)`` for stacks.

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> x = M.random(key=0, dtype=torch.float64)
        >>> u = M.proju(x, torch.randn(M.packed_size, dtype=torch.float64))
        >>> dense = M.tangent_to_dense(x, u)
        >>> bool(torch.isclose(M.inner(x, u), (dense**2).sum()))
        True
        """
        fr = self._fixed_rank

        def metric(x1: torch.Tensor, u1: torch.Tensor, v1: torch.Tensor | None = None) -> Any:
            point = self._point(x1)
            tu = fr.project(point, self._tangent(u1))
            tv = tu if v1 is None else fr.project(point, self._tangent(v1))
            return fr.inner(point, tu, tv)

        tensors = [(x, "x"), (u, "u")] if v is None else [(x, "x"), (u, "u"), (v, "v")]
        out = self._batched(metric, tensors, ())
        return out.unsqueeze(-1) if keepdim else out

    def component_inner(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``inner(x, u, v, keepdim=True)`` (shape ``(1,)``, ``batch + (1,)`` for stacks): one
        second-moment scalar per point in :class:`geoopt.optim.RiemannianAdam`, which keeps its
        update tangent and independent of the parametrization.

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> x = M.random(key=0, dtype=torch.float64)
        >>> M.component_inner(x, M.proju(x, torch.ones(M.packed_size, dtype=torch.float64))).shape
        torch.Size([1])
        """
        return self.inner(x, u, v, keepdim=True)

    def norm(self, x: torch.Tensor, u: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        """Norm of ``Dφ_x(u)`` in the embedded metric.

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> x = M.random(key=0, dtype=torch.float64)
        >>> float(M.norm(x, torch.zeros(M.packed_size, dtype=torch.float64)))
        0.0
        """
        return torch.sqrt(torch.clamp(self.inner(x, u, keepdim=keepdim), min=0.0))

    # ----------------------------------------------------------------- moving
    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Retraction: truncated HOSVD of ``X + Dφ_x(u)`` back to ``ranks``, never dense
        (:meth:`FixedRankTucker.retract`). Any packed ``u`` is accepted.

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> x = M.random(key=0, dtype=torch.float64)
        >>> u = M.proju(x, torch.randn(M.packed_size, dtype=torch.float64))
        >>> M.check_point_on_manifold(M.retr(x, 0.1 * u))
        True
        """
        return self._batched(
            lambda x1, u1: self._pack_point(
                self._fixed_rank.retract(self._point(x1), self._tangent(u1))
            ),
            [(x, "x"), (u, "u")],
            (self.packed_size,),
        )

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The retraction :meth:`retr` (the exponential map has no closed form here).

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> x = M.random(key=0, dtype=torch.float64)
        >>> u = M.proju(x, torch.randn(M.packed_size, dtype=torch.float64))
        >>> bool(torch.equal(M.expmap(x, u), M.retr(x, u)))
        True
        """
        return self.retr(x, u)

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Vector transport from ``x`` to ``y``: projection of ``Dφ_x(v)`` onto the tangent
        space at ``y`` (:meth:`FixedRankTucker.transport`), in the gauge of ``y``.

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> x = M.random(key=0, dtype=torch.float64)
        >>> v = M.proju(x, torch.randn(M.packed_size, dtype=torch.float64))
        >>> y = M.retr(x, 0.1 * v)
        >>> M.check_vector_on_tangent(y, M.transp(x, y, v))
        True
        """
        return self._batched(
            lambda x1, y1, v1: self._pack_tangent(
                self._fixed_rank.transport(self._point(x1), self._point(y1), self._tangent(v1))
            ),
            [(x, "x"), (y, "y"), (v, "v")],
            (self.packed_size,),
        )

    def retr_transp(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``y = retr(x, u)`` and ``transp(x, y, v)`` at once (what geoopt's optimizers call).

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> x = M.random(key=0, dtype=torch.float64)
        >>> u = M.proju(x, torch.randn(M.packed_size, dtype=torch.float64))
        >>> y, w = M.retr_transp(x, 0.1 * u, u)
        >>> M.check_vector_on_tangent(y, w)
        True
        """
        y = self.retr(x, u)
        return y, self.transp(x, y, v)

    def logmap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Not available: the fixed-rank Tucker manifold has no closed-form logarithm."""
        raise NotImplementedError(f"{self} has no closed-form logarithmic map")

    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        """Not available: no closed-form geodesic distance (compare dense tensors instead)."""
        raise NotImplementedError(f"{self} has no closed-form geodesic distance")

    # ----------------------------------------------------------------- checks
    def _check_shape(self, shape: tuple[int, ...], name: str) -> tuple[bool, str | None]:
        shape = tuple(shape)
        if not shape or shape[-1] != self.packed_size:
            return False, (
                f"'{name}' has shape {shape}, but packed tensors of {self} have shape "
                f"({self.packed_size},), or (..., {self.packed_size}) for a stack of them"
            )
        return True, None

    def _check_dtype(self, t: torch.Tensor, name: str) -> tuple[bool, str | None]:
        if t.dtype not in _DTYPES:
            return False, f"'{name}' has dtype {t.dtype}; {self} needs float32 or float64"
        return True, None

    def _check_packed(self, t: torch.Tensor, name: str) -> tuple[bool, str | None, type]:
        ok, reason = self._check_shape(t.shape, name)
        if not ok:
            return ok, reason, ValueError
        ok, reason = self._check_dtype(t, name)
        return ok, reason, TypeError

    def _check_each(
        self,
        check: Callable[..., tuple[bool, str | None]],
        tensors: Sequence[tuple[torch.Tensor, str]],
    ) -> tuple[bool, str | None]:
        """``check`` on every point of a stack; the first failure names its batch index."""
        for t, name in tensors:
            ok, reason = self._check_dtype(t, name)
            if not ok:
                return ok, reason
        batch, rows = self._rows(tensors)
        for i, row in enumerate(rows):
            ok, reason = check(*row)
            if not ok:
                if batch is None:
                    return ok, reason
                index = []
                for n in reversed(batch):
                    index.append(i % n)
                    i //= n
                return ok, f"at batch index {tuple(reversed(index))}: {reason}"
        return True, None

    def check_point(self, x: torch.Tensor, *, explain: bool = False) -> Any:
        """Whether ``x`` has the packed layout (shape ``(..., packed_size)``, float32/float64).

        :meth:`check_point_on_manifold` also checks orthonormal factors and a full-rank core.

        Examples
        --------
        >>> import torch
        >>> from tuckerman.integrations.geoopt import TuckerManifold
        >>> M = TuckerManifold((4, 5, 6), 2)
        >>> M.check_point(torch.zeros(38)), M.check_point(torch.zeros(3, 38))
        (True, True)
        >>> M.check_point(torch.zeros(5))
        False
        """
        ok, reason, _ = self._check_packed(x, "x")
        return (ok, reason) if explain else ok

    def assert_check_point(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` (wrong shape) or ``TypeError`` (wrong dtype) unless ``x`` has
        the packed layout; geoopt calls it when a ``ManifoldTensor`` is created."""
        ok, reason, error = self._check_packed(x, "x")
        if not ok:
            raise error(f"not a packed point of {self}: {reason}")

    def check_vector(self, u: torch.Tensor, *, explain: bool = False) -> Any:
        """Whether ``u`` has the packed layout (see :meth:`check_point`)."""
        ok, reason, _ = self._check_packed(u, "u")
        return (ok, reason) if explain else ok

    def assert_check_vector(self, u: torch.Tensor) -> None:
        """Raise ``ValueError`` / ``TypeError`` unless ``u`` has the packed layout."""
        ok, reason, error = self._check_packed(u, "u")
        if not ok:
            raise error(f"not a packed vector of {self}: {reason}")

    def _check_point_on_manifold(
        self, x: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        def check(x1: torch.Tensor) -> tuple[bool, str | None]:
            # |U_kᵀU_k - I| <= atol + rtol |I| entrywise, as numpy.allclose would have it
            return self._fixed_rank.check_point(self._point(x1), explain=True, atol=atol + rtol)

        return self._check_each(check, [(x, "x")])

    def _check_vector_on_tangent(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        def check(x1: torch.Tensor, u1: torch.Tensor) -> tuple[bool, str | None]:
            point = self._point(x1)
            # the off-gauge part relative to ||u||; factor-form rounding grows like eps cond(C)
            eps = torch.finfo(point.core.dtype).eps
            tol = max(atol + rtol, 100 * eps * core_condition(point))
            return self._fixed_rank.check_tangent(point, self._tangent(u1), explain=True, atol=tol)

        return self._check_each(check, [(x, "x"), (u, "u")])
