"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize one column at a time and spread its rounding error over the columns not yet
quantized, weighted by the inverse Hessian of the layer's squared output error.

The solver is split so that SliM-LLM reuses it unchanged:

* :func:`prepare_hessian` (:func:`fix_dead_inputs`, act-order, :func:`hessian_inverse_factor`) turns an
  input Hessian into ``U`` with ``H^-1 = U^T U``; it depends on the Hessian and the settings, not on the
  weight, so linears that read the same input (q/k/v, gate/up) can share one; :func:`solver_inputs`
  hands a solver that and its weight with the dead inputs zeroed;
* :func:`gptq_core` runs the sweep with one bit width per column group (``group_bits``) and a
  pluggable per-group grid fit (min-max here; SQC and binarization in ``slim.py``);
* :func:`gptq_quantize` is the GPTQ method itself (``act_order``, ``static_groups``, damping).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from ..codes import QuantizedMatrix, UniformCodes, num_groups
from ..config import GPTQConfig
from ..errors import NumericalError
from .uniform import minmax_grid

# (w_group [out, n_cols], bits, columns of the group in w) -> (scale [out], zero [out]), fp16-representable.
GridFit = Callable[[Tensor, int, slice], tuple[Tensor, Tensor]]

# How often a failed Cholesky is retried, each time with 10x the damping.
DAMP_RETRIES = 3
# Damping the retries start from when the configured percdamp is 0 (GPTQ's default is 0.01).
DAMP_RETRY_BASE = 1e-3


@contextmanager
def single_threaded() -> Iterator[None]:
    """One intra-op thread, the caller's count restored afterwards, for column sweeps: thousands of small
    ops, each of which waits at a thread barrier when a second thread is descheduled (on a 2-core machine
    with one other busy job, a 2048 x 5632 GPTQ sweep took 19.5 s on 2 threads and 9.7 s on 1; on 2 idle
    cores the whole solve takes the same time either way, 5.2 s against 5.3). The large products around
    the sweeps (lazy-batch updates, Cholesky, table solves) keep every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def group_slices(n_in: int, group_size: int) -> list[slice]:
    """Column ranges of the groups of ``group_size`` columns over ``n_in`` columns (last one may be partial)."""
    return [slice(s, min(s + group_size, n_in)) for s in range(0, n_in, group_size)]


def nearest_codes(w: Tensor, scale: Tensor, zero: Tensor, maxq: int, *, out: Tensor | None = None) -> Tensor:
    """Code of the grid level ``scale * (q - zero)`` nearest to ``w``, for integer or fractional zeros.

    Shapes broadcast (``w: [...]``, ``scale``/``zero`` against it); returns float codes in ``[0, maxq]``.
    The code is ``round(w / scale + zero)``; the integer part of ``zero`` is added after rounding, so
    for integer zeros this is exactly :func:`~sqllm.quant.uniform.quantize_to_grid` (GPTQ == RTN bit
    for bit when nothing is fed back), while a fractional part (binarized SliM groups) moves the
    rounding thresholds to the midpoints between levels. ``out``: where to write the codes.
    """
    z_int = torch.round(zero)
    return torch.clamp(torch.round(w / scale + (zero - z_int)) + z_int, 0, maxq, out=out)


def fix_dead_inputs(h: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs never active in calibration (``H_jj == 0``): their weights are irrelevant to the output (the
    solvers set them to 0), and ``H_jj = 1`` keeps ``H`` invertible (GPTQ reference).
    h: [in, in]. Returns (a float32 copy of ``h`` with those diagonal entries 1, dead: [in] bool)."""
    dead = torch.diagonal(h) == 0
    h = h.float().clone()
    h[dead, dead] = 1
    return h, dead


def _damping_schedule(percdamp: float) -> list[float]:
    """Damping fractions to try: the configured one, then 10x more each retry."""
    base = percdamp if percdamp > 0 else DAMP_RETRY_BASE
    return [percdamp] + [base * 10**k for k in range(1, DAMP_RETRIES + 1)]


