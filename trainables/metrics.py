"""Neural-collapse metrics of one layer's features: streaming accumulators plus small pure functions.

Definitions and conventions are those of ``shared/SCIENCE.md`` (metric-definition version
:data:`trainables.config.METRIC_DEFINITIONS_VERSION`). Notation: taps ``h`` of width d, C classes,
``mu_c`` class means, ``mu_G`` the mean of the class means, ``M = [mu_c - mu_G]`` (d x C).

Nothing here builds a d x d matrix for wide taps (a ResNet ``layer1`` tap on CIFAR is 65,536 wide): every
metric needs only per-class counts and sums (pass 1), then, with the means fixed, within-class squared
norms, a C x d projection and NCC decisions (pass 2). All accumulation is in float64.

:func:`layer_metrics` is the notebook API; it runs the same :class:`TapAccumulator` the training loop
streams through, on one chunk, so the two cannot disagree.
"""

from __future__ import annotations

import torch

# Widest tap whose d x d within-class Gram is accumulated exactly for the stable rank (32 MiB in float64);
# wider taps use a randomised sketch (see ``TapAccumulator._spectral_norm_sq``).
GRAM_MAX_WIDTH = 2048
SKETCH_WIDTH = 32
# Cap on one float64 working block, in elements (8 MiB): wide taps stream in row chunks small enough to
# stay in cache, which measured 2x faster on a 65,536-wide tap than 64 MiB blocks.
_BLOCK_ELEMENTS = 1 << 20
# Relative eigenvalue cut-off for pseudo-inverses: M has rank C-1 by construction (its columns sum to 0).
_PINV_RTOL = 1e-10


class DegenerateFeaturesError(ValueError):
    """The features admit no defined value of the metrics (message says why)."""


