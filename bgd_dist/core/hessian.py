"""The ``hessian`` objective: full input statistics, error feedback, exact codebook.

The paper minimises, block by block, ``(w - c)ᵀ G (w - c)`` with one pooled
``d x d`` metric ``G`` (METHOD.md §2). The layer-output error it stands for is
exactly

    f(C, A) = tr((W - Ŵ) H (W - Ŵ)ᵀ),   H = E[x xᵀ]   (L x L, L = row length),

with ``W`` the ``(n_rows, L)`` weight matrix and ``Ŵ`` its decoding
(block ``j`` of row ``p`` is centroid ``A[j, p]``). For a conv2d with groups = 1
and for linear layers this is the exact squared output error summed over the
inputs ``H`` was collected on; for a transposed convolution whose kernel
windows overlap (stride < kernel) it is the same per-input-pixel
approximation the paper's metric makes. Grouped convolutions are not
supported (each group sees its own inputs; the paper objective is used).
Two things the pooled metric cannot do are done here:

- **error-feedback assignment** (GPTQ/OBS, as in GPTVQ): blocks of ``d``
  input columns are assigned in order, each under the local metric
  ``(U_jjᵀ U_jj)⁻¹`` where ``U`` is the upper Cholesky factor of the damped
  ``H⁻¹``, and the quantization error of block ``j`` is propagated to the
  columns not yet quantized (``W[:, >j] -= (W_j - Q_j) U_jj⁻¹ U_j,>j``), the
  optimal correction of the remaining weights under ``H``. It is run with
  ``V = U⁻¹`` (``V Vᵀ = H + λI``, one Cholesky factorisation; the ``L x L``
  inverse is never formed): the pass yields ``E = (W - Q) V``, whence
  ``(W - Q) H = E Vᵀ - λ(W - Q)`` and ``f = ||E||² - λ||W - Q||²``;
- **exact codebook update**: for fixed assignments ``f`` is a quadratic in
  the ``K·d`` centroid values; its minimiser solves ``Sᵀ H S c = Sᵀ H w``
  (``S`` the sparse decoding operator). It is solved by preconditioned
  conjugate gradients (preconditioner: for every centroid the sum of the
  diagonal ``d x d`` blocks of ``H`` it is used at, which alone would give the
  paper's cluster means), started from the current centroids,
  so ``f`` decreases at every step.

:func:`fit_codebook_hessian` starts from the paper's solution under the pooled
metric derived from ``H`` and alternates the two steps, keeping the best
codebook by the exact objective. With rounds, every product with ``H`` goes
through ``V`` in float32 (two triangular products, each half a dense one;
``tr(x H xᵀ)`` needs only the first), CG's search directions and the
objective's bookkeeping stay float64. Pure torch; device follows the weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kmeans import Codebook, _nearest, fit_codebook
from .layouts import LayerGeometry, weight_matrix
from .stats import diagonal_blocks


def pooled_metric(hessian: Tensor, block_size: int) -> Tensor:
    """The paper's ``d x d`` metric from the full one: the mean of the diagonal blocks of ``H``."""
    return diagonal_blocks(hessian, block_size).mean(0)


def decode_matrix(centroids: Tensor, assignments: Tensor, n_rows: int) -> Tensor:
    """``Ŵ`` (n_rows, L) from centroids (K, d) and block-major assignments (n_blocks * n_rows,)."""
    d = centroids.shape[1]
    return centroids[assignments].reshape(-1, n_rows, d).transpose(0, 1).reshape(n_rows, -1)


def _adjoint(y: Tensor, assignments: Tensor, n_centroids: int) -> Tensor:
    """``Sᵀ y``: the (K, d) sums of the blocks of ``y`` (n_rows, L) assigned to every centroid."""
    n_rows = y.shape[0]
    d = y.shape[1] // (assignments.shape[0] // n_rows)
    blocks = y.reshape(n_rows, -1, d).transpose(0, 1).reshape(-1, d)
    return torch.zeros(n_centroids, d, dtype=y.dtype, device=y.device).index_add_(0, assignments, blocks)


def output_error(w: Tensor, w_hat: Tensor, hessian: Tensor) -> float:
    """``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` for (n_rows, L) matrices, in float64."""
    diff = (w - w_hat).to(torch.float64)
    return float(((diff @ hessian.to(torch.float64)) * diff).sum())


