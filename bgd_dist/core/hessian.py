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
  optimal correction of the remaining weights under ``H``;
- **exact codebook update**: for fixed assignments ``f`` is a quadratic in
  the ``K·d`` centroid values; its minimiser solves ``Sᵀ H S c = Sᵀ H w``
  (``S`` the sparse decoding operator). It is solved by preconditioned
  conjugate gradients (preconditioner: for every centroid the sum of the
  diagonal ``d x d`` blocks of ``H`` it is used at, which alone would give the
  paper's cluster means), started from the current centroids,
  so ``f`` decreases at every step.

:func:`fit_codebook_hessian` starts from the paper's solution under the pooled
metric derived from ``H`` and alternates the two steps, keeping the best
codebook by the exact objective. Pure torch; device and dtype follow the weight
(the computation is float64).
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


def exact_codebook(w: Tensor, hessian: Tensor, centroids: Tensor, assignments: Tensor,
                   steps: int = 20, tol: float = 1e-10) -> Tensor:
    """Centroids minimising ``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` for fixed ``assignments``.

    w: (n_rows, L) float64; hessian: (L, L) float64; centroids: (K, d) start
    point. At most ``steps`` preconditioned CG iterations on the normal
    equations ``Sᵀ H S c = Sᵀ H w``; each costs one (n_rows, L) x (L, L)
    product. CG minimises the quadratic over a growing Krylov space, so the
    objective never increases. Centroids no subvector uses are returned as given.
    """
    return _exact_codebook(w, hessian, centroids, assignments, steps, tol)[0]


def _exact_codebook(w: Tensor, hessian: Tensor, centroids: Tensor, assignments: Tensor, steps: int = 20,
                    tol: float = 1e-10, wh: Tensor | None = None, total: float | None = None,
                    stall: float = 0.0) -> tuple[Tensor, float | None]:
    """:func:`exact_codebook`, plus: ``wh`` = ``w @ hessian`` when already known (the right-hand
    side needs no product then); with ``total`` = ``tr(W H Wᵀ)`` given, the objective
    ``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` of the result is returned as well, at no cost
    (``total - bᵀx - rᵀx`` from CG's residual ``r = b - Ax``), and CG stops once a step lowers
    it by less than ``stall`` times its value (0: never). The products stay float64: with a
    singular ``H``, float32 products let the iterates drift along its null space."""
    k, d = centroids.shape
    n_rows, length = w.shape
    n_blocks = length // d
    x = centroids.to(torch.float64).clone()

    def apply(c: Tensor) -> Tensor:
        return _adjoint(decode_matrix(c, assignments, n_rows) @ hessian, assignments, k)

    def value(r: Tensor) -> float | None:
        return None if total is None else max(0.0, total - float((b * x).sum()) - float((r * x).sum()))

    # block-Jacobi preconditioner: P_k = Σ_{(j, p) assigned to k} H_jj
    diag_blocks = diagonal_blocks(hessian, d)
    block_of = torch.arange(n_blocks, device=w.device).repeat_interleave(n_rows)
    counts = torch.zeros(k, n_blocks, dtype=torch.float64, device=w.device)
    counts.index_put_((assignments, block_of), torch.ones_like(block_of, dtype=torch.float64), accumulate=True)
    precond = torch.einsum("kj,jab->kab", counts, diag_blocks)
    ridge = 1e-9 * float(hessian.diagonal().mean().abs()) + 1e-300
    eye = torch.eye(d, dtype=torch.float64, device=w.device)
    precond_inv = torch.linalg.pinv(precond + ridge * eye, hermitian=True)
    used = counts.sum(1) > 0

    b = _adjoint(w @ hessian if wh is None else wh, assignments, k)
    r = b - apply(x)
    r[~used] = 0
    b_norm = float(b.norm())
    f = value(r)
    if b_norm == 0 or float(r.norm()) <= tol * b_norm:
        return x, f
    z = torch.bmm(precond_inv, r.unsqueeze(2)).squeeze(2)
    p = z.clone()
    rz = float((r * z).sum())
    for _ in range(steps):
        ap = apply(p)
        pap = float((p * ap).sum())
        if pap <= 0 or rz <= 0:
            break
        alpha = rz / pap
        x += alpha * p
        r -= alpha * ap
        f_new = value(r)
        if float(r.norm()) <= tol * b_norm:
            f = f_new
            break
        if f is not None and f - f_new <= stall * f_new:
            f = f_new
            break
        f = f_new
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


def damped_inverse_cholesky(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λ I)⁻¹``, ``λ = damp · mean(diag H)``.

    With ``J`` the order reversal and ``J (H + λI) J = L Lᵀ``, ``U = J L⁻¹ J`` (upper
    triangular, positive diagonal, ``UᵀU = (H + λI)⁻¹``): one Cholesky factorisation
    and one triangular inverse, instead of factorising, inverting and factorising again.
    """
    length = hessian.shape[0]
    lam = damp * float(hessian.diagonal().mean())
    if lam <= 0:
        lam = 1e-12
    eye = torch.eye(length, dtype=hessian.dtype, device=hessian.device)
    flipped = hessian.flip(0, 1)
    for _ in range(8):  # raise the damping until the factorisation succeeds (singular H)
        lower, info = torch.linalg.cholesky_ex(flipped + lam * eye)
        if int(info) == 0:
            inv = torch.linalg.solve_triangular(lower, eye, upper=False)
            if bool(torch.isfinite(inv).all()):
                return inv.flip(0, 1)
        lam *= 10
    raise ValueError("the input statistics are not positive definite even with strong damping")


def block_factors(upper: Tensor, block_size: int) -> Tensor:
    """``U_jj⁻¹`` of every diagonal ``d x d`` block of ``U`` (upper triangular), (n_blocks, d, d), in one
    batched triangular solve (computed once per layer, reused by every error-feedback pass)."""
    blocks = diagonal_blocks(upper, block_size)
    eye = torch.eye(block_size, dtype=upper.dtype, device=upper.device).expand_as(blocks)
    return torch.linalg.solve_triangular(blocks, eye, upper=True)


def error_feedback_assign(w: Tensor, centroids: Tensor, upper: Tensor, lazy: int = 128,
                          factors: Tensor | None = None) -> Tensor:
    """GPTQ-style assignment of every block to a centroid, propagating each block's error.

    w: (n_rows, L) float64 (not modified); centroids: (K, d); upper: the
    upper Cholesky factor of the damped ``H⁻¹``; factors: :func:`block_factors` of
    ``upper`` when already known. Blocks are processed left to
    right; block ``j`` of every row goes to the centroid nearest under
    ``(U_jjᵀ U_jj)⁻¹`` (the loss of quantizing it when the later columns are
    re-optimised), and the later columns absorb the error. Updates to columns
    beyond the current ``lazy``-column window are applied once per window.
    The pass runs in ``upper``'s dtype (float32 is what GPTQ uses, and half the time).
    Returns block-major assignments (n_blocks * n_rows,).
    """
    n_rows, length = w.shape
    d = centroids.shape[1]
    n_blocks = length // d
    dtype = upper.dtype
    c = centroids.to(dtype)
    if factors is None:
        factors = block_factors(upper, d)
    local = factors @ factors.transpose(1, 2)                            # (n_blocks, d, d): (U_jjᵀ U_jj)⁻¹
    w = w.to(dtype, copy=True)
    out = torch.empty(n_blocks, n_rows, dtype=torch.long, device=w.device)
    window = max(1, lazy // d) * d
    for w0 in range(0, length, window):
        w1 = min(length, w0 + window)
        errors = torch.empty(n_rows, w1 - w0, dtype=dtype, device=w.device)
        for s in range(w0, w1, d):
            e = s + d
            j = s // d
            a = _nearest(w[:, s:e], c, local[j])
            out[j] = a
            err = (w[:, s:e] - c[a]) @ factors[j]                        # (n_rows, d)
            errors[:, s - w0:e - w0] = err
            if e < w1:
                w[:, e:w1] -= err @ upper[s:e, e:w1]
        if w1 < length:
            w[:, w1:] -= errors @ upper[w0:w1, w1:]
    return out.reshape(-1)


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
    once a round lowers the best objective by less than that share; ``W H``, the
    factorisation of the damped ``H⁻¹`` and its block factors are computed once.
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
    if not torch.isfinite(hessian).all():
        raise ValueError(f"layer {name!r}: the statistics contain NaN or inf")
    h = hessian.to(device=weight.device, dtype=torch.float64)
    h = (h + h.T) / 2
    if float(h.diagonal().sum()) <= 0:
        # the layer never sees a non-zero input: every codebook is exact; keep the weights-only fit
        cb = fit_codebook(weight, geometry, None, n_centroids, block_size, n_iter, init, seed, name, refine)
        return Codebook(cb.centroids, cb.assignments, (0.0, 0.0), cb.n_empty_repaired)
    base = fit_codebook(weight, geometry, pooled_metric(h, block_size), n_centroids, block_size, n_iter, init,
                        seed, name, refine)
    w = weight_matrix(weight.detach(), geometry).to(torch.float64)
    n_rows = w.shape[0]
    wh = w @ h                                    # once per layer: every right-hand side
    total = float((w * wh).sum())                 # tr(W H Wᵀ)
    if total <= 0:
        # the layer's output is zero on every input (zero weights, or weights only where H has no
        # variance): nothing to improve on the paper's codebook
        return Codebook(base.centroids, base.assignments, (0.0, 0.0), base.n_empty_repaired)
    h32 = h.float()                               # the GPTQ pass: float32
    best_c, best_a = base.centroids.to(torch.float64), base.assignments
    best = output_error(w, decode_matrix(best_c, best_a, n_rows), h) / total
    history = [best]
    c, value = _exact_codebook(w, h, best_c, best_a, cg_steps, wh=wh, total=total, stall=stall)
    value /= total
    if value < best:
        best, best_c = value, c
    history.append(best)
    if rounds:
        upper = damped_inverse_cholesky(h32, damp)     # float32, as GPTQ
        factors = block_factors(upper, block_size)
        current = best_c
        for _ in range(rounds):
            before = best
            a = error_feedback_assign(w, current, upper, factors=factors)
            current, value = _exact_codebook(w, h, current, a, cg_steps, wh=wh, total=total, stall=stall)
            value /= total
            if value < best:
                best, best_c, best_a = value, current, a
            history.append(best)
            if before - best <= stall * best:
                break
    centroids = best_c.to(weight.dtype)
    # the working-precision centroids are what the layer will decode
    return Codebook(centroids, best_a, tuple(history), base.n_empty_repaired)


__all__ = ["fit_codebook_hessian", "exact_codebook", "error_feedback_assign", "damped_inverse_cholesky", "block_factors",
           "pooled_metric", "decode_matrix", "relative_output_error", "output_error", "effective_rank", "auto_damp"]
