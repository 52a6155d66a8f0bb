"""Linear probe methods: difference of means, logistic regression with CV'd L2, shrinkage LDA.

Each method has a batched core working on torch float64 tensors with broadcast leading dims:

    core(X [..., m, d], y [..., m], w [..., m], inner [..., F, m] | None) -> W [..., d]

where w is a 0/1 row weight (padding and held-out rows get 0), y is 1 for "training" and `inner`
holds inner-CV training masks (only LogisticCV uses them). The sweep calls the cores on all layers,
folds and label sets at once; the sklearn-like classes below wrap the same cores with one problem.
Nothing here builds a d x d matrix when d > m: LDA uses Woodbury, logistic regression the kernel form.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from afprobe.errors import BadInput
from afprobe.probes.splits import fold_ids

Tensor = torch.Tensor
DTYPE = torch.float64
DEFAULT_CS = tuple(np.logspace(-1, 4, 6))  # relative C grid, see LogisticCV
_TINY = 1e-12
_BLOCK_BYTES = 3 * 2**20  # Newton systems solved together per block
_F32_FROM = 192  # Newton systems this large are formed and factorised in float32 (2-5x faster)


class single_thread:
    """Run torch single-threaded inside the block. The batched work here is many small matrices; on a
    machine whose cores are busy, torch's thread pool makes it 10-40x slower (measured), while one
    thread loses little when the machine is idle."""

    def __enter__(self) -> None:
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.n)


def cholesky(M: Tensor) -> tuple[Tensor, Tensor]:
    """Lower Cholesky factors of SPD matrices [..., m, m] and a [...] failure flag (info != 0)."""
    with single_thread():
        L, info = torch.linalg.cholesky_ex(M)
    return L, info != 0


def chol_solve(L: Tensor, B: Tensor) -> Tensor:
    """(L L^T)^-1 B for B [..., m, k] (two triangular solves: much faster than cholesky_solve)."""
    with single_thread():
        Y = torch.linalg.solve_triangular(L, B, upper=False)
        return torch.linalg.solve_triangular(L.transpose(-1, -2), Y, upper=True)


# ---------------------------------------------------------------------------------------------------
# batched cores


def _rows_dot(c: Tensor, X: Tensor) -> Tensor:
    """sum_m c[..., m] X[..., m, :] -> [..., d]. When X is shared by several label sets (a size-1 batch
    dim that c fills), einsum does one matrix product where `c.unsqueeze(-2) @ X` would first copy X once
    per label set (measured 300x slower for 50 label sets)."""
    return torch.einsum("...m,...md->...d", c, X)


def _class_stats(X: Tensor, y: Tensor, w: Tensor, c: int) -> tuple[Tensor, Tensor, Tensor]:
    """Weight [..., m], count [...] and mean [..., d] of class c."""
    wc = w * (y == c)
    nc = wc.sum(-1)
    mean = _rows_dot(wc, X) / nc.clamp_min(_TINY).unsqueeze(-1)
    return wc, nc, mean


def diff_means_core(X: Tensor, y: Tensor, w: Tensor, inner: Tensor | None = None) -> Tensor:
    """Mean of class 1 minus mean of class 0: [..., d]."""
    return _class_stats(X, y, w, 1)[2] - _class_stats(X, y, w, 0)[2]


def lda_core(X: Tensor, y: Tensor, w: Tensor, inner: Tensor | None = None) -> Tensor:
    """Sigma^-1 (mu1 - mu0) with Sigma the prior-weighted sum of per-class Ledoit-Wolf covariances,
    each estimated on standardised features and scaled back (what sklearn's
    LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto") computes). [..., d]

    Sigma = U^T U + diag(lam), U [..., m, d] the scaled class-centred rows, so for d > m the solve
    goes through an m x m Cholesky factor (Woodbury) instead of a d x d one.
    """
    d = X.shape[-1]
    ntot = w.sum(-1)
    stats = [_class_stats(X, y, w, c) for c in (0, 1)]  # (weight [..., m], count [...], mean [..., d])
    is1 = (y == 1).unsqueeze(-1)  # [..., m, 1]
    A = (X - torch.where(is1, stats[1][2].unsqueeze(-2), stats[0][2].unsqueeze(-2))) * w.unsqueeze(-1)
    scales = []
    for wc, nc, _ in stats:
        var = (wc.unsqueeze(-2) @ (A * A)).squeeze(-2) / nc.clamp_min(_TINY).unsqueeze(-1)  # [..., d]
        scales.append(torch.where(var > 0, var.sqrt(), torch.ones_like(var)))
    Z = A / torch.where(is1, scales[1].unsqueeze(-2), scales[0].unsqueeze(-2))  # standardised per class
    G = Z @ Z.transpose(-1, -2)  # [..., m, m]; only within-class blocks are used
    G2, diag = G * G, G.diagonal(dim1=-2, dim2=-1)
    coef, lam = torch.zeros_like(w), 0.0
    for (wc, nc, _), scale in zip(stats, scales):
        n_ = nc.clamp_min(_TINY)
        tr = (wc * diag).sum(-1) / n_  # trace of the standardised class covariance
        mu = tr / d
        delta_ = (wc.unsqueeze(-2) @ G2 @ wc.unsqueeze(-1)).squeeze(-1).squeeze(-1) / n_**2
        beta_ = (wc * diag * diag).sum(-1)
        beta = (beta_ / n_ - delta_) / (d * n_)
        delta = (delta_ - 2 * mu * tr + d * mu * mu) / d
        beta = torch.minimum(beta, delta)
        shrink = torch.where(beta > 0, beta / delta.clamp_min(_TINY), torch.zeros_like(beta))
        prior = nc / ntot
        coef = coef + wc * ((prior * (1 - shrink)) / n_).sqrt().unsqueeze(-1)
        lam = lam + (prior * shrink * mu).unsqueeze(-1) * scale * scale
    U = A * coef.unsqueeze(-1)
    means = [st[2] for st in stats]
    lam = lam + 1e-10 * lam.mean(-1, keepdim=True) + _TINY  # keeps the solve finite without shrinkage
    b = means[1] - means[0]
    m = U.shape[-2]
    if d <= m:
        S = U.transpose(-1, -2) @ U + torch.diag_embed(lam)
        return chol_solve(cholesky(S)[0], b.unsqueeze(-1)).squeeze(-1)
    P = U / lam.unsqueeze(-2)  # U diag(lam)^-1
    M = P @ U.transpose(-1, -2) + torch.eye(m, dtype=X.dtype)
    t = b / lam
    v = chol_solve(cholesky(M)[0], U @ t.unsqueeze(-1))
    return t - (P.transpose(-1, -2) @ v).squeeze(-1)


def _softplus(z: Tensor) -> Tensor:
    return torch.nn.functional.softplus(z)


def logreg_dual(K: Tensor, y: Tensor, w: Tensor, lam: Tensor, init: tuple[Tensor, Tensor] | None = None,
                max_iter: int = 100, tol: float = 1e-8) -> tuple[Tensor, Tensor]:
    """L2 logistic regression (unpenalised intercept) in kernel form by damped Newton.

    Minimises sum_i w_i logloss(z_i, y_i) + lam/2 |beta|^2 with beta = X^T a, z = K a + b0.
    K: [*Ks, m, m] Gram matrices X X^T (X centred for conditioning), each shared by all problems its
    batch dims broadcast to; y, w: [*shape, m]; lam: [*shape]; init: optional warm start (a, b0).
    The Newton step is exact: (lam I + X^T D X) is inverted through the m x m matrix lam I + S K S
    (S = sqrt(D)) and the intercept is eliminated by its Schur complement.
    Returns (a [*shape, m], b0 [*shape]).
    """
    shape = torch.broadcast_shapes(K.shape[:-2], y.shape[:-1], w.shape[:-1], lam.shape)
    m, nd = K.shape[-1], len(shape)
    ks = (1,) * (nd - (K.ndim - 2)) + tuple(K.shape[:-2])
    # problems sharing a Gram matrix become one group: dims K varies over first, then the others
    perm = [i for i in range(nd) if ks[i] != 1] + [i for i in range(nd) if ks[i] == 1]
    pshape = tuple(shape[i] for i in perm)
    G = int(np.prod([shape[i] for i in range(nd) if ks[i] != 1]))
    P = int(np.prod(shape)) // max(G, 1)

    def grouped(t: Tensor, tail: tuple[int, ...]) -> Tensor:
        t = t.expand(tuple(shape) + tail).permute(tuple(perm) + tuple(range(nd, nd + len(tail))))
        return t.reshape(G, P, *tail).contiguous()

    Kg = K.reshape(G, m, m)
    yg, wg, lg = grouped(y, (m,)), grouped(w, (m,)), grouped(lam, ())
    if init is None:
        nw = wg.sum(-1)
        ybar = ((wg * yg).sum(-1) / nw.clamp_min(_TINY)).clamp(1e-6, 1 - 1e-6)
        ag, bg = torch.zeros(G, P, m, dtype=K.dtype), torch.log(ybar / (1 - ybar))
    else:
        ag, bg = grouped(init[0], (m,)), grouped(init[1], ())
    step = max(1, _BLOCK_BYTES // (8 * m * m * max(P, 1)))  # each block's matrices stay in cache
    for g0 in range(0, G, step):
        sl = slice(g0, g0 + step)
        ag[sl], bg[sl] = _newton_block(Kg[sl], yg[sl], wg[sl], lg[sl], ag[sl], bg[sl], max_iter, tol)
    inv = np.argsort(perm).tolist()
    a = ag.reshape(*pshape, m).permute(tuple(inv) + (nd,))
    return a, bg.reshape(pshape).permute(tuple(inv))


def _newton_block(K: Tensor, y: Tensor, w: Tensor, lam: Tensor, a: Tensor, b: Tensor, max_iter: int,
                  tol: float) -> tuple[Tensor, Tensor]:
    """Newton iterations for problems [g, P] sharing K [g, m, m] per group; see logreg_dual."""
    g, P, m = y.shape
    a, b = a.clone(), b.clone()
    Kfac = K.float() if m >= _F32_FROM else K  # precision of the Newton systems, see _solve_spd
    kid = torch.arange(g).repeat_interleave(P)
    nw = w.sum(-1).reshape(-1)
    steps = 0.5 ** torch.arange(0, 12, dtype=K.dtype)[:, None, None]  # backtracking candidates
    act = torch.arange(g * P)

    def kmul(v: Tensor) -> Tensor:  # K @ v for v [g, P, m, c] -> [g, P, m, c]
        c = v.shape[-1]
        out = K @ v.permute(0, 2, 1, 3).reshape(g, m, P * c)
        return out.reshape(g, m, P, c).permute(0, 2, 1, 3)

    for _ in range(max_iter):
        if act.numel() == 0:
            break
        Ka = kmul(a.unsqueeze(-1)).squeeze(-1)
        z = Ka + b.unsqueeze(-1)
        p = torch.sigmoid(z)
        r = w * (p - y)
        D = w * p * (1 - p)
        S = D.sqrt()
        rhs = torch.stack([r + lam.unsqueeze(-1) * a, D], dim=-1)  # [g, P, m, 2]: gradient, intercept coupling
        KR = kmul(rhs)
        Sa, la = S.reshape(-1, m)[act], lam.reshape(-1)[act]
        Sf = Sa.to(Kfac.dtype)
        M = Kfac[kid[act]] * Sf.unsqueeze(-1) * Sf.unsqueeze(-2)
        M.diagonal(dim1=-2, dim2=-1).add_(la.to(Kfac.dtype).unsqueeze(-1))
        sol = torch.zeros(g * P, m, 2, dtype=K.dtype)
        sol[act], bad_a = _solve_spd(M, Sa.unsqueeze(-1) * KR.reshape(-1, m, 2)[act])
        sol[act] *= Sa.unsqueeze(-1)
        alpha = (rhs - sol.reshape(g, P, m, 2)) / lam[..., None, None]
        Kalpha = kmul(alpha)
        cu, cv = (D.unsqueeze(-1) * Kalpha).sum(-2).unbind(-1)
        gb = r.sum(-1)
        db = (gb - cu) / (D.sum(-1) - cv).clamp_min(_TINY)
        da = alpha[..., 0] - alpha[..., 1] * db.unsqueeze(-1)
        q = Kalpha[..., 0] - Kalpha[..., 1] * db.unsqueeze(-1)  # K da
        dec = (rhs[..., 0] * q).sum(-1) + gb * db  # Newton decrement^2 = g^T H^-1 g
        # objective along the step for all candidate step sizes at once (z is linear in t)
        t = steps
        zt = z.unsqueeze(0) - t.unsqueeze(-1) * (q + db.unsqueeze(-1)).unsqueeze(0)  # [T, g, P, m]
        aKa, daKa, daKda = (a * Ka).sum(-1), (da * Ka).sum(-1), (da * q).sum(-1)
        obj = (w * (_softplus(zt) - y * zt)).sum(-1) + 0.5 * lam * (aKa - 2 * t * daKa + t * t * daKda)
        obj0 = (w * (_softplus(z) - y * z)).sum(-1) + 0.5 * lam * aKa
        ok = obj <= obj0 - 1e-4 * t * dec.clamp_min(0)  # Armijo, [T, g, P]
        tt = (steps.reshape(-1)[ok.float().argmax(0)] * ok.any(0)).reshape(-1)
        bad = torch.zeros(g * P, dtype=torch.bool)
        bad[act] = bad_a
        live = torch.zeros(g * P, dtype=K.dtype)
        live[act] = 1.0
        tt = (tt * live * ~bad).reshape(g, P)
        a = a - tt.unsqueeze(-1) * da
        b = b - tt * db
        done = (dec.reshape(-1) <= tol * nw) | bad | ~ok.any(0).reshape(-1)
        act = act[~done[act]]
    return a, b


def _solve_spd(M: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """M^-1 B for SPD M [n, m, m] (float64, or float32 for large systems: an inexact Newton step still
    converges and gradients stay float64) and B [n, m, k] float64; also a failure flag [n]. float32
    factorisations that fail are retried in float64 with a tiny diagonal jitter."""
    L, bad = cholesky(M)
    X = chol_solve(L, B.to(M.dtype)).to(B.dtype)
    if M.dtype != B.dtype and bad.any():
        M64 = M[bad].to(B.dtype)
        M64.diagonal(dim1=-2, dim2=-1).add_(1e-6 * M64.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True))
        L64, bad64 = cholesky(M64)
        X[bad] = chol_solve(L64, B[bad])
        bad = bad.clone()
        bad[bad.clone()] = bad64
    return X, bad


def _mask_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Row indices [..., k] of True entries of mask [..., m] (padded with 0) and their validity [..., k]."""
    k = int(mask.sum(-1).max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :k]
    return order, torch.take_along_dim(mask, order, dim=-1)


def logreg_core(X: Tensor, y: Tensor, w: Tensor, inner: Tensor | None = None,
                cs: tuple[float, ...] = DEFAULT_CS) -> Tensor:
    """L2 logistic regression with C chosen by inner cross-validation (mean held-out log loss;
    ties go to the smaller C). [..., d]

    cs must be ascending. C is relative: the effective C is c / s2 with s2 the mean squared norm of the
    centred training rows, so one grid fits any residual-stream scale. inner: [..., F, m] inner training
    masks (held out = w and not inner); None skips the CV and uses the middle of the grid.
    """
    shape = torch.broadcast_shapes(X.shape[:-2], y.shape[:-1], w.shape[:-1])
    nw = w.sum(-1)
    # centre (any shift is exact: the intercept absorbs it; K is far better conditioned). X keeps its
    # own batch dims so label sets that share rows share K.
    Xc = X - X.mean(-2, keepdim=True)
    K = Xc @ Xc.transpose(-1, -2)  # [..., m, m]
    wK = (w.unsqueeze(-2) @ K @ w.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    s2 = ((w * K.diagonal(dim1=-2, dim2=-1)).sum(-1) / nw - wK / nw**2).clamp_min(_TINY)
    cs_t = torch.as_tensor(cs, dtype=X.dtype)
    if inner is None or len(cs) == 1:
        best = torch.full(shape, len(cs) // 2 if inner is None else 0, dtype=torch.long)
    else:
        # row selections depend on X, w and inner only (not on the label set): gather K once for them
        rshape = torch.broadcast_shapes(X.shape[:-2], w.shape[:-1], inner.shape[:-2])
        ok = w.unsqueeze(-2) > 0
        tr_idx, wtr = _mask_index((inner & ok).expand(*rshape, *inner.shape[-2:]))  # [*r, F, mt]
        te_idx, wte = _mask_index((~inner & ok).expand(*rshape, *inner.shape[-2:]))  # [*r, F, me]
        Kf = K.unsqueeze(-3)  # [..., 1, m, m]
        Ktr = torch.take_along_dim(torch.take_along_dim(Kf, tr_idx.unsqueeze(-1), dim=-2),
                                   tr_idx.unsqueeze(-2), dim=-1)
        Kte = torch.take_along_dim(torch.take_along_dim(Kf, te_idx.unsqueeze(-1), dim=-2),
                                   tr_idx.unsqueeze(-2), dim=-1)  # [*r, F, me, mt]
        yf = y.expand(*shape, y.shape[-1]).unsqueeze(-2)  # [*shape, 1, m]
        pad = (1,) * (len(shape) - len(rshape))
        ytr = torch.take_along_dim(yf, tr_idx.reshape(pad + tr_idx.shape), -1)
        yte = torch.take_along_dim(yf, te_idx.reshape(pad + te_idx.shape), -1)
        wtr, wte = wtr.to(X.dtype), wte.to(X.dtype)
        ll, init = [], None
        for c in cs_t:  # ascending C: each fit warm-starts from the previous, stronger-penalty one
            init = logreg_dual(Ktr, ytr, wtr, (s2 / c).unsqueeze(-1), init=init)
            z = (Kte @ init[0].unsqueeze(-1)).squeeze(-1) + init[1].unsqueeze(-1)  # [..., F, me]
            ll.append((wte * (_softplus(z) - yte * z)).sum(-1) / wte.sum(-1).clamp_min(_TINY))
        ll = torch.stack(ll, -1)  # [..., F, C] mean held-out log loss
        best = torch.argmin(ll.mean(-2), dim=-1)  # first minimum = smallest C
    lam = s2 / cs_t[best]
    a, _ = logreg_dual(K, y, w, lam)
    return _rows_dot(a, Xc)


# ---------------------------------------------------------------------------------------------------
# finishing: unit direction, orientation, separation, threshold


def finish(W: Tensor, X: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unit directions [..., d] oriented so class 1 projects higher on the training rows, with
    separation (mean projection class 1 - class 0) [...] and midpoint threshold [...]."""
    u = W / W.norm(dim=-1, keepdim=True).clamp_min(_TINY)
    proj = torch.einsum("...md,...d->...m", X, u)  # [..., m]; einsum: see _rows_dot
    w1, w0 = w * (y == 1), w * (y == 0)
    m1 = (w1 * proj).sum(-1) / w1.sum(-1).clamp_min(_TINY)
    m0 = (w0 * proj).sum(-1) / w0.sum(-1).clamp_min(_TINY)
    sign = torch.where(m1 >= m0, 1.0, -1.0).to(u.dtype)
    return u * sign.unsqueeze(-1), (m1 - m0) * sign, 0.5 * (m1 + m0) * sign


# ---------------------------------------------------------------------------------------------------
# sklearn-like classes


class Probe:
    """Common interface. After fit: direction_ [d] (unit, class 1 higher), separation_ (mean projection
    class 1 minus class 0 on the training rows), threshold_ (midpoint of the class means)."""

    name = ""
    small_batches = False  # the sweep feeds the core one (key, fold) at a time (memory-bound cores)
    direction_: np.ndarray
    separation_: float
    threshold_: float

    def core(self, X: Tensor, y: Tensor, w: Tensor, inner: Tensor | None) -> Tensor:
        """Unnormalised directions for a batch of problems: X [..., n, d], y and w [..., n] (w: 0/1 row weights,
        the fold's training rows), inner [k, n] inner-CV masks or None -> [..., d]."""
        raise NotImplementedError

    @classmethod
    def configured(cls, cs: tuple[float, ...] = DEFAULT_CS, inner_folds: int = 3, seed: int = 0) -> "Probe":
        """An instance with the sweep's settings (methods without hyperparameters ignore them)."""
        return cls()

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> "Probe":
        """X [n, d] float; y [n] in {0, 1}; groups [n] query ids (used for inner CV only)."""
        Xt, yt = _check_xy(X, y)
        w = torch.ones_like(yt)
        inner = self._inner_masks(len(yt), groups)
        with single_thread():
            u, sep, thr = finish(self.core(Xt, yt, w, inner), Xt, yt, w)
        self.direction_ = u.numpy()
        self.separation_, self.threshold_ = float(sep), float(thr)
        return self

    def _inner_masks(self, n: int, groups: np.ndarray | None) -> Tensor | None:
        return None

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Projection on direction_ minus threshold_: [n]; > 0 predicts class 1 ("training")."""
        if not hasattr(self, "direction_"):
            raise BadInput(f"{type(self).__name__} is not fitted")
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.direction_):
            raise BadInput(f"X must be [n, {len(self.direction_)}], got shape {X.shape}")
        return X @ self.direction_ - self.threshold_

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (self.decision_function(X) > 0).astype(np.int64)

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """AUROC of decision_function(X) against y."""
        from afprobe.probes.metrics import auroc

        return auroc(self.decision_function(X), np.asarray(y))


class DiffMeans(Probe):
    """Difference of class means."""

    name = "diff_means"

    def core(self, X, y, w, inner):
        return diff_means_core(X, y, w)


class LDA(Probe):
    """Linear discriminant with per-class Ledoit-Wolf shrinkage (sklearn lsqr/auto equivalent)."""

    name = "lda"
    small_batches = True

    def core(self, X, y, w, inner):
        return lda_core(X, y, w)


class LogisticCV(Probe):
    """Logistic regression, L2 strength chosen by `inner_folds`-fold CV (grouped by query if groups are
    given to fit) over the relative grid `cs` (effective C = c / mean squared centred row norm)."""

    name = "logreg"

    def __init__(self, cs: tuple[float, ...] = DEFAULT_CS, inner_folds: int = 3, seed: int = 0) -> None:
        if not cs or min(cs) <= 0:
            raise BadInput("cs must be a non-empty list of positive numbers")
        self.cs, self.inner_folds, self.seed = tuple(sorted(float(c) for c in cs)), int(inner_folds), int(seed)

    @classmethod
    def configured(cls, cs: tuple[float, ...] = DEFAULT_CS, inner_folds: int = 3, seed: int = 0) -> "Probe":
        return cls(cs=cs, inner_folds=inner_folds, seed=seed)

    def _inner_masks(self, n: int, groups: np.ndarray | None) -> Tensor | None:
        g = np.arange(n) if groups is None else np.asarray(groups)
        if len(g) != n:
            raise BadInput(f"groups has {len(g)} rows, X has {n}")
        return inner_masks(g, self.inner_folds, self.seed)

    def core(self, X, y, w, inner):
        return logreg_core(X, y, w, inner, cs=self.cs)


def inner_masks(groups: np.ndarray, k: int, seed: int) -> Tensor:
    """[k, n] bool inner-CV training masks from grouped folds of `groups` [n]."""
    fid = torch.as_tensor(fold_ids(groups, k, seed))
    return fid.unsqueeze(0) != torch.arange(k).unsqueeze(1)


# ---------------------------------------------------------------- the method registry

# A reference fit for `afprobe bench` (probes/bench.py): (Xtr [n, d], ytr [n], groups [n], cs, inner_folds,
# inner_seed) -> unnormalised direction [d], computed the straightforward way (numpy / scikit-learn).
Reference = Callable[[np.ndarray, np.ndarray, np.ndarray, tuple, int, int], np.ndarray]

METHODS: dict[str, type[Probe]] = {}
REFERENCES: dict[str, Reference] = {}


def register_method(cls: type[Probe], reference: Optional[Reference] = None) -> type[Probe]:
    """Make the probe class `cls` (a `Probe` with a `name` and a batched `core`) available by name to the config
    (probes.methods), the sweep, selection and direction fitting; `reference` lets `afprobe bench` check it
    (without one, bench skips it). Usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Probe)) or not cls.name:
        raise BadInput(f"a probe method must be a Probe subclass with a name, got {cls!r}")
    METHODS[cls.name] = cls
    if reference is not None:
        REFERENCES[cls.name] = reference
    else:
        REFERENCES.pop(cls.name, None)
    return cls


def make_probe(method: str, cs: tuple[float, ...] = DEFAULT_CS, inner_folds: int = 3, seed: int = 0) -> Probe:
    if method not in METHODS:
        raise BadInput(f"unknown probe method {method!r} (registered: {', '.join(METHODS)})")
    return METHODS[method].configured(cs=cs, inner_folds=inner_folds, seed=seed)


def _ref_diff_means(Xtr, ytr, gtr, cs, inner_folds, inner_seed):
    return Xtr[ytr == 1].mean(0) - Xtr[ytr == 0].mean(0)


def _ref_lda(Xtr, ytr, gtr, cs, inner_folds, inner_seed):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    return LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(Xtr, ytr).coef_[0]


def _ref_logreg(Xtr, ytr, gtr, cs, inner_folds, inner_seed):
    """Inner CV grouped by query on the training rows; C relative to the rows' scale."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV

    ifid = fold_ids(gtr, inner_folds, inner_seed)
    cv = [(np.flatnonzero(ifid != g), np.flatnonzero(ifid == g)) for g in range(inner_folds)]
    s2 = float(((Xtr - Xtr.mean(0)) ** 2).sum(1).mean())
    lr = LogisticRegressionCV(Cs=[c / s2 for c in cs], cv=cv, scoring="neg_log_loss", l1_ratios=(0.0,),
                              use_legacy_attributes=False, max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lr.fit(Xtr, ytr).coef_[0]


register_method(DiffMeans, _ref_diff_means)
register_method(LogisticCV, _ref_logreg)
register_method(LDA, _ref_lda)


def _check_xy(X: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise BadInput(f"X must be [n, d] and y [n]; got {X.shape} and {y.shape}")
    if not np.isin(y, (0, 1)).all() or len(np.unique(y)) < 2:
        raise BadInput("y must contain both labels 0 and 1 and nothing else")
    if not np.isfinite(X).all():
        raise BadInput("X contains NaN or inf")
    return torch.as_tensor(X, dtype=DTYPE), torch.as_tensor(y, dtype=DTYPE)


def fit_directions(features: dict[tuple, np.ndarray], labels: np.ndarray, groups: np.ndarray, rows: np.ndarray,
                   targets: list[tuple[tuple, str]], seed: int = 0) -> dict[tuple[tuple, str], tuple[np.ndarray, float]]:
    """Final directions for (key, method) targets, each fitted on the selected rows [n] bool of features[key]
    [n, d]: {(key, method): (unit direction [d] float64, separation)}."""
    out = {}
    for key, method in targets:
        probe = make_probe(method, seed=seed)
        probe.fit(np.asarray(features[key])[rows], np.asarray(labels)[rows], np.asarray(groups)[rows])
        out[(key, method)] = (probe.direction_, probe.separation_)
    return out
