"""Exact Gaussian-mixture targets for the sampler benchmark (ARCHITECTURE.md §7.1); diffkit.analytic gives their
exact denoisers."""
from __future__ import annotations

import numpy as np
import torch

from diffkit import analytic, data


def ring() -> analytic.GaussianMixture:
    """8 modes on a radius-4 circle with random anisotropic covariances (std 0.05-0.3)."""
    return analytic.ring()


def digits64(components: int = 10, seed: int = 0) -> analytic.GaussianMixture:
    """A 64-D mixture fitted (EM, full covariances, 1e-3 ridge) to sklearn's digits in [-1, 1]."""
    from sklearn.mixture import GaussianMixture as SkGMM

    x, _ = data.digits("all")
    fit = SkGMM(components, covariance_type="full", reg_covar=1e-3, random_state=seed).fit(x.reshape(len(x), -1).double().numpy())
    covs = 0.5 * (fit.covariances_ + np.transpose(fit.covariances_, (0, 2, 1)))
    return analytic.GaussianMixture(torch.from_numpy(fit.means_), torch.from_numpy(covs), torch.from_numpy(fit.weights_ / fit.weights_.sum()))


TARGETS = {"ring2d": ring, "digits64": digits64}
