"""Closed-form ground truths, written independently of the flow code.

The problems and their derivations: docs, Theory › Closed-form ground truths (§5).
Used as oracles by the tests and by `gradflow verify`.
"""

import numpy as np


def product_flow_time(w0, w, y, order):
    """§5.1: time for the balanced deep scalar product to go from w0 to w (0<w0<w<y).

    t = ∫ du / (N u^{2-2/N} (y-u)), by Gauss-Legendre on u = exp(s) (the integrand
    is smooth in s), accurate to ~1e-13 relative for the ranges used in tests.
    """
    n = order
    nodes, weights = np.polynomial.legendre.leggauss(200)
    a, b = np.log(w0), np.log(w)
    s = 0.5 * (b - a) * nodes + 0.5 * (b + a)
    u = np.exp(s)
    integrand = u / (n * u ** (2 - 2 / n) * (y - u))
    return 0.5 * (b - a) * np.sum(weights * integrand)


def logistic(t, w0, y):
    """§5.1, N = 2: w(t) = y / (1 + (y/w0 - 1) e^{-2yt})."""
    return y / (1 + (y / w0 - 1) * np.exp(-2 * y * t))


def constant_gamma_hitting_time(p0, rho, gamma, order):
    """§5.4: time for dP/dt = Nγ P^{2-2/N} to go from p0 to rho (N >= 3)."""
    e = (order - 2) / order
    return (p0**-e - rho**-e) / ((order - 2) * gamma)


def constant_gamma_norm(t, p0, gamma, order):
    """§5.4: P(t) for constant γ (N >= 3)."""
    e = (order - 2) / order
    return (p0**-e - (order - 2) * gamma * t) ** (-1 / e)