class TapAccumulator:
    """Two-pass streaming statistics of one layer's features on one split, for one model or a stack.

    Pass 1 (:meth:`add_pass1`) accumulates class counts and sums; :meth:`end_pass1` fixes the class means.
    Pass 2 (:meth:`add_pass2`) accumulates, around those means, within-class squared norms per class,
    the projected scatter ``sum_i ||M^+ (h_i - mu_{y_i})||^2`` (nc1, SCIENCE.md "Computing them at
    scale"), the spectral statistics for the stable rank, and NCC decisions against ``ncc_means``
    (the **train** means, seed 004 Def. 6; this split's own means when none are given).

    ``members``: the features of that many models of one architecture on the same samples (a trial
    bundle) arrive stacked, ``members x N x ...``, and every statistic carries a leading member axis, so
    the whole stack costs the launches of one model (issue 8: small models are launch-bound). A member
    whose features are degenerate is recorded in :attr:`degenerate` and left out of :meth:`result`; the
    others are unaffected. Without ``members`` (one model, ``N x ...``) degenerate features raise.
    """

    def __init__(
        self, num_classes: int, dim: int, device: torch.device | str = "cpu", members: int | None = None
    ) -> None:
        if num_classes < 2:
            raise DegenerateFeaturesError(f"need at least 2 classes, got num_classes={num_classes}")
        self.num_classes = num_classes
        self.dim = dim
        self.device = torch.device(device)
        self.members = members
        f64 = dict(dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(num_classes, **f64)  # members see the same samples
        self.sums = torch.zeros(members or 1, num_classes, dim, **f64)
        self.degenerate: dict[int, str] = {}
        self._pass = 1

    def _stacked(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """``t`` with the member axis: a lone model's tensors get one of size 1."""
        return t if t is None or self.members is not None else t.unsqueeze(0)

    def _rows(self, features: torch.Tensor) -> torch.Tensor:
        """members x N x d."""
        h = self._stacked(features)
        return h.reshape(h.shape[0], h.shape[1], -1)

    # ---- pass 1 -------------------------------------------------------------------------------------
    def add_pass1(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        assert self._pass == 1, "pass 1 already ended"
        h = self._rows(features)
        step = self._rows_per_block()
        for lo in range(0, h.shape[1], step):
            block = h[:, lo : lo + step].to(torch.float64)
            yb = labels[lo : lo + block.shape[1]]
            self.sums.index_add_(1, yb, block)
            self.counts += torch.bincount(yb, minlength=self.num_classes).to(torch.float64)

    def end_pass1(self, ncc_means: torch.Tensor | None = None) -> torch.Tensor:
        """Fix this split's class means; return them (C x d, or members x C x d; rows of absent classes
        are zero). ``ncc_means``: the train means for NCC decisions, in the same shape."""
        present = self.counts > 0
        if int(present.sum()) < 2:
            raise DegenerateFeaturesError(
                f"need samples of at least 2 classes, got {int(present.sum())} class(es) present"
            )
        self.present = present
        finite = torch.isfinite(self.sums).flatten(1).all(1)
        self.means = torch.zeros_like(self.sums)
        self.means[:, present] = self.sums[:, present] / self.counts[present, None]
        # A member's non-finite means must not reach the shared linear algebra below (a batched
        # eigendecomposition fails on NaN); zero means make its M zero, and it is left out of the result.
        mu = torch.where(finite[:, None, None], self.means[:, present], 0.0)  # m x C' x d
        self.global_mean = mu.mean(1)
        self.M = (mu - self.global_mean[:, None]).mT  # m x d x C'
        gram = self.M.mT @ self.M  # m x C' x C'
        coincide = finite & (torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1) <= 0)
        for i, (bad, same) in enumerate(torch.stack([~finite, coincide], 1).tolist()):
            if bad:
                self.degenerate[i] = "features contain NaN or infinite values"
            elif same:
                self.degenerate[i] = (
                    "all class means coincide (e.g. constant features): between-class scatter is zero"
                )
        if self.members is None and self.degenerate:
            raise DegenerateFeaturesError(self.degenerate[0])
        self.ok = finite & ~coincide
        # M^+ = (M^T M)^+ M^T, the pseudo-inverse through the small C' x C' Gram; eigenvalues below the
        # cut-off (M has rank C'-1) get weight 0 rather than being dropped, so members stack.
        evals, evecs = torch.linalg.eigh(gram)
        keep = evals > _PINV_RTOL * evals.amax(-1, keepdim=True)
        inverse = torch.where(keep, 1.0 / evals, 0.0)
        self.M_pinv = ((evecs * inverse[:, None, :]) @ evecs.mT) @ self.M.mT  # m x C' x d

        if ncc_means is None:
            self.ncc_means, self.ncc_classes = mu, torch.nonzero(present).flatten()
        else:
            ncc_means = self._stacked(ncc_means).to(device=self.device, dtype=torch.float64)
            self.ncc_means = ncc_means
            self.ncc_classes = torch.arange(ncc_means.shape[1], device=self.device)
        self.ncc_sq_norms = (self.ncc_means**2).sum(-1)  # m x C
        # 2 mu_c^T, so pass 2 scales C x d numbers rather than N x d (exact: a power-of-two factor).
        self.ncc_means_2t = 2.0 * self.ncc_means.mT

        m = self.sums.shape[0]
        f64 = dict(dtype=torch.float64, device=self.device)
        self.within_sq = torch.zeros(m, self.num_classes, **f64)  # sum ||h - mu_y||^2 per class
        self.projected_sq = torch.zeros(m, **f64)
        self.ncc_correct = torch.zeros(m, **f64)
        self.ncc_mismatch = torch.zeros(m, **f64)
        self.has_predictions = False
        if self.dim <= GRAM_MAX_WIDTH:
            self.within_gram = torch.zeros(m, self.dim, self.dim, **f64)
        else:
            gen = torch.Generator(device="cpu").manual_seed(0)
            k = min(SKETCH_WIDTH, self.dim)
            # The sketch product runs in float32 (an estimate either way); it accumulates in float64.
            self.sketch_in = torch.randn(self.dim, k, generator=gen).to(self.device)
            self.sketch_out = torch.zeros(m, self.dim, k, **f64)
        self._pass = 2
        return self.means if self.members is not None else self.means[0]

    # ---- pass 2 -------------------------------------------------------------------------------------
    def add_pass2(
        self, features: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor | None = None
    ) -> None:
        """``predictions``: the network's predicted labels (N, or members x N)."""
        assert self._pass == 2, "call end_pass1 first"
        h = self._rows(features)
        predictions = self._stacked(predictions)
        step = self._rows_per_block()
        for lo in range(0, h.shape[1], step):
            block = h[:, lo : lo + step].to(torch.float64)
            yb = labels[lo : lo + block.shape[1]]
            diff = block - self.means.index_select(1, yb)
            self.within_sq.index_add_(1, yb, torch.linalg.vector_norm(diff, dim=-1) ** 2)
            if self.dim <= GRAM_MAX_WIDTH:
                self.within_gram += diff.mT @ diff  # nc1's projection is read off it (see result)
            else:
                self.projected_sq += ((diff @ self.M_pinv.mT) ** 2).sum((1, 2))
                diff32 = diff.float()
                self.sketch_out += diff32.mT @ (diff32 @ self.sketch_in)
            # argmin_c ||h - mu_c||^2 = argmin_c (||mu_c||^2 - 2 h.mu_c); ||h||^2 is common to all c.
            dist = self.ncc_sq_norms[:, None, :] - block @ self.ncc_means_2t
            ncc = self.ncc_classes[dist.argmin(-1)]
            self.ncc_correct += (ncc == yb).sum(-1)
            if predictions is not None:
                self.has_predictions = True
                self.ncc_mismatch += (ncc != predictions[:, lo : lo + block.shape[1]]).sum(-1)

    # ---- results ------------------------------------------------------------------------------------
    def result(
        self,
        classifier: torch.Tensor | None = None,
        next_weight: torch.Tensor | None = None,
        next_weight_svd: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, float] | list[dict[str, float] | None]:
        """All metrics of SCIENCE.md's table that the given inputs define: a dict, or with ``members`` a
        list with one dict per member (None for a degenerate one). ``classifier`` and ``next_weight``
        carry the member axis too; ``next_weight_svd``: the ``(S, Vh)`` of ``next_weight`` in float64
        when the caller already has it (one SVD per weight and epoch serves both splits)."""
        assert self._pass == 2, "run both passes first"
        present = self.present
        counts = self.counts[present]
        n = counts.sum()
        within_sq = self.within_sq[:, present]  # m x C'
        tr_w = within_sq.sum(-1) / n
        means = self.means[:, present]
        # Law of total variance: Tr(Sigma_T) = Tr(Sigma_W) + (1/N) sum_c N_c ||mu_c - mean||^2, exact.
        sample_mean = (counts[:, None] * means).sum(1) / n
        tr_t = tr_w + (counts * ((means - sample_mean[:, None]) ** 2).sum(-1)).sum(-1) / n
        if self.dim <= GRAM_MAX_WIDTH:
            # sum_i ||M^+ d_i||^2 = Tr(M^+ G M^+T) with G = sum_i d_i d_i^T the within-class Gram, exact:
            # a C x d x d product instead of an N x d x C one.
            self.projected_sq = ((self.M_pinv @ self.within_gram) * self.M_pinv).sum((1, 2))
        out = {
            "nc1": self.projected_sq / n,
            "nc1_ratio": tr_w / tr_t,
            **nc2_metrics(self.M),
            "cdnv": cdnv(means, within_sq / counts),
            "ncc_acc": self.ncc_correct / n,
            # Within-class spread below float64 rounding of the means (relative 1e-10 in norm) is no
            # spread: its "stable rank" would be that of rounding noise. Collapsed features report 0.
            "stable_rank": torch.where(
                tr_w > 1e-20 * tr_t, within_sq.sum(-1) / self._spectral_norm_sq(), 0.0
            ),
        }
        if self.has_predictions:
            out["ncc_mismatch"] = self.ncc_mismatch / n
        if classifier is not None:
            weight = self._stacked(classifier).to(self.device, torch.float64)[:, present]
            out["nc3"] = nc3(weight, self.M)
        if next_weight is not None:
            if next_weight_svd is None:
                next_weight_svd = weight_svd(self._stacked(next_weight), members=True)
            else:
                next_weight_svd = tuple(self._stacked(t) for t in next_weight_svd)
            sv, vh = (t.to(self.device) for t in next_weight_svd)
            out["nc3_alignment"] = nc3_alignment(self.M, None, self.num_classes, vh=vh)
            out["weight_stable_rank"] = (sv**2).sum(-1) / sv[:, 0] ** 2  # ||W||_F^2 / ||W||_2^2 (002 §4)
        names = list(out)
        rows = torch.stack([out[k].to(torch.float64) for k in names], 1).tolist()  # one host sync
        values = [None if i in self.degenerate else dict(zip(names, row)) for i, row in enumerate(rows)]
        return values if self.members is not None else values[0]

    def _spectral_norm_sq(self) -> torch.Tensor:
        """``||H||_2^2`` of the within-class-centred features H (N x d), i.e. lambda_max(H^T H), per member.

        Exact from the d x d Gram when d <= GRAM_MAX_WIDTH. Wider taps keep ``Z = (H^T H) G`` for a fixed
        Gaussian d x k sketch G and take the largest generalised eigenvalue of ``(G^T S^2 G, G^T S G)``,
        S = H^T H: a Rayleigh quotient of S, hence a lower bound on lambda_max that is tight when the
        spectrum is dominated by a few directions (collapsed features); the stable rank is then an
        upper estimate. One pass, d x k memory.
        """
        ok = self.ok[:, None, None]  # a degenerate member's NaN must not fail the batched eigensolver
        if self.dim <= GRAM_MAX_WIDTH:
            return torch.linalg.eigvalsh(torch.where(ok, self.within_gram, 0.0))[:, -1]
        sketch_out = torch.where(ok, self.sketch_out, 0.0)
        a = self.sketch_in.double().T @ sketch_out  # G^T S G, m x k x k
        b = sketch_out.mT @ sketch_out  # G^T S^2 G
        evals, evecs = torch.linalg.eigh((a + a.mT) / 2)
        keep = evals > _PINV_RTOL * evals.amax(-1, keepdim=True)
        # Directions outside the sketch's range get weight 0: they add zero eigenvalues, not the maximum.
        whiten = evecs * torch.where(keep, evals, 1.0).rsqrt().where(keep, 0.0)[:, None, :]
        return torch.linalg.eigvalsh(whiten.mT @ b @ whiten)[:, -1]

    def _rows_per_block(self) -> int:
        if self.device.type != "cpu":
            return 1 << 62  # no cache to fit: one launch per statistic (the caller bounds the batch)
        return max(1, _BLOCK_ELEMENTS // max(1, self.dim * self.sums.shape[0]))


# ---- pure functions of the centred class means (any leading batch dimensions) ------------------------
def nc2_metrics(M: torch.Tensor) -> dict[str, torch.Tensor]:
    """Equinorm, equiangularity and distance to a simplex ETF of the centred means M (d x C).

    - ``nc2_equinorm = std_c ||M_c|| / mean_c ||M_c||`` (population std; Papyan et al., 003 §3 NC2).
    - ``nc2_equiangle = mean_{c != c'} |cos(M_c, M_c') + 1/(C-1)|`` (003 §3 NC2).
    - ``nc2_etf = || M^T M/||M^T M||_F - (I - 11^T/C)/||I - 11^T/C||_F ||_F`` (000 §2.1, 002 §4).
    """
    c = M.shape[-1]
    norms = M.norm(dim=-2)
    gram = M.mT @ M
    cos = gram / (norms[..., :, None] * norms[..., None, :])
    off = ~torch.eye(c, dtype=torch.bool, device=M.device)
    etf = torch.eye(c, dtype=M.dtype, device=M.device) - 1.0 / c
    fro = torch.linalg.matrix_norm(gram)[..., None, None]
    return {
        "nc2_equinorm": norms.std(dim=-1, correction=0) / norms.mean(-1),
        "nc2_equiangle": (cos[..., off] + 1.0 / (c - 1)).abs().mean(-1),
        "nc2_etf": torch.linalg.matrix_norm(gram / fro - etf / etf.norm()),
    }


def cdnv(means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """Class-distance normalised variance, mean over pairs i<j of ``(V_i + V_j) / (2 ||mu_i - mu_j||^2)``,
    ``V_c = mean_{y=c} ||h - mu_c||^2`` (003 §4.1, Galanti et al.). Two coinciding class means give +inf.
    ``means``: (...) x C x d; ``variances``: (...) x C."""
    c = means.shape[-2]
    i, j = torch.triu_indices(c, c, offset=1, device=means.device)
    dist_sq = ((means[..., i, :] - means[..., j, :]) ** 2).sum(-1)
    return ((variances[..., i] + variances[..., j]) / (2 * dist_sq)).mean(-1)


def nc3(classifier: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Self-duality ``|| W^T/||W||_F - M/||M||_F ||_F`` with W the C x d classifier (000 §2.3)."""
    w_norm = torch.linalg.matrix_norm(classifier)[..., None, None]
    m_norm = torch.linalg.matrix_norm(M)[..., None, None]
    return torch.linalg.matrix_norm(classifier.mT / w_norm - M / m_norm)


def weight_svd(weight: torch.Tensor, members: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and right-singular vectors ``(S, Vh)`` of a layer weight, flattened to out x in,
    in float64; with ``members``, of each weight in a stack (members x out x ...)."""
    lead = weight.shape[: 2 if members else 1]
    w = weight.detach().reshape(*lead, -1).to(torch.float64)
    _, sv, vh = torch.linalg.svd(w, full_matrices=False)
    return sv, vh


def nc3_alignment(
    M: torch.Tensor, weight: torch.Tensor | None, num_classes: int, vh: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cosine of the principal angles between range(M) and the top-C right-singular subspace of the
    weight that consumes these features (002 §4 and App. A). 1 means fully aligned.

    range(M) has dimension rank(M) <= C-1; the number of angles is min(rank(M), C). ``vh``: the weight's
    right-singular vectors when already computed (then ``weight`` may be None). Any leading batch
    dimensions.
    """
    u, s, _ = torch.linalg.svd(M, full_matrices=False)
    in_range = s > _PINV_RTOL**0.5 * s.amax(-1, keepdim=True)
    q_m = u * in_range[..., None, :]  # an orthonormal basis of range(M), padded with zero columns
    if vh is None:
        _, _, vh = torch.linalg.svd(weight, full_matrices=False)
    v_c = vh[..., :num_classes, :].mT
    # The zero columns add zero singular values after the min(rank, C) cosines (svdvals sorts them).
    cosines = torch.linalg.svdvals(q_m.mT @ v_c).clamp(max=1.0)
    angles = in_range.sum(-1).clamp(max=v_c.shape[-1])
    first = torch.arange(cosines.shape[-1], device=M.device) < angles[..., None]
    return (cosines * first).sum(-1) / angles


def stable_rank(matrix: torch.Tensor) -> torch.Tensor:
    """``||A||_F^2 / ||A||_2^2`` (002 §4)."""
    a = matrix.to(torch.float64)
    return a.norm() ** 2 / torch.linalg.matrix_norm(a, ord=2) ** 2


def layer_metrics(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    predictions: torch.Tensor | None = None,
    classifier: torch.Tensor | None = None,
    next_weight: torch.Tensor | None = None,
    means: torch.Tensor | None = None,
) -> dict[str, float]:
    """Every neural-collapse metric of one layer's features (SCIENCE.md, "Metrics, per layer").

    Args:
        features: N samples of any shape; each is flattened to a vector.
        labels: N integer labels in ``[0, num_classes)``.
        num_classes: C. Classes without samples are left out of every metric (the others are still
            defined); fewer than 2 classes present is an error.
        predictions: the network's N predicted labels; adds ``ncc_mismatch`` (NC4, 004 Def. 5/6).
        classifier: the C x d last-layer weight; adds ``nc3`` (000 §2.3).
        next_weight: the weight (out x d) of the layer that consumes these features; adds
            ``nc3_alignment`` (002 App. A) and its ``weight_stable_rank``.
        means: C x d train class means for the NCC decisions on another split (004 Def. 6); by default
            this data's own means.

    Returns:
        ``nc1, nc1_ratio, nc2_equinorm, nc2_equiangle, nc2_etf, cdnv, ncc_acc, stable_rank`` and the
        optional ones above, as Python floats.

    Raises:
        DegenerateFeaturesError: non-finite features, fewer than 2 classes, or all class means equal
        (constant features), for which the collapse metrics are 0/0.
    """
    h = features.reshape(len(features), -1)
    if len(labels) != len(h):
        raise ValueError(f"features have {len(h)} samples but labels {len(labels)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    if means is not None and means.shape != (num_classes, h.shape[1]):
        raise ValueError(f"means must be {num_classes} x {h.shape[1]}, got {tuple(means.shape)}")
    acc = TapAccumulator(num_classes, h.shape[1], h.device)
    acc.add_pass1(h, labels)
    acc.end_pass1(means)
    acc.add_pass2(h, labels, predictions)
    return acc.result(classifier=classifier, next_weight=next_weight)


def effective_depth(ncc_acc_by_layer: list[float], eps: float) -> int:
    """``L0(eps)``: the smallest 1-based layer index whose train NCC error ``1 - ncc_acc`` is <= eps, or
    L (the number of layers) if none is (000 §3; 003 "minimal NCC depth")."""
    for index, acc in enumerate(ncc_acc_by_layer, start=1):
        if 1.0 - acc <= eps + 1e-12:
            return index
    return len(ncc_acc_by_layer)
