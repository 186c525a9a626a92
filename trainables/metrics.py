"""Neural-collapse metrics of one layer's features: streaming accumulators plus small pure functions.

Definitions and conventions are those of ``docs/science.md`` (metric-definition version
:data:`trainables.config.METRIC_DEFINITIONS_VERSION`). Notation: taps ``h`` of width d, C classes,
``mu_c`` class means, ``mu_G`` the mean of the class means, ``M = [mu_c - mu_G]`` (d x C).

Nothing here builds a d x d matrix for wide taps (a ResNet ``layer1`` tap on CIFAR is 65,536 wide): every
metric needs only per-class counts and sums (pass 1), then, with the means fixed, within-class squared
norms, a C x d projection and NCC decisions (pass 2). All accumulation is in float64.

:func:`layer_metrics` is the notebook API; it runs the same :class:`TapAccumulator` the training loop
streams through, on one chunk, so the two cannot disagree.

References (the short forms "000 §3" etc. in this package name the first four):

- 000: E. Liu 2024, "Leveraging Intermediate Neural Collapse with Simplex ETFs for Efficient Deep Neural
  Networks" (MIT).
- 002: Rangamani, Lindegaard, Galanti & Poggio 2023, "Feature learning in deep classifiers through
  Intermediate Neural Collapse", ICML 2023 (CBMM Memo 141).
- 003: Kothapalli 2023, "Neural Collapse: A Review on Modelling Principles and Generalization", TMLR,
  arXiv:2206.04041.
- 004: Ben-Shaul & Dekel 2022, "Nearest Class-Center Simplification through Intermediate Layers",
  arXiv:2201.08924.
- Papyan, Han & Donoho 2020, "Prevalence of neural collapse during the terminal phase of deep learning
  training", PNAS, arXiv:2008.08186.
- Galanti, Gyorgy & Hutter 2022, "On the Role of Neural Collapse in Transfer Learning", arXiv:2112.15121.
- W. Liu et al. 2023, "Generalizing and Decoupling Neural Collapse via Hyperspherical Uniformity Gap",
  ICLR 2023, arXiv:2303.06484.
- Wu & Papyan 2024, "Linguistic Collapse: Neural Collapse in (Large) Language Models", arXiv:2405.17767.
- Halko, Martinsson & Tropp 2011, "Finding structure with randomness", SIAM Review, arXiv:0909.4061.
"""

from __future__ import annotations

import functools

import torch

# Widest tap whose d x d within-class Gram is accumulated exactly for the stable rank (32 MiB in float64);
# wider taps bracket it from a randomised subspace (see ``TapAccumulator._spectral_bounds``).
GRAM_MAX_WIDTH = 2048
SKETCH_WIDTH = 24
"""Columns of the random start of the wide-tap subspace; pass 1 adds as many power-iterated ones. 24
rather than 32 kept the version-2 ResNet18 metric pass within 15% of version 1's (1.04x against 1.18x
measured with 32) for a flat-spectrum overestimate of +9.6% instead of +8.0% at d = 16,384."""
ERROR_PROBES = 20
"""Fresh Gaussian probes of the a-posteriori bound on ``||H||_2^2`` of wide taps. With the factor
``PROBE_FACTOR * sqrt(2/pi)`` each of its two norm estimates holds with probability at least
``1 - PROBE_FACTOR**-ERROR_PROBES`` (Halko, Martinsson & Tropp 2011, Lemma 4.1): 1 - 3.5e-10."""
PROBE_FACTOR = 3.0
# Cap on one float64 working block, in elements (8 MiB): wide taps stream in row chunks small enough to
# stay in cache, which measured 2x faster on a 65,536-wide tap than 64 MiB blocks.
_BLOCK_ELEMENTS = 1 << 20
# Rows of a wide tap gathered before one product with its d x k subspace: each product rewrites the
# d x k float64 sum (25 MiB at d = 50,176), so doing it per 20-row block made the subspace products
# memory-bound (1.8 s of a 10.7 s ResNet18 pass on 600 samples). 128 float64 rows are the bytes of the
# 256 float32 rows gathered before the products moved to float64.
SUBSPACE_ROWS = 128
_EPS = torch.finfo(torch.float64).eps
# Singular values of a layer weight this close (relative to the largest) to the (C-1)-th one are tied with
# it: their singular vectors are interchangeable, so all of them belong to nc3_alignment's subspace.
_TIE_RTOL = _EPS**0.5


PROBE_WIDTH = 1024
"""Taps wider than this are probed through a fixed Gaussian projection to this many dimensions, so the
probe's Gram stays 8 MiB in float64 (random projections keep class separability up to a small distortion:
Johnson & Lindenstrauss 1984)."""
PROBE_RIDGE = 1e-3
"""Ridge penalty of the linear probe, relative to the mean eigenvalue of the centred train Gram: small
enough not to bias a separable tap, large enough to keep a rank-deficient Gram (d > N, dead units)
solvable."""