def relative_output_error(weight: Tensor, decoded: Tensor, geometry: LayerGeometry, hessian: Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``: the relative layer-output error ``Σ||Wx - Ŵx||² / Σ||Wx||²``
    over the inputs ``H`` was collected on (both weights of ``geometry.weight_shape``)."""
    w = weight_matrix(weight.detach(), geometry).to(torch.float64)
    w_hat = weight_matrix(decoded.detach(), geometry).to(torch.float64)
    total = output_error(w, torch.zeros_like(w), hessian)
    err = output_error(w, w_hat, hessian)
    return err / total if total > 0 else (0.0 if err == 0 else float("inf"))


def _times_upper(x: Tensor, upper: Tensor, block: int = 256) -> Tensor:
    """``x @ upper`` for an upper triangular ``upper`` (L x L), skipping its zero half."""
    length = upper.shape[0]
    out = torch.empty(x.shape[0], length, dtype=x.dtype, device=x.device)
    for c0 in range(0, length, block):
        c1 = min(length, c0 + block)
        out[:, c0:c1] = x[:, :c1] @ upper[:c1, c0:c1]
    return out


def _times_upper_t(x: Tensor, upper: Tensor, block: int = 256) -> Tensor:
    """``x @ upperᵀ`` for an upper triangular ``upper`` (L x L), skipping its zero half."""
    length = upper.shape[0]
    out = torch.empty(x.shape[0], length, dtype=x.dtype, device=x.device)
    for c0 in range(0, length, block):
        c1 = min(length, c0 + block)
        out[:, c0:c1] = x[:, c0:] @ upper[c0:c1, c0:].T
    return out


def _sq(x: Tensor) -> float:
    """``Σ x²`` accumulated in float64."""
    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


class _Dense:
    """Products with ``H`` itself (float64): ``x H`` and ``tr(x H xᵀ)``."""

    def __init__(self, hessian: Tensor):
        self.h = hessian

    def quad(self, x: Tensor) -> tuple[Tensor, float]:
        y = x @ self.h
        return y, float((y * x).sum())

    def finish(self, x: Tensor, state: Tensor) -> Tensor:
        return state


class _Factored:
    """Products with ``H = V Vᵀ - λI`` through the upper Cholesky factor ``V`` of the damped ``H``
    (float32, as the error feedback): ``tr(x H xᵀ) = ||x V||² - λ||x||²`` costs one triangular product
    (half a dense one), ``x H = (x V) Vᵀ - λx`` a second one, computed only when needed."""

    def __init__(self, chol: Tensor, lam: float):
        self.v, self.lam = chol, lam

    def quad(self, x: Tensor) -> tuple[tuple[Tensor, Tensor], float]:
        x32 = x.to(self.v.dtype)
        t = _times_upper(x32, self.v)
        return (x32, t), _sq(t) - self.lam * _sq(x32)

    def finish(self, x: Tensor, state: tuple[Tensor, Tensor]) -> Tensor:
        x32, t = state
        y = _times_upper_t(t, self.v)
        y -= self.lam * x32
        return y.to(torch.float64)


def exact_codebook(w: Tensor, hessian: Tensor, centroids: Tensor, assignments: Tensor,
                   steps: int = 20, tol: float = 1e-10) -> Tensor:
    """Centroids minimising ``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` for fixed ``assignments``.

    w: (n_rows, L) float64; hessian: (L, L) float64; centroids: (K, d) start
    point. At most ``steps`` preconditioned CG iterations on the normal
    equations ``Sᵀ H S c = Sᵀ H w``; each costs one (n_rows, L) x (L, L)
    product. CG minimises the quadratic over a growing Krylov space, so the
    objective never increases. Centroids no subvector uses are returned as given.
    """
    h = hessian.to(torch.float64)
    return _exact_codebook(w, _Dense(h), diagonal_blocks(h, centroids.shape[1]), centroids, assignments, steps, tol)[0]


def _exact_codebook(w: Tensor, op, blocks: Tensor, centroids: Tensor, assignments: Tensor, steps: int = 20,
                    tol: float = 1e-10, start: tuple[Tensor, float] | None = None,
                    stall: float = 0.0) -> tuple[Tensor, float]:
    """:func:`exact_codebook` with the products ``op`` (:class:`_Dense` or :class:`_Factored`;
    ``hessian`` only gives the preconditioner's diagonal blocks), and: ``start`` =
    (``(W - Ŵ) H``, ``tr((W - Ŵ) H (W - Ŵ)ᵀ)``) at the start point when already known (from the
    error feedback); returns the objective ``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` of the result as well, tracked
    along CG's steps (``f(x + αp) = f - 2α pᵀr + α² pᵀAp``) at no cost. Every step first computes
    ``pᵀAp`` (half a product with :class:`_Factored`) and finishes ``Ap`` only when CG goes on; CG stops
    once a step lowers the objective by less than ``stall`` times its value (0: never), when the
    residual falls below ``tol`` times its start, or when rounding would make a step increase it."""
    k, d = centroids.shape
    n_rows, length = w.shape
    n_blocks = length // d
    x = centroids.to(torch.float64).clone()

    # block-Jacobi preconditioner: P_k = Σ_{(j, p) assigned to k} H_jj
    diag_blocks = blocks.to(torch.float64)
    block_of = torch.arange(n_blocks, device=w.device).repeat_interleave(n_rows)
    counts = torch.zeros(k, n_blocks, dtype=torch.float64, device=w.device)
    counts.index_put_((assignments, block_of), torch.ones_like(block_of, dtype=torch.float64), accumulate=True)
    precond = torch.einsum("kj,jab->kab", counts, diag_blocks)
    ridge = 1e-9 * float(diag_blocks.diagonal(dim1=1, dim2=2).mean().abs()) + 1e-300
    eye = torch.eye(d, dtype=torch.float64, device=w.device)
    precond_inv = torch.linalg.pinv(precond + ridge * eye, hermitian=True)
    used = counts.sum(1) > 0

    if start is None:
        diff = w - decode_matrix(x, assignments, n_rows)
        state, f = op.quad(diff)
        y = op.finish(diff, state)
    else:
        y, f = start
    r = _adjoint(y.to(torch.float64), assignments, k)
    r[~used] = 0
    r0_norm = float(r.norm())
    if r0_norm == 0:
        return x, f
    z = torch.bmm(precond_inv, r.unsqueeze(2)).squeeze(2)
    p = z.clone()
    rz = float((r * z).sum())
    for step in range(steps):
        if rz <= 0:
            break
        big_p = decode_matrix(p, assignments, n_rows)
        state, pap = op.quad(big_p)
        if not pap > 0:
            break
        alpha = rz / pap
        change = -2 * alpha * float((p * r).sum()) + alpha * alpha * pap
        if not change < 0:
            break                                # rounding: the step would not lower the objective
        x += alpha * p
        f_new = max(0.0, f + change)
        stop = (f - f_new <= stall * f_new) or step == steps - 1
        f = f_new
        if stop:
            break
        ap = _adjoint(op.finish(big_p, state), assignments, k)
        r -= alpha * ap
        if float(r.norm()) <= tol * r0_norm:
            break
        z = torch.bmm(precond_inv, r.unsqueeze(2)).squeeze(2)
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, f


#: an eigenvalue counts towards the effective rank when it exceeds this share of the largest one
RANK_RTOL = 1e-6


def effective_rank(matrix: Tensor, rtol: float = RANK_RTOL) -> int:
    """The number of eigenvalues of the symmetric PSD ``matrix`` above ``rtol`` times the largest
    (float64; 0 for a zero matrix). Fewer than ``matrix.shape[0]``: some input directions were
    never seen on the calibration data, and the objective does not constrain the weights there."""
    m = matrix.detach().to(torch.float64)
    eig = torch.linalg.eigvalsh((m + m.T) / 2)
    top = float(eig[-1]) if eig.numel() else 0.0
    if not top > 0:
        return 0
    return int((eig > rtol * top).sum())


def auto_damp(rank: int, dim: int, base: float = 0.01, most: float = 1.0) -> float:
    """``quantize.hessian.damp: auto``: ``base`` (GPTQ's 1 %) for a full-rank ``H``, scaled by
    ``dim / rank`` when ``H`` is rank-deficient (the error feedback then leans less on directions
    the calibration data never excited), at most ``most``; ``most`` for a zero ``H``."""
    if rank <= 0:
        return most
    return min(most, base * dim / rank)


def _damped_cholesky(hessian: Tensor | None, damp: float, flipped: Tensor | None = None) -> tuple[Tensor, float]:
    """(``V``, ``λ``): the upper triangular ``V`` with ``V Vᵀ = H + λI``, ``λ = damp · mean(diag H)``,
    raised tenfold (at most 8 times) until the factorisation succeeds (singular ``H``). ``flipped``:
    ``H`` with the order of rows and columns reversed, when already built (overwritten).

    With ``J`` the order reversal and ``J (H + λI) J = L Lᵀ``, ``V = J L J``; ``V⁻¹`` is the upper
    Cholesky factor of ``(H + λI)⁻¹`` that GPTQ works with, never formed here."""
    if flipped is None:
        flipped = hessian.flip(0, 1)
    lam = damp * float(flipped.diagonal().mean())
    if lam <= 0:
        lam = 1e-12
    shift = 0.0
    for _ in range(8):
        flipped.diagonal().add_(lam - shift)
        shift = lam
        lower, info = torch.linalg.cholesky_ex(flipped)
        if int(info) == 0 and bool(torch.isfinite(lower.diagonal()).all()):
            return lower.flip(0, 1), lam
        del lower
        lam *= 10
    raise ValueError("the input statistics are not positive definite even with strong damping")


def damped_cholesky(hessian: Tensor, damp: float) -> Tensor:
    """Upper triangular ``V`` with ``V Vᵀ = H + λI``, ``λ = damp · mean(diag H)`` (raised while the
    factorisation fails); ``V⁻¹`` is the upper Cholesky factor of the damped ``H⁻¹``. In ``hessian``'s dtype."""
    return _damped_cholesky(hessian, damp)[0]


def teacher_target_weight(w: Tensor, hessian: Tensor, cross: Tensor, damp: float) -> Tensor:
    """``W* = W + W Dᵀ (H + λI)⁻¹`` with ``D = C − H`` (float64): the weight whose outputs on the
    student's inputs best reproduce the teacher's (``quantize.hessian.target: teacher``;
    :class:`~bgd_dist.core.stats.TeacherTargetStats`). ``w`` (n_rows, L); ``hessian`` ``H = Σ x̃ x̃ᵀ``
    and ``cross`` ``C = Σ x̃ xᵀ`` (L x L); ``λ`` as in the fit (:func:`damped_cholesky`), so ``W* = W``
    exactly where the inputs agree (``C = H``)."""
    h = hessian.to(torch.float64)
    w = w.to(device=h.device, dtype=torch.float64)
    upper = damped_cholesky(h, damp)                       # V Vᵀ = H + λI
    rhs = (cross.to(h) - h) @ w.T                          # D Wᵀ
    # (H + λI)⁻¹ D Wᵀ = V⁻ᵀ V⁻¹ D Wᵀ; H and the damping are symmetric, so this is (W Dᵀ (H + λI)⁻¹)ᵀ
    solved = torch.linalg.solve_triangular(upper.T, torch.linalg.solve_triangular(upper, rhs, upper=True),
                                           upper=False)
    return w + solved.T


# the damps ``hessian.target_damp: auto`` tries (besides W itself, infinite damping)
TARGET_DAMPS = (0.001, 0.01, 0.1, 1.0, 10.0)


def select_target_damp(w: Tensor, hessian: Tensor, cross: Tensor, held_hessian: Tensor, held_cross: Tensor,
                       damps: tuple[float, ...] = TARGET_DAMPS) -> tuple[float | None, Tensor]:
    """The damp of ``damps`` whose target ``W*`` (:func:`teacher_target_weight` on the fitted statistics
    ``hessian``, ``cross``) best reproduces the teacher's outputs on held-out images, and that ``W*``:
    the smallest ``Σ ||V x̃ − W x||²`` over the held-out rows, which up to a constant is
    ``tr(V H' Vᵀ) − 2 tr(V C' Wᵀ)`` with their ``H' = Σ x̃ x̃ᵀ``, ``C' = Σ x̃ xᵀ``. ``W`` itself competes
    as infinite damping: (None, ``w``) when no ``W*`` beats it. One eigendecomposition of ``H``
    serves every damp (float64)."""
    h = hessian.to(torch.float64)
    w = w.to(device=h.device, dtype=torch.float64)
    held_h, held_c = held_hessian.to(h), held_cross.to(h)
    evals, evecs = torch.linalg.eigh(h)
    evals = evals.clamp_min(0.0)
    rotated = evecs.T @ ((cross.to(h) - h) @ w.T)          # Qᵀ D Wᵀ, (H + λI)⁻¹ = Q diag(1/(e + λ)) Qᵀ
    mean_diag = h.diagonal().mean().clamp_min(1e-300)

    def held_error(v: Tensor) -> float:
        return float(((v @ held_h) * v).sum() - 2 * ((v @ held_c) * w).sum())

    best, best_damp, best_err = w, None, held_error(w)
    for damp in damps:
        v = w + (evecs @ (rotated / (evals + damp * mean_diag)[:, None])).T
        err = held_error(v)
        if err < best_err:
            best, best_damp, best_err = v, damp, err
    return best_damp, best


def block_factors(upper: Tensor, block_size: int) -> Tensor:
    """``U_jj⁻¹`` of every diagonal ``d x d`` block of ``U`` (upper triangular), (n_blocks, d, d), in one
    batched triangular solve (computed once per layer, reused by every error-feedback pass)."""
    blocks = diagonal_blocks(upper, block_size)
    eye = torch.eye(block_size, dtype=upper.dtype, device=upper.device).expand_as(blocks)
    return torch.linalg.solve_triangular(blocks, eye, upper=True)


def error_feedback_assign(w: Tensor, centroids: Tensor, chol: Tensor, lazy: int = 128,
                          factors: Tensor | None = None) -> Tensor:
    """GPTQ-style assignment of every block to a centroid, propagating each block's error.

    w: (n_rows, L) float64 (not modified); centroids: (K, d); chol: :func:`damped_cholesky`
    ``V`` of ``H`` (``V⁻¹ = U``, GPTQ's upper Cholesky factor of the damped ``H⁻¹``); factors:
    :func:`block_factors` of ``V`` when already known. Blocks are processed left to right;
    block ``j`` of every row goes to the centroid nearest under ``(U_jjᵀ U_jj)⁻¹ = V_jj V_jjᵀ``
    (the loss of quantizing it when the later columns are re-optimised), and the later columns
    absorb the error. Updates to columns beyond the current ``lazy``-column window are applied
    once per window. The pass runs in ``chol``'s dtype (float32 is what GPTQ uses, and half the time).
    Returns block-major assignments (n_blocks * n_rows,).
    """
    return _error_feedback(w, centroids, chol, lazy, factors)[0]


def _error_feedback(w: Tensor, centroids: Tensor, chol: Tensor, lazy: int = 128,
                    factors: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`error_feedback_assign`, returning (assignments, ``E``, ``D``) with ``D = W - Q`` the
    quantization error and ``E = D V`` (so ``D H = E Vᵀ - λD`` and ``tr(D H Dᵀ) = ||E||² - λ||D||²``).

    GPTQ updates ``W_j ← W_j - Σ_{i<j} E_i U_ij`` with ``E_j = (W_j - Q_j) U_jj⁻¹`` for the
    updated ``W_j``; since ``W - Q = E U`` (original ``W``), ``E = (W - Q) V`` and the updated
    block is ``W_j + R_j V_jj⁻¹`` with ``R_j = Σ_{i<j} D_i V_ij``: the same pass run with ``V``,
    without inverting the ``L x L`` factor."""
    n_rows, length = w.shape
    d = centroids.shape[1]
    n_blocks = length // d
    dtype = chol.dtype
    c = centroids.to(dtype)
    if factors is None:
        factors = block_factors(chol, d)                                 # V_jj⁻¹
    diag = diagonal_blocks(chol, d)                                      # V_jj = U_jj⁻¹
    local = diag @ diag.transpose(1, 2)                                  # (U_jjᵀ U_jj)⁻¹
    w = w.to(dtype)
    err = torch.empty(n_rows, length, dtype=dtype, device=w.device)     # E = D V
    diff = torch.empty(n_rows, length, dtype=dtype, device=w.device)    # D = W - Q
    out = torch.empty(n_blocks, n_rows, dtype=torch.long, device=w.device)
    window = max(1, lazy // d) * d
    for w0 in range(0, length, window):
        w1 = min(length, w0 + window)
        # R for the window from every earlier window at once (left-looking: one GEMM, no read-modify-write
        # of all later columns per window)
        acc = diff[:, :w0] @ chol[:w0, w0:w1] if w0 else torch.zeros(n_rows, w1, dtype=dtype, device=w.device)
        for s in range(w0, w1, d):
            e = s + d
            j = s // d
            target = w[:, s:e] + acc[:, s - w0:e - w0] @ factors[j]
            a = _nearest(target, c, local[j])
            out[j] = a
            q = c[a]
            diff[:, s:e] = w[:, s:e] - q
            err[:, s:e] = (target - q) @ diag[j]
            if e < w1:
                acc[:, e - w0:] += diff[:, s:e] @ chol[s:e, e:w1]
    return out.reshape(-1), err, diff


#: the refinement is shortened where fewer than this many products with H fit in the paper fit's EM arithmetic
LONG_ROWS = 3


def _symmetrized(matrix: Tensor, tile: int = 512, dtype: torch.dtype | None = None,
                 flip: bool = False) -> tuple[Tensor, bool]:
    """(``(M + Mᵀ) / 2`` (bitwise, then cast to ``dtype``; with ``flip`` its rows and columns in reverse
    order), whether it is finite), tile by tile so the transposed read stays in cache (several
    times faster than the whole-matrix expression on a 12544² float64 matrix)."""
    n = matrix.shape[0]
    out = torch.empty(n, n, dtype=dtype or matrix.dtype, device=matrix.device)
    finite = True
    for i0 in range(0, n, tile):
        i1 = min(n, i0 + tile)
        for j0 in range(i0, n, tile):
            j1 = min(n, j0 + tile)
            block = (matrix[i0:i1, j0:j1] + matrix[j0:j1, i0:i1].T) / 2
            finite = finite and bool(torch.isfinite(block).all())
            block = block.to(out.dtype)
            if flip:
                out[n - i1:n - i0, n - j1:n - j0] = block.flip(0, 1)
                if j0 != i0:
                    out[n - j1:n - j0, n - i1:n - i0] = block.T.flip(0, 1)
            else:
                out[i0:i1, j0:j1] = block
                if j0 != i0:
                    out[j0:j1, i0:i1] = block.T
    return out, finite


def fit_codebook_hessian(
    weight: Tensor,
    geometry: LayerGeometry,
    hessian: Tensor,
    n_centroids: int,
    block_size: int,
    n_iter: int = 100,
    init: str = "random",
    seed: int = 0,
    name: str = "<layer>",
    refine: str = "hartigan",
    rounds: int = 4,
    damp: float = 0.01,
    cg_steps: int = 20,
    stall: float = 1e-3,
) -> Codebook:
    """One codebook for the layer under the full input statistics ``hessian`` (L x L, PSD).

    1. The paper's fit (:func:`fit_codebook`, ``n_iter`` iterations) under the
       pooled metric of ``H`` (the mean of its diagonal blocks);
    2. its exact codebook update (:func:`exact_codebook`);
    3. ``rounds`` times: error-feedback assignment under the damped ``H``, then
       the exact codebook update.

    The codebook with the lowest exact objective is returned. ``stall`` (0 = off) ends a
    CG solve once a step lowers the objective by less than that share, and the rounds
    once a round lowers the best objective by less than that share; the Cholesky factor
    of the damped ``H`` and its block factors are computed once.
    Long rows (``n_iter · K < LONG_ROWS · L``: one product with ``H``, ``n_rows x L x L``,
    costs more than a third of the paper fit's EM arithmetic, e.g. the 12544-input box head
    of a detector): step 2 is skipped when rounds follow (``objective[1] = objective[0]``),
    at most 2 rounds run, the first with at most 2 CG steps, the second with 1.
    ``Codebook.objective`` holds the relative objective
    ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` of the best codebook so far after step 1,
    step 2 and every round (non-increasing).
    """
    if rounds < 0 or cg_steps < 0:
        raise ValueError(f"layer {name!r}: rounds and cg_steps must be >= 0, got {rounds}, {cg_steps}")
    if stall < 0:
        raise ValueError(f"layer {name!r}: stall must be >= 0, got {stall}")
    if not damp > 0:
        raise ValueError(f"layer {name!r}: damp must be > 0, got {damp}")
    if geometry.groups != 1:
        raise ValueError(f"layer {name!r}: the hessian objective needs groups = 1 (got {geometry.groups}); "
                         f"use the paper objective for grouped convolutions")
    length = geometry.row_length
    if tuple(hessian.shape) != (length, length):
        raise ValueError(f"layer {name!r}: hessian shape {tuple(hessian.shape)} != ({length}, {length})")
    h64 = hessian.to(device=weight.device, dtype=torch.float64)
    if rounds:
        # the error feedback and every product with H go through the Cholesky factor of the damped H,
        # in float32: the full symmetrised H is only needed reversed, in float32
        flipped, finite = _symmetrized(h64, dtype=torch.float32, flip=True)
        h = None
    else:
        h, finite = _symmetrized(h64)
    if not finite:
        raise ValueError(f"layer {name!r}: the statistics contain NaN or inf")
    blocks = diagonal_blocks(h64, block_size)
    blocks = (blocks + blocks.transpose(1, 2)) / 2             # the diagonal blocks of (H + Hᵀ) / 2
    if float(h64.diagonal().sum()) <= 0:
        # the layer never sees a non-zero input: every codebook is exact; keep the weights-only fit
        cb = fit_codebook(weight, geometry, None, n_centroids, block_size, n_iter, init, seed, name, refine)
        return Codebook(cb.centroids, cb.assignments, (0.0, 0.0), cb.n_empty_repaired)
    base = fit_codebook(weight, geometry, blocks.mean(0), n_centroids, block_size, n_iter, init,
                        seed, name, refine)
    w = weight_matrix(weight.detach(), geometry).to(torch.float64)
    n_rows = w.shape[0]
    # long rows: a product with H (n_rows x L x L) costs L / K EM iterations of the paper fit
    # (n_rows x L x K each); where fewer than LONG_ROWS of them fit in the paper fit, the refinement
    # is shortened (no exact update of the paper's own assignment; at most 2 rounds, of at most 2 and 1 CG steps)
    long_rows = n_iter * base.centroids.shape[0] < LONG_ROWS * length
    if long_rows:
        rounds = min(rounds, 2)
    if rounds:
        chol, lam = _damped_cholesky(None, damp, flipped=flipped)    # float32, as GPTQ
        del flipped
        factors = block_factors(chol, block_size)
        op = _Factored(chol, lam)
    else:
        op = _Dense(h)
    _, total = op.quad(w)                                       # tr(W H Wᵀ)
    noise = 1e-5 * (total + lam * _sq(w)) if rounds else 0.0   # float32 rounding of ||W V||²
    if total <= noise:
        # the layer's output is zero on every input (zero weights, or weights only where H has no
        # variance): nothing to improve on the paper's codebook
        return Codebook(base.centroids, base.assignments, (0.0, 0.0), base.n_empty_repaired)
    best_c, best_a = base.centroids.to(torch.float64), base.assignments
    diff = w - decode_matrix(best_c, best_a, n_rows)
    state, value = op.quad(diff)
    best = value / total
    history = [best]
    if not (rounds and long_rows):
        c, value = _exact_codebook(w, op, blocks, best_c, best_a, cg_steps, start=(op.finish(diff, state), value),
                                   stall=stall)
        value /= total
        if value < best:
            best, best_c = value, c
    # (long rows: the first round starts from the paper's codebook)
    history.append(best)
    del diff, state
    if rounds:
        current = best_c
        for i in range(rounds):
            before = best
            steps = min(cg_steps, 1 if i else 2) if long_rows else cg_steps
            a, err, diff = _error_feedback(w, current, chol, factors=factors)
            value = _sq(err) - lam * _sq(diff)                  # tr(D H Dᵀ) = ||D V||² - λ||D||²
            y = _times_upper_t(err, chol)
            y -= lam * diff                                     # D H
            del err, diff
            current, value = _exact_codebook(w, op, blocks, current, a, steps, start=(y, value), stall=stall)
            del y
            value /= total
            if value < best:
                best, best_c, best_a = value, current, a
            history.append(best)
            if before - best <= stall * best:
                break
    centroids = best_c.to(weight.dtype)
    # the working-precision centroids are what the layer will decode
    return Codebook(centroids, best_a, tuple(history), base.n_empty_repaired)


__all__ = ["fit_codebook_hessian", "exact_codebook", "error_feedback_assign", "damped_cholesky",
           "block_factors", "teacher_target_weight",
           "pooled_metric", "decode_matrix", "relative_output_error", "output_error", "effective_rank", "auto_damp"]