def lower_triangular_inverse(l: Tensor, base: int = 256, out: Tensor | None = None) -> Tensor:
    """``L^-1`` of a lower-triangular ``l: [n, n]`` with a nonzero diagonal, by halves (LAPACK's trtri
    scheme, which torch does not expose): ``[[A, 0], [C, B]]^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]]``,
    the corner by two triangular solves. About ``n^3 / 3`` flops, all in large solves, where one solve
    against the identity would take ``n^3``. The halves are written into ``out`` (a new ``[n, n]`` when
    None), so beside it only the corner's two ``[n/2, n/2]`` temporaries are allocated."""
    n = l.shape[0]
    if out is None:
        out = torch.empty_like(l)
    if n <= base:
        out.copy_(torch.linalg.solve_triangular(l, torch.eye(n, dtype=l.dtype, device=l.device), upper=False))
        return out
    k = n // 2
    a, b, c = l[:k, :k], l[k:, k:], l[k:, :k]
    lower_triangular_inverse(a, base, out[:k, :k])
    lower_triangular_inverse(b, base, out[k:, k:])
    out[:k, k:].zero_()
    c_ainv = torch.linalg.solve_triangular(a, c, upper=False, left=False)
    torch.neg(torch.linalg.solve_triangular(b, c_ainv, upper=False), out=out[k:, :k])
    return out