class DegenerateFeaturesError(ValueError):
    """The features admit no defined value of the metrics (message says why)."""


def ones_complement(c: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An orthonormal C x (C-1) basis of the vectors orthogonal to the all-ones vector (Helmert's).

    The centred means satisfy ``M 1 = 0`` exactly, so ``M = (M Q) Q^T`` and M's nonzero singular values are
    those of ``M Q``: working with ``M Q`` removes the structural zero singular value by construction,
    instead of by a threshold that the rounding of a large global mean could cross.
    """
    j = torch.arange(1, c, dtype=torch.float64, device=device)
    q = torch.zeros(c, c - 1, dtype=torch.float64, device=device)
    rows = torch.arange(c, device=device)[:, None]
    q += torch.where(rows < j[None].long(), 1.0, 0.0) / torch.sqrt(j * (j + 1))
    q[j.long(), j.long() - 1] = -j / torch.sqrt(j * (j + 1))
    return q


def resolved_range(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, keep)``: the left-singular vectors and values of the centred means M (d x C, any leading
    batch dimensions), and which of them float64 resolves.

    A singular value is kept when it exceeds ``max(d, C) * eps_float64 * sigma_max``, numpy's
    ``matrix_rank`` rule (docs/science.md, definition version 2): every direction above rounding is kept,
    however small, so no between-class direction is dropped to make nc1 look collapsed.
    """
    d, c = M.shape[-2:]
    u, s, _ = torch.linalg.svd(M @ ones_complement(c, M.device), full_matrices=False)
    keep = (s > max(d, c) * _EPS * s[..., :1]) & (s > 0)
    return u, s, keep


class TapAccumulator:
    """Two-pass streaming statistics of one layer's features on one split, for one model or a stack.

    Pass 1 (:meth:`add_pass1`) accumulates class counts and sums; :meth:`end_pass1` fixes the class means.
    Pass 2 (:meth:`add_pass2`) accumulates, around those means, within-class squared norms per class,
    the projected scatter ``sum_i ||M^+ (h_i - mu_{y_i})||^2`` (nc1, docs/science.md "Computing them at
    scale"), the spectral statistics for the stable rank, and NCC decisions against ``ncc_means``
    (the **train** means, Rangamani et al. 2023, Def. 6; this split's own means when none are given).

    ``members``: the features of that many models of one architecture on the same samples (a trial
    bundle) arrive stacked, ``members x N x ...``, and every statistic carries a leading member axis, so
    the whole stack costs the launches of one model (small models are launch-bound on a GPU). A member
    whose features are degenerate is recorded in :attr:`degenerate` and left out of :meth:`result`; the
    others are unaffected. Without ``members`` (one model, ``N x ...``) degenerate features raise.

    ``probe``: ``"fit"`` fits the linear probe on this split (the train metric subset) and scores it here;
    ``"score"`` scores the probe :meth:`end_pass1` is given (another split). See :func:`probe_fit`.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        device: torch.device | str = "cpu",
        members: int | None = None,
        probe: str | None = None,
    ) -> None:
        if num_classes < 2:
            raise DegenerateFeaturesError(f"need at least 2 classes, got num_classes={num_classes}")
        if probe not in (None, "fit", "score"):
            raise ValueError(f"probe must be None, 'fit' or 'score', got {probe!r}")
        self.num_classes = num_classes
        self.dim = dim
        self.device = torch.device(device)
        self.members = members
        self.probe = probe
        self.wide = dim > GRAM_MAX_WIDTH
        f64 = dict(dtype=torch.float64, device=self.device)
        m = members or 1
        self.counts = torch.zeros(num_classes, **f64)  # members see the same samples
        self.sums = torch.zeros(m, num_classes, dim, **f64)
        self.degenerate: dict[int, str] = {}
        if self.wide:
            # Pass 1 applies a shifted scatter to a random start (one power iteration, Halko et al. 2011
            # Alg. 4.3) so pass 2 can apply the exact within-class scatter to a subspace that already
            # leans towards its top directions. Each row is shifted by the first sample of its class,
            # so the float32 products see the within-class spread, not the class means: with one shift
            # for all classes, means 39 times the spread (the regime collapse studies live in) left the
            # power columns mostly rounding noise of the between-class scatter.
            self.start = _gaussian(dim, min(SKETCH_WIDTH, dim), 0, self.device)
            self.power = torch.zeros(m, dim, self.start.shape[1], **f64)
            self.shift = torch.zeros(m, num_classes, dim, dtype=torch.float32, device=self.device)
            self.shift_set = torch.zeros(num_classes, dtype=torch.bool, device=self.device)
        if probe is not None:
            self.probe_map = _probe_projection(dim, self.device)
            width = dim if self.probe_map is None else PROBE_WIDTH
            self.probe_gram = torch.zeros(m, width, width, **f64) if probe == "fit" else None
        self._pass = 1

    def _stacked(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """``t`` with the member axis: a lone model's tensors get one of size 1."""
        return t if t is None or self.members is not None else t.unsqueeze(0)

    def _rows(self, features: torch.Tensor) -> torch.Tensor:
        """members x N x d."""
        h = self._stacked(features)
        return h.reshape(h.shape[0], h.shape[1], -1)

    def _probe_features(self, block: torch.Tensor) -> torch.Tensor:
        return block if self.probe_map is None else block @ self.probe_map

    # ---- pass 1 -------------------------------------------------------------------------------------
    def add_pass1(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        assert self._pass == 1, "pass 1 already ended"
        h = self._rows(features)
        step = self._rows_per_block()
        rows = _RowBuffer(self._power_step)
        for lo in range(0, h.shape[1], step):
            block = h[:, lo : lo + step].to(torch.float64)
            yb = labels[lo : lo + block.shape[1]]
            self.sums.index_add_(1, yb, block)
            self.counts += torch.bincount(yb, minlength=self.num_classes).to(torch.float64)
            if self.wide:
                self._set_shifts(block, yb)
                rows.add((block - self.shift.index_select(1, yb)).float())
            if self.probe == "fit":
                x = self._probe_features(block)
                self.probe_gram += x.mT @ x
        rows.flush()

    def _set_shifts(self, block: torch.Tensor, labels: torch.Tensor) -> None:
        """The shift of each class not seen before this block: its first row here."""
        first = torch.full((self.num_classes,), len(labels), device=self.device)
        first.scatter_reduce_(0, labels, torch.arange(len(labels), device=self.device), "amin")
        new = (first < len(labels)) & ~self.shift_set
        self.shift[:, new] = block[:, first[new]].float()
        self.shift_set |= new

    def _power_step(self, shifted: torch.Tensor) -> None:
        self.power += shifted.mT @ (shifted @ self.start)

    def _subspace_step(self, diff32: torch.Tensor) -> None:
        self.applied += diff32.mT @ (diff32 @ self.targets)

    def end_pass1(
        self, ncc_means: torch.Tensor | None = None, probe: tuple[torch.Tensor, ...] | None = None
    ) -> torch.Tensor:
        """Fix this split's class means; return them (C x d, or members x C x d; rows of absent classes
        are zero). ``ncc_means``: the train means for NCC decisions, in the same shape; ``probe``: the
        train split's :attr:`probe_weights`, for ``probe="score"``."""
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
        # decomposition fails on NaN); zero means make its M zero, and it is left out of the result.
        mu = torch.where(finite[:, None, None], self.means[:, present], 0.0)  # m x C' x d
        self.M = (mu - mu.mean(1, keepdim=True)).mT  # m x d x C'
        self._mark_degenerate(finite)
        self._fix_pinv()
        self._fix_ncc(mu, ncc_means)
        if self.probe == "fit":
            self.probe_weights = probe_fit(self.probe_gram, self.sums, self.counts, self.probe_map)
        elif self.probe == "score":
            if probe is None:
                raise ValueError("probe='score' needs the fitted probe of the train split")
            self.probe_weights = probe
        self._start_pass2()
        return self.means if self.members is not None else self.means[0]

    def _mark_degenerate(self, finite: torch.Tensor) -> None:
        coincide = finite & ((self.M**2).sum((1, 2)) <= 0)
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

    def _fix_pinv(self) -> None:
        """``||M^+ x|| = ||S^-1 U^T x||`` for ``M Q = U S V^T`` (Q: :func:`ones_complement`), since
        ``M^+ = Q V S^-1 U^T`` and Q V has orthonormal columns; unresolved directions get weight 0 (not
        dropped, so members stack)."""
        u, s, keep = resolved_range(self.M)
        self.range_basis = u * keep[:, None, :]  # orthonormal basis of range(M), zero-padded
        self.M_pinv = (u * torch.where(keep, 1.0 / s, 0.0)[:, None, :]).mT  # m x k x d
        smallest = torch.where(keep, s, torch.inf).amin(-1)
        self.cond = torch.where(keep.any(-1), s[:, 0] / smallest, torch.inf)

    def _fix_ncc(self, mu: torch.Tensor, ncc_means: torch.Tensor | None) -> None:
        if ncc_means is None:
            self.ncc_means, self.ncc_classes = mu, torch.nonzero(self.present).flatten()
        else:
            self.ncc_means = self._stacked(ncc_means).to(device=self.device, dtype=torch.float64)
            self.ncc_classes = torch.arange(self.ncc_means.shape[1], device=self.device)
        self.ncc_sq_norms = (self.ncc_means**2).sum(-1)  # m x C
        # 2 mu_c^T, so pass 2 scales C x d numbers rather than N x d (exact: a power-of-two factor).
        self.ncc_means_2t = 2.0 * self.ncc_means.mT

    def _start_pass2(self) -> None:
        m = self.sums.shape[0]
        f64 = dict(dtype=torch.float64, device=self.device)
        self.within_sq = torch.zeros(m, self.num_classes, **f64)  # sum ||h - mu_y||^2 per class
        self.projected_sq = torch.zeros(m, **f64)
        self.ncc_correct = torch.zeros(m, **f64)
        self.ncc_mismatch = torch.zeros(m, **f64)
        self.probe_correct = torch.zeros(m, **f64)
        self.has_predictions = False
        if not self.wide:
            self.within_gram = torch.zeros(m, self.dim, self.dim, **f64)
        else:
            # S Omega = sum (h-s_y)(h-s_y)^T Omega - sum_c N_c (mu_c-s_c)(mu_c-s_c)^T Omega, then the
            # subspace [Omega, orth(S Omega)], orthonormalised, is what pass 2 applies the exact S to.
            centre = torch.where(self.ok[:, None, None], self.means - self.shift.double(), 0.0)
            power = self.power - centre.mT @ (self.counts[:, None] * (centre @ self.start.double()))
            power = torch.where(self.ok[:, None, None], power, 0.0)
            start = self.start.double().expand(m, -1, -1)
            # float64: the bounds of _spectral_bounds take Q as orthonormal to rounding (a float32 basis
            # is orthonormal to ~1e-7 only, more than the bounds' own error terms).
            self.subspace = torch.linalg.qr(torch.cat([start, power], -1)).Q  # m x d x 2k
            del self.power, self.start, self.shift  # pass 1's share, no longer needed
            # Error probes live in the complement of the subspace (P Psi, P = I - QQ^T), so S P Psi
            # gives both the coupling Q^T S P and the rest P S P of S (see _spectral_bounds).
            psi = _gaussian(self.dim, ERROR_PROBES, 1, self.device).double()
            q = self.subspace
            error_probes = psi - q @ (q.mT @ psi)  # m x d x r
            self.targets = torch.cat([q, error_probes], -1)  # one product for both
            self.applied = torch.zeros(m, self.dim, self.targets.shape[-1], **f64)  # S [Q, P Psi]
        self._pass = 2

    # ---- pass 2 -------------------------------------------------------------------------------------
    def add_pass2(
        self, features: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor | None = None
    ) -> None:
        """``predictions``: the network's predicted labels (N, or members x N)."""
        assert self._pass == 2, "call end_pass1 first"
        h = self._rows(features)
        predictions = self._stacked(predictions)
        step = self._rows_per_block()
        rows = _RowBuffer(self._subspace_step)
        for lo in range(0, h.shape[1], step):
            block = h[:, lo : lo + step].to(torch.float64)
            yb = labels[lo : lo + block.shape[1]]
            diff = self.means.index_select(1, yb)
            torch.sub(block, diff, out=diff)  # in the gathered means' memory: one N x d buffer, not two
            self.within_sq.index_add_(1, yb, torch.linalg.vector_norm(diff, dim=-1) ** 2)
            if not self.wide:
                self.within_gram.baddbmm_(diff.mT, diff)  # nc1's projection is read off it (see result)
            else:
                self.projected_sq += ((diff @ self.M_pinv.mT) ** 2).sum((1, 2))
                # float64, not float32: the lower bound on ||H||_2^2 divides by Rayleigh quotients of
                # directions S barely moves, and float32 rounding there (1e-7 of ||S||) read as a
                # direction 7% stronger than S's top one (see _spectral_bounds).
                rows.add(diff)  # a fresh tensor each block (index_select), safe to keep
            # argmin_c ||h - mu_c||^2 = argmin_c (||mu_c||^2 - 2 h.mu_c); ||h||^2 is common to all c.
            dist = self.ncc_sq_norms[:, None, :] - block @ self.ncc_means_2t
            ncc = self.ncc_classes[dist.argmin(-1)]
            self.ncc_correct += (ncc == yb).sum(-1)
            if predictions is not None:
                self.has_predictions = True
                self.ncc_mismatch += (ncc != predictions[:, lo : lo + block.shape[1]]).sum(-1)
            if self.probe is not None:
                weights, bias = self.probe_weights
                scores = self._probe_features(block) @ weights + bias[:, None, :]
                self.probe_correct += (scores.argmax(-1) == yb).sum(-1)
        rows.flush()

    # ---- results ------------------------------------------------------------------------------------
    def result(
        self,
        classifier: torch.Tensor | None = None,
        next_weight: torch.Tensor | None = None,
        next_weight_svd: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, float] | list[dict[str, float] | None]:
        """All metrics of docs/science.md's tables that the given inputs define: a dict, or with ``members`` a
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
        if not self.wide:
            # sum_i ||M^+ d_i||^2 = Tr(M^+ G M^+T) with G = sum_i d_i d_i^T the within-class Gram, exact:
            # a C x d x d product instead of an N x d x C one.
            self.projected_sq = ((self.M_pinv @ self.within_gram) * self.M_pinv).sum((1, 2))
        # Within-class spread below float64 rounding of the means (relative 1e-10 in norm) is no
        # spread: its "stable rank" would be that of rounding noise. Collapsed features report 0.
        spread = tr_w > 1e-20 * tr_t
        lower, upper = self._spectral_bounds()
        out = {
            "nc1": self.projected_sq / n,
            "nc1_cond": self.cond,
            "nc1_ratio": tr_w / tr_t,
            **nc2_metrics(self.M),
            **gnc2_metrics(self.M),
            "cdnv": cdnv(means, within_sq / counts),
            "ncc_acc": self.ncc_correct / n,
            "stable_rank": torch.where(spread, within_sq.sum(-1) / lower, 0.0),
        }
        if self.wide:
            out["stable_rank_min"] = torch.where(spread, within_sq.sum(-1) / upper, 0.0)
        if self.has_predictions:
            out["ncc_mismatch"] = self.ncc_mismatch / n
        if self.probe is not None:
            out["probe_acc"] = self.probe_correct / n
        if classifier is not None:
            weight = self._stacked(classifier).to(self.device, torch.float64)[:, present]
            out["nc3"] = nc3(weight, self.M)
            out["unc3"] = unc3(weight, self.M)
            out.update({f"nc2w_{k}": v for k, v in equinorm_equiangle(weight.mT).items()})
        if next_weight is not None:
            if next_weight_svd is None:
                next_weight_svd = weight_svd(self._stacked(next_weight), members=True)
            else:
                next_weight_svd = tuple(self._stacked(t) for t in next_weight_svd)
            sv, vh = (t.to(self.device) for t in next_weight_svd)
            out["nc3_alignment"] = nc3_alignment(self.M, sv=sv, vh=vh)
            out["weight_stable_rank"] = (sv**2).sum(-1) / sv[:, 0] ** 2  # ||W||_F^2 / ||W||_2^2 (002 §4)
        names = list(out)
        rows = torch.stack([out[k].to(torch.float64) for k in names], 1).tolist()  # one host sync
        values = [None if i in self.degenerate else dict(zip(names, row)) for i, row in enumerate(rows)]
        return values if self.members is not None else values[0]

    def _spectral_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lower, upper)`` on ``||H||_2^2 = lambda_max(S)``, S = H^T H for the within-class-centred
        features H (N x d), per member.

        Taps up to GRAM_MAX_WIDTH: exact from the d x d Gram (lower = upper). Wider taps: with Q the
        orthonormal subspace pass 2 applied S to (``applied = S Q + E``, E its rounding, at most
        :meth:`_product_error` in norm) and ``probed = S Psi`` for fresh Gaussian probes Psi,

        - lower: the larger of two Rayleigh quotients of S, each evaluated with E counted against it, so
          no rounding can lift it above lambda_max (tight when a few directions dominate, as in
          collapsing features). On span(Q), for the top Ritz vector x (unit):
          ``(Qx)^T S Qx / ||Qx||^2 >= (x^T Q^T applied x - e) / ||Qx||^2``. On span(S Q), the vector
          ``S^1/2 Q x`` has quotient ``||S Q x||^2 / x^T Q^T S Q x >= (||applied x|| - e)^2 /
          (x^T Q^T applied x + e)``, evaluated at the generalised eigenvectors of
          ``(applied^T applied, Q^T applied)``. Without the ``e`` terms, directions of span(Q) that S
          barely moves (a flat spectrum's power columns are its range, so ``Omega - S Omega`` lies in
          its null space) had rounding divided by rounding, and lower read 7% above lambda_max;
        - upper: in the blocks of S along Q and its complement P = I - QQ^T, ``A = Q^T S Q``,
          ``B = Q^T S P``, ``D = P S P``, ``lambda_max(S)`` is at most the largest eigenvalue of the 2 x 2
          matrix ``[[||A||, b], [b, delta]]`` for any ``b >= ||B||``, ``delta >= ||D||``. ``||A||`` is
          exact to ``e``; ``b`` and ``delta`` are ``PROBE_FACTOR sqrt(2/pi) max_i ||X P psi_i||`` for X = B
          and D, bounds that each hold with probability at least ``1 - PROBE_FACTOR^-ERROR_PROBES``
          (Halko, Martinsson & Tropp 2011, Lemma 4.1); never above Tr(S).

        So the reported ``stable_rank = Tr(S) / lower`` is never below the true one (a sketch can only
        miss collapse, never invent it) and ``stable_rank_min = Tr(S) / upper`` bounds it from below; the
        bracket is tight for low-rank and fast-decaying spectra and wide for flat ones (tested over
        spectra, mean-to-spread ratios, widths and sample counts in tests/test_metrics.py).
        """
        ok = self.ok[:, None, None]  # a degenerate member's NaN must not fail the batched eigensolver
        if not self.wide:
            top = torch.linalg.eigvalsh(torch.where(ok, self.within_gram, 0.0))[:, -1]
            return top, top
        q = self.subspace
        k = q.shape[-1]
        applied = torch.where(ok, self.applied[..., :k], 0.0)
        e = self._product_error(k)
        a = q.mT @ applied  # Q^T S Q + Q^T E
        a = (a + a.mT) / 2
        evals, evecs = torch.linalg.eigh(a)
        top = evecs[..., -1:]  # the top Ritz vector, in Q's coordinates
        top_norm = (torch.linalg.vector_norm(q @ top, dim=1) ** 2).squeeze(-1)
        on_q = (_quadratic(a, top).squeeze(-1) - e) / top_norm
        # Candidates on span(S Q): the generalised eigenvectors of (applied^T applied, a), through a
        # whitening that leaves out directions a cannot tell from rounding (their quotient is noise;
        # the e terms below would discard them anyway).
        keep = evals > e[:, None]
        whiten = evecs * torch.where(keep, evals, 1.0).rsqrt().where(keep, 0.0)[:, None, :]
        _, gen = torch.linalg.eigh(whiten.mT @ (applied.mT @ applied) @ whiten)
        x = whiten @ gen
        x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        moved = (torch.linalg.vector_norm(applied @ x, dim=1) - e[:, None]).clamp_min(0) ** 2
        on_sq = (moved / (_quadratic(a, x) + e[:, None]).clamp_min(torch.finfo(x.dtype).tiny)).amax(-1)
        lower = torch.maximum(on_q, on_sq).clamp_min(0)
        probed = torch.where(ok, self.applied[..., k:], 0.0)  # S P Psi
        coupling = q.mT @ probed  # B Psi
        rest = probed - q @ coupling  # D Psi
        factor = PROBE_FACTOR * (2 / torch.pi) ** 0.5
        b = factor * torch.linalg.vector_norm(coupling, dim=1).amax(-1)
        delta = factor * torch.linalg.vector_norm(rest, dim=1).amax(-1)
        norm_a = evals[:, -1] + e
        upper = (norm_a + delta) / 2 + torch.sqrt(((norm_a - delta) / 2) ** 2 + b**2)
        return lower, torch.minimum(upper, self.within_sq.sum(-1)).clamp_min(lower)

    def _product_error(self, k: int) -> torch.Tensor:
        """A bound on ``||E||_2`` for ``applied[..., :k] = S Q + E``, per member.

        ``applied`` sums ``D_b^T (D_b Q)`` over row blocks D_b of the differences, in float64. For any
        summation order ``||fl(XY) - XY||_F <= gamma_n ||X||_F ||Y||_F`` with ``gamma_n = n u / (1 - n u)``
        for inner dimension n (Higham 2002, "Accuracy and Stability of Numerical Algorithms", §3.5), so
        with d for ``D_b Q``, at most N rows per block and at most N blocks, and ``||Q||_F = sqrt(k)``:
        ``||E|| <= (gamma_d + 2 gamma_N) sqrt(k) sum_b ||D_b||_F^2 = (gamma_d + 2 gamma_N) sqrt(k) Tr(S)``,
        doubled for the second-order terms and the small products that follow. Relative to
        lambda_max it is at most ``(d + 2N) u sqrt(k) * stable rank``: 7e-7 at d = 65,536, N = 10,000 and
        a stable rank of N, whatever the CPU's or GPU's summation order.
        """
        n = float(self.counts.sum())
        gamma = sum(m * _EPS / 2 / (1 - m * _EPS / 2) for m in (self.dim, n, n))
        return 2 * gamma * k**0.5 * self.within_sq.sum(-1)

    def _rows_per_block(self) -> int:
        if self.device.type != "cpu":
            return 1 << 62  # no cache to fit: one launch per statistic (the caller bounds the batch)
        return max(1, _BLOCK_ELEMENTS // max(1, self.dim * self.sums.shape[0]))


class _RowBuffer:
    """Gathers row blocks (members x rows x d) and hands ``step`` about SUBSPACE_ROWS rows at a time."""

    def __init__(self, step) -> None:
        self.step, self.blocks, self.rows = step, [], 0

    def add(self, block: torch.Tensor) -> None:
        self.blocks.append(block)
        self.rows += block.shape[1]
        if self.rows >= SUBSPACE_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.blocks:
            self.step(torch.cat(self.blocks, 1) if len(self.blocks) > 1 else self.blocks[0])
            self.blocks, self.rows = [], 0


def _quadratic(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x_j^T a x_j`` for each column j of x (leading batch dimensions shared)."""
    return (x * (a @ x)).sum(-2)


@functools.lru_cache(maxsize=64)
def _gaussian(rows: int, cols: int, seed: int, device: torch.device) -> torch.Tensor:
    """A fixed float32 Gaussian matrix, drawn once per shape and device (every epoch, tap and split of a
    trial reuses it; drawing a 50,176 x 32 one took 20 ms)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(rows, cols, generator=gen).to(device)


def _probe_projection(dim: int, device: torch.device) -> torch.Tensor | None:
    """The fixed Gaussian map of taps wider than PROBE_WIDTH (None: the tap is probed as it is)."""
    if dim <= PROBE_WIDTH:
        return None
    return _gaussian(dim, PROBE_WIDTH, 2, torch.device(device)).double() / PROBE_WIDTH**0.5


def probe_fit(
    gram: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, projection: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression of one-hot labels on a tap's (projected) features, with intercept.

    ``gram``: members x p x p, ``sum_i x_i x_i^T``; ``sums``: the class sums of the unprojected features
    (members x C x d); ``counts``: C. Returns ``(weights, bias)`` (members x p x C, members x C); a sample
    is classified by ``argmax(x^T weights + bias)``. With centred ``X`` and ``Y``:
    ``weights = (X^T X + lambda I)^-1 X^T Y``, ``lambda = PROBE_RIDGE * Tr(X^T X) / p`` (Hoerl & Kennard
    1970). Classes without train samples can never be predicted.
    """
    n = counts.sum()
    class_sums = sums if projection is None else sums @ projection  # m x C x p
    mean_x = class_sums.sum(1) / n  # m x p
    mean_y = counts / n
    centred = gram - n * mean_x[:, :, None] * mean_x[:, None, :]
    cross = class_sums.mT - n * mean_x[:, :, None] * mean_y[None, None, :]  # X^T Y centred: m x p x C
    p = gram.shape[-1]
    ridge = PROBE_RIDGE * torch.diagonal(centred, dim1=-2, dim2=-1).sum(-1) / p
    eye = torch.eye(p, dtype=gram.dtype, device=gram.device)
    system = centred + (ridge.clamp_min(torch.finfo(gram.dtype).tiny))[:, None, None] * eye
    finite = torch.isfinite(system).flatten(1).all(1)
    system = torch.where(finite[:, None, None], system, eye)
    weights = torch.linalg.solve(system, torch.where(finite[:, None, None], cross, 0.0))
    bias = mean_y - (mean_x[:, None, :] @ weights)[:, 0]
    bias = torch.where(counts > 0, bias, -torch.inf)
    return weights, bias


# ---- pure functions of the centred class means (any leading batch dimensions) ------------------------
def equinorm_equiangle(X: torch.Tensor) -> dict[str, torch.Tensor]:
    """Equinorm and equiangularity of the C columns of X (d x C, any leading batch dimensions).

    - ``equinorm = std_c ||X_c|| / mean_c ||X_c||`` (population std; Papyan, Han & Donoho 2020,
      arXiv:2008.08186, Fig. 2 and 6; Kothapalli 2023 §3 NC2).
    - ``equiangle = mean_{c != c'} |cos(X_c, X_c') + 1/(C-1)|`` (Papyan et al. 2020, Fig. 3).
    """
    c = X.shape[-1]
    norms = X.norm(dim=-2)
    cos = (X.mT @ X) / (norms[..., :, None] * norms[..., None, :])
    off = ~torch.eye(c, dtype=torch.bool, device=X.device)
    return {
        "equinorm": norms.std(dim=-1, correction=0) / norms.mean(-1),
        "equiangle": (cos[..., off] + 1.0 / (c - 1)).abs().mean(-1),
    }


def nc2_metrics(M: torch.Tensor) -> dict[str, torch.Tensor]:
    """Equinorm and equiangularity (:func:`equinorm_equiangle`) of the centred means M (d x C), and their
    distance to a simplex ETF, ``nc2_etf = || M^T M/||M^T M||_F - (I - 11^T/C)/||I - 11^T/C||_F ||_F``
    (Papyan et al. 2020; Rangamani et al. 2023, §4)."""
    c = M.shape[-1]
    gram = M.mT @ M
    etf = torch.eye(c, dtype=M.dtype, device=M.device) - 1.0 / c
    fro = torch.linalg.matrix_norm(gram)[..., None, None]
    return {
        **{f"nc2_{k}": v for k, v in equinorm_equiangle(M).items()},
        "nc2_etf": torch.linalg.matrix_norm(gram / fro - etf / etf.norm()),
    }


def gnc2_metrics(M: torch.Tensor) -> dict[str, torch.Tensor]:
    """Hyperspherical uniformity of the normalised centred means ``x_c = M_c / ||M_c||`` (Liu et al. 2023,
    "Generalizing and Decoupling Neural Collapse via Hyperspherical Uniformity Gap", arXiv:2303.06484):

    - ``gnc2_energy = mean_{c != c'} log(1 / ||x_c - x_c'||)``, the log-kernel energy; a simplex ETF
      attains its minimum, ``-log sqrt(2C/(C-1))``;
    - ``gnc2_spread``: the population std of the same pairwise terms (0 when equidistant).

    Distances come from the cosines, ``||x_c - x_c'||^2 = 2 - 2 cos``; two coinciding directions give
    +inf for both (as cdnv does for coinciding means). Any leading batch dimensions.
    """
    c = M.shape[-1]
    x = M / M.norm(dim=-2, keepdim=True)
    i, j = torch.triu_indices(c, c, offset=1, device=M.device)
    cos = (x.mT @ x)[..., i, j]
    energy = -0.5 * torch.log((2.0 - 2.0 * cos).clamp_min(0.0))
    # The mean over ordered pairs c != c' equals the mean over unordered ones: the kernel is symmetric.
    mean = energy.mean(-1)
    spread = torch.where(torch.isfinite(mean), energy.std(-1, correction=0), torch.inf)
    return {"gnc2_energy": mean, "gnc2_spread": spread}


def unc3(classifier: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Uniform duality: the population variance over classes of ``cos(w_c, mu_c - mu_G)``, W the C x d
    classifier that reads the features (Wu & Papyan 2024, "Linguistic Collapse", arXiv:2405.17767). 0 when
    every class mean makes the same angle with its classifier row."""
    cos = (classifier * M.mT).sum(-1) / (classifier.norm(dim=-1) * M.norm(dim=-2))
    return cos.var(dim=-1, correction=0)


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
    M: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    sv: torch.Tensor | None = None,
    vh: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cosine of the principal angles between range(M) and the top-(C-1) right-singular subspace of
    the weight W (out x d) that consumes these features (Rangamani et al. 2023, §4 and App. A; definition
    version 2). 1 means fully aligned.

    - range(M): M's left-singular vectors that float64 resolves (:func:`resolved_range`); rank C-1 for
      C classes in general position (the centred means sum to 0), less when d < C-1.
    - W's subspace: its right-singular vectors with singular values at least sigma_{C-1}(W) (ties within
      ``sqrt(eps) * sigma_max`` count as equal, since their vectors are interchangeable; a weight with
      fewer than C-1 resolved singular values gives its whole row space). C-1, not C: an ETF classifier
      has rank C-1, so a C-th singular vector would be an arbitrary direction of its null space.

    The number of angles is the smaller of the two dimensions. ``sv, vh``: W's singular values and
    right-singular vectors when already computed (then ``weight`` may be None). Any leading batch
    dimensions.
    """
    if vh is None:
        _, sv, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    u, _, keep = resolved_range(M)
    q_m = u * keep[..., None, :]  # an orthonormal basis of range(M), padded with zero columns
    top = sv[..., :1]
    resolved = sv > max(vh.shape[-2:]) * _EPS * top
    k = min(M.shape[-1] - 1, sv.shape[-1])
    cut = sv[..., k - 1 : k]
    in_subspace = resolved & (sv >= cut - _TIE_RTOL * top)
    v_w = vh.mT * in_subspace[..., None, :]
    # The zero columns add zero singular values after the min(rank, dim) cosines (svdvals sorts them).
    cosines = torch.linalg.svdvals(q_m.mT @ v_w).clamp(max=1.0)
    angles = torch.minimum(keep.sum(-1), in_subspace.sum(-1)).clamp_min(1)
    first = torch.arange(cosines.shape[-1], device=M.device) < angles[..., None]
    return (cosines * first).sum(-1) / angles


def layer_metrics(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    predictions: torch.Tensor | None = None,
    classifier: torch.Tensor | None = None,
    next_weight: torch.Tensor | None = None,
    means: torch.Tensor | None = None,
    probe: bool = False,
) -> dict[str, float]:
    """Every neural-collapse metric of one layer's features (docs/science.md, "Metrics, per layer").

    Args:
        features: N samples of any shape; each is flattened to a vector.
        labels: N integer labels in ``[0, num_classes)``.
        num_classes: C. Classes without samples are left out of every metric (the others are still
            defined); fewer than 2 classes present is an error.
        predictions: the network's N predicted labels; adds ``ncc_mismatch`` (NC4, 004 Def. 5/6).
        classifier: the C x d last-layer weight; adds ``nc3`` (000 §2.3).
        next_weight: the weight (out x d) of the layer that consumes these features; adds
            ``nc3_alignment`` (002 App. A) and its ``weight_stable_rank``.
        means: C x d train class means for the NCC decisions on another split (Rangamani et al. 2023,
            Def. 6); by default this data's own means.
        probe: adds ``probe_acc``, a ridge probe (:func:`probe_fit`) fit and scored on these features.

    Returns:
        ``nc1, nc1_cond, nc1_ratio, nc2_equinorm, nc2_equiangle, nc2_etf, gnc2_energy, gnc2_spread, cdnv,
        ncc_acc, stable_rank`` (and ``stable_rank_min`` for taps wider than GRAM_MAX_WIDTH), plus with
        ``classifier`` ``nc3, unc3, nc2w_equinorm, nc2w_equiangle``, with ``next_weight``
        ``nc3_alignment, weight_stable_rank``, as Python floats.

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
    acc = TapAccumulator(num_classes, h.shape[1], h.device, probe="fit" if probe else None)
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
