"""Client curvature: GGN / Fisher products from per-sample output functions, and low-rank eigensolvers."""

from fipa.curvature.eigen import LowRankCurvature, randomized_eigenpairs, top_eigenpairs_from_rows
from fipa.curvature.ggn import (
    ESTIMATORS,
    LOSSES,
    CurvatureGroup,
    curvature_diagonal,
    curvature_matvec,
    factor_rows,
    flatten_params,
    output_factors,
    subsample_groups,
    unflatten_like,
)

__all__ = [
    "ESTIMATORS",
    "LOSSES",
    "CurvatureGroup",
    "LowRankCurvature",
    "curvature_diagonal",
    "curvature_matvec",
    "factor_rows",
    "flatten_params",
    "output_factors",
    "randomized_eigenpairs",
    "subsample_groups",
    "top_eigenpairs_from_rows",
    "unflatten_like",
]