def hessian_inverse_factor(h: Tensor, percdamp: float, name: str = "") -> tuple[Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` (so ``H^-1 = U^T U``), GPTQ §4 step 3.

    h: [in, in] float32, dead inputs already fixed. ``damp = frac * mean(diag H)`` (§4 step 3,
    "Cholesky reformulation"), ``frac = percdamp`` first, 10x larger on each of :data:`DAMP_RETRIES` retries.
    ``U`` comes from one factorization and one triangular inverse, without forming ``H^-1``: with ``J``
    the reversal permutation and ``J H J = L L^T``, ``H = (J L J)(J L J)^T`` with ``J L J`` upper, so
    ``U = (J L J)^-1 = J L^-1 J`` (half the work of inverting ``H`` and factoring the inverse again).
    At most about two and a half ``[in, in]`` matrices live beside ``h`` (on a 13824-input layer each is
    764 MB), where the textbook steps with an identity for the damping hold about five.
    Returns (U [in, in], frac used). Raises NumericalError naming the layer when all attempts fail.
    """
    if not bool(torch.isfinite(h).all()):
        raise NumericalError(f"layer {name!r}: the Hessian has inf/NaN entries; check the calibration inputs")
    mean_diag = torch.diagonal(h).mean()
    tried = _damping_schedule(percdamp)
    for frac in tried:
        damped = h.flip(0, 1)  # a copy: J H J
        damped.diagonal().add_(frac * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) != 0:
            continue
        inverse = lower_triangular_inverse(chol)
        del chol
        u = inverse.flip(0, 1)
        del inverse
        if bool(torch.isfinite(u).all()):
            return u, frac
    raise NumericalError(
        f"layer {name!r}: Hessian is not positive definite even with damping "
        f"{', '.join(f'{f:g}' for f in tried)} x mean(diag H) (= {float(mean_diag):.3g}); "
        "use more calibration samples or a larger --percdamp"
    )


def _block_bounds(n_in: int, blocksize: int, group_size: int | None) -> list[tuple[int, int]]:
    """Lazy-batch blocks (GPTQ §4 step 2), also cut at every group start when ``group_size`` is given so
    that a group's grid is fitted after all earlier errors were propagated into its columns. The cut
    does not change the result in exact arithmetic: lazy batching only defers the updates."""
    starts = set(range(0, n_in, blocksize))
    if group_size is not None:
        starts |= set(range(0, n_in, group_size))
    s = sorted(starts)
    return list(zip(s, s[1:] + [n_in]))


@dataclass(frozen=True)
class PreparedHessian:
    """What the GPTQ sweep takes from one input Hessian: built once by :func:`prepare_hessian` and shared
    by every linear that reads the same input (on a LLaMA block, q/k/v and gate/up: three of the
    seven factorizations). The Hessian itself is not kept: only its factor and the damping are needed.

    dead: [in] bool, the inputs with ``H_jj == 0`` (natural order); perm: [in] the processing order
    (act-order) or None; u: [in, in] the upper factor of ``(H + damp I)^-1`` in processing order, dead
    inputs at ``H_jj = 1``; frac: the damping fraction used; damp_abs: the absolute damping ``damp``;
    percdamp, act_order: the settings it was built with.
    """

    dead: Tensor
    perm: Tensor | None
    u: Tensor
    frac: float
    damp_abs: float
    percdamp: float
    act_order: bool

    def check(self, hessian: Tensor, percdamp: float, act_order: bool) -> None:
        """Raise ValueError unless this was built for a Hessian of that size with these settings."""
        if (self.percdamp, self.act_order) != (percdamp, act_order) or self.u.shape != hessian.shape:
            raise ValueError(
                f"prepared Hessian {tuple(self.u.shape)} (percdamp={self.percdamp}, act_order={self.act_order}) "
                f"does not fit {tuple(hessian.shape)} (percdamp={percdamp}, act_order={act_order})"
            )

    def live_weight(self, w: Tensor) -> Tensor:
        """A float32 copy of ``w: [out, in]`` with the dead inputs' columns set to 0 (see fix_dead_inputs)."""
        w = w.float().clone()
        w[:, self.dead] = 0
        return w


def prepare_hessian(hessian: Tensor, percdamp: float, act_order: bool = False, name: str = "") -> PreparedHessian:
    """Dead inputs fixed (:func:`fix_dead_inputs`), columns ordered by descending ``diag(H)`` with
    ``act_order`` (the reference code's heuristic), then :func:`hessian_inverse_factor`.
    hessian: [in, in] ``2/n sum x x^T``; it is not modified."""
    h, dead = fix_dead_inputs(hessian)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        h = h[perm][:, perm]
    u, frac = hessian_inverse_factor(h, percdamp, name)
    return PreparedHessian(dead=dead, perm=perm, u=u, frac=frac, damp_abs=frac * float(torch.diagonal(h).mean()),
                           percdamp=percdamp, act_order=act_order)


def solver_inputs(
    w: Tensor, hessian: Tensor, percdamp: float, act_order: bool, name: str, prepared: PreparedHessian | None
) -> tuple[Tensor, PreparedHessian]:
    """What a GPTQ-style solver starts from: ``w``'s live weight ``[out, in]`` and the prepared Hessian,
    built here unless another linear of the same input built it (then checked against the settings)."""
    if prepared is None:
        prepared = prepare_hessian(hessian, percdamp, act_order, name)
    prepared.check(hessian, percdamp, act_order)
    return prepared.live_weight(w), prepared


def gptq_core(
    w: Tensor,
    hinv_u: Tensor,
    group_size: int,
    group_bits: Tensor,
    fit_grid: GridFit,
    *,
    blocksize: int = 128,
    static_groups: bool = False,
    perm: Tensor | None = None,
) -> tuple[UniformCodes, Tensor, Tensor]:
    """The GPTQ sweep (Algorithm 1) with a bit width and a grid per column group.

    w:          [out, in] float32 in natural column order, dead inputs zeroed
    hinv_u:     [in, in] upper Cholesky factor of ``H^-1`` of the *processing* order (``H[perm][:, perm]``)
    group_size: columns per group; groups always refer to natural column indices
    group_bits: [n_groups] int, bits of each group (1..8); ``maxq = 2**bits - 1``
    fit_grid:   grid of one group, called with that group's current weights, its bits and its columns
    perm:       processing order (act_order) or None. Grids are then fitted up front on ``w`` (as with
                ``static_groups``), because a group's columns are not contiguous in the sweep.
    Returns (codes with scales/zeros per natural group, dequantized weight [out, in], rounded [out, in])
    where the weight is exactly ``codes.dequantize()``, computed from the stored fp16-representable grids,
    and ``rounded`` holds every column as it was just before rounding (after all earlier columns' error
    feedback), so that ``codes`` are its nearest codes on the grids.
    """
    out, n_in = w.shape
    n_g = num_groups(n_in, group_size)
    slices = group_slices(n_in, group_size)
    bits = [int(b) for b in group_bits]
    static = static_groups or perm is not None
    scales = torch.zeros(out, n_g, dtype=torch.float32, device=w.device)
    zeros = torch.zeros_like(scales)
    if static:
        for g, cols in enumerate(slices):
            scales[:, g], zeros[:, g] = fit_grid(w[:, cols], bits[g], cols)
    order = perm if perm is not None else torch.arange(n_in, device=w.device)
    col_group = (order // group_size).tolist()
    W = w[:, perm] if perm is not None else w.clone()
    codes, Q, R = torch.empty_like(W), torch.empty_like(W), torch.empty_like(W)  # every column is written
    for b0, b1 in _block_bounds(n_in, blocksize, None if static else group_size):
        if not static and b0 % group_size == 0:
            g = b0 // group_size
            scales[:, g], zeros[:, g] = fit_grid(W[:, slices[g]], bits[g], slices[g])
        # The block is swept transposed, [columns, out]: each step reads and writes whole contiguous
        # columns (row-major columns are strided: on 11008-row matrices several times slower). Every
        # element sees the same operations as in the row-major sweep, so the result is bit for bit the same.
        # Each step writes its results into the block's rows in place (no temporaries to copy), and
        # updates only the columns after its own, so that W1t ends holding every column as it was rounded.
        W1t = W[:, b0:b1].T.contiguous()
        U1 = hinv_u[b0:b1, b0:b1]
        pivots = U1.diagonal().tolist()
        Err1t, codes_t, Q_t = torch.empty_like(W1t), torch.empty_like(W1t), torch.empty_like(W1t)
        with single_threaded():
            for i in range(b1 - b0):
                g = col_group[b0 + i]
                s, z = scales[:, g], zeros[:, g]
                q = nearest_codes(W1t[i], s, z, 2 ** bits[g] - 1, out=codes_t[i])
                deq = torch.mul(s, q - z, out=Q_t[i])
                # OBQ update (§3) of the block's remaining columns, from the Cholesky row of column i (§4 step 3)
                err = torch.sub(W1t[i], deq, out=Err1t[i]).div_(pivots[i])
                W1t[i + 1:] -= torch.outer(U1[i, i + 1:], err)
        codes[:, b0:b1] = codes_t.T
        Q[:, b0:b1] = Q_t.T
        R[:, b0:b1] = W1t.T
        # deferred update of all later columns with the whole block's errors (lazy batch), accumulated
        # into W by the product itself: a product then a subtraction wrote and read an [out, rest]
        # temporary, a third of the sweep on a 4096 x 11008 layer, for the same values bit for bit
        W[:, b1:].addmm_(Err1t.T, hinv_u[b0:b1, b1:], alpha=-1)
    if perm is not None:
        codes[:, perm] = codes.clone()
        Q[:, perm] = Q.clone()
        R[:, perm] = R.clone()
    dense = UniformCodes(
        codes=codes.to(torch.uint8),
        scales=scales,
        zeros=zeros,
        group_bits=torch.as_tensor(bits, dtype=torch.int64),
        group_size=group_size,
    )
    return dense, Q, R


def hessian_error(w: Tensor, q: Tensor, h: Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: with ``H = 2/n X^T X`` this is ``2/n ||X W^T - X Q^T||_F^2``, the
    layer output error GPTQ minimizes (§3). w, q: [out, in]; h: [in, in] (undamped).

    The product runs in float32 and only the final sum in float64 (float64 products would cost more than
    the sweep). It still costs ``out * in**2`` multiply-adds, as much as the GPTQ sweep itself: the
    solvers report :func:`sweep_hessian_error` instead, and this direct form is its reference."""
    d = (w - q).float()
    return float(((d @ h.float()) * d).sum(dtype=torch.float64))


def sweep_hessian_error(w: Tensor, q: Tensor, rounded: Tensor, hinv_u: Tensor, damp: float, dead: Tensor,
                        perm: Tensor | None = None) -> float:
    """:func:`hessian_error` of a GPTQ sweep's result in ``O(out * in)``, from what the sweep rounded.

    Each column's scaled error ``e_j = (r_j - q_j) / U_jj`` is what the sweep fed back, and the sweep
    makes ``W - Q = E U`` (every column's update is row ``j`` of ``U`` times ``e_j``). With the damped
    ``H_d = H + damp I = U^-1 U^-T`` this gives ``tr((W - Q) H_d (W - Q)^T) = ||E||^2``, so
    ``tr((W - Q) H (W - Q)^T) = ||E||^2 - damp ||W - Q||^2``; inputs that :func:`fix_dead_inputs` gave
    ``H_jj = 1`` count once more, for the undamped Hessian has zeros there.

    w: [out, in] the weight swept (dead inputs zeroed); q, rounded: [out, in] from :func:`gptq_core`;
    hinv_u: [in, in] in processing order; damp: absolute damping added to the Hessian; dead: [in] bool,
    the inputs with ``H_jj == 0``; perm: the processing order, or None. Agrees with the direct form to the
    sweep's float32 round-off (relative 1e-7 on a 2048 x 4096 layer at damping 0.01 and 0.3).
    """
    u_diag = torch.diagonal(hinv_u)
    if perm is not None:
        u_diag = torch.empty_like(u_diag).index_copy_(0, perm, u_diag)
    e = (rounded - q) / u_diag
    d = w - q
    total = e.pow(2).sum(dtype=torch.float64) - damp * d.pow(2).sum(dtype=torch.float64)
    return float(total - d[:, dead].pow(2).sum(dtype=torch.float64))


def check_hessian_shape(w: Tensor, h: Tensor | None) -> None:
    """Raise ValueError unless ``h`` is ``[in, in]`` for ``w: [out, in]`` (an engine bug, not user input)."""
    if h is None or h.shape != (w.shape[1], w.shape[1]):
        got = None if h is None else tuple(h.shape)
        raise ValueError(f"Hessian of shape {got} does not match weight {tuple(w.shape)}; expected [in, in]")


def gptq_quantize(
    w: Tensor, hessian: Tensor, cfg: GPTQConfig, *, name: str = "", prepared: PreparedHessian | None = None
) -> QuantizedMatrix:
    """GPTQ on one weight ``w: [out, in]`` given ``hessian = 2/n sum x x^T: [in, in]``.

    Grids are min-max (fp16 scales) per output channel or per ``group_size`` columns, fitted on the
    error-updated weights when a group starts, or on the original ``w`` with ``static_groups``.
    ``act_order`` quantizes columns by descending ``diag(H)`` (the reference code's act-order heuristic).
    prepared: :func:`prepare_hessian` of this ``hessian`` with ``cfg``'s settings, when another linear
    with the same input already built it; the result is the same bit for bit.
    info: ``damp`` (damping fraction used), ``hessian_error`` (see :func:`sweep_hessian_error`).
    """
    check_hessian_shape(w, hessian)
    w1, prepared = solver_inputs(w, hessian, cfg.percdamp, cfg.act_order, name, prepared)
    u, perm, damp = prepared.u, prepared.perm, prepared.frac
    n_in = w1.shape[1]
    group_size = cfg.group_size if cfg.group_size is not None else n_in
    group_bits = torch.full((num_groups(n_in, group_size),), cfg.bits, dtype=torch.int64)

    def fit(wg: Tensor, bits: int, cols: slice) -> tuple[Tensor, Tensor]:
        return minmax_grid(wg, bits, cfg.sym)

    dense, q, rounded = gptq_core(
        w1, u, group_size, group_bits, fit, blocksize=cfg.blocksize, static_groups=cfg.static_groups, perm=perm
    )
    err = sweep_hessian_error(w1, q, rounded, u, prepared.damp_abs, prepared.dead, perm)
    return QuantizedMatrix(dense=dense, info={"damp": damp, "hessian_error": err})
