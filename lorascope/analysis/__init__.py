"""The analyses of Hu et al. 2021 §7 (and what to do with them), over one module or a whole
adapter: spectra, subspace similarity, projections/amplification, rank choice and truncation,
intruder dimensions (Shuttleworth et al. 2024) and N-adapter comparison.

Kernels live in :mod:`lorascope.linalg`; these functions walk adapters and return tidy results
with ``to_dict()`` (the CLI's JSON contract).
"""

from lorascope.analysis.compare import CompareResult, SettleResult, compare, settle
from lorascope.analysis.intruders import (
    IntruderResult,
    SVDCache,
    intruders,
    module_intruders,
)
from lorascope.analysis.projection import ProjectionResult, amplify, module_amplification
from lorascope.analysis.rank import (
    RankResult,
    RankRule,
    ResizeResult,
    module_rank,
    module_resize,
    rank,
    resize,
    suggest_ranks,
)
from lorascope.analysis.similarity import (
    SimilarityResult,
    module_similarity,
    similarity,
    subspace_basis,
    weight_similarity,
)
from lorascope.analysis.spectrum import SpectrumResult, module_spectrum, spectrum

__all__ = [
    "CompareResult",
    "IntruderResult",
    "SVDCache",
    "SettleResult",
    "compare",
    "intruders",
    "module_intruders",
    "settle",
    "ProjectionResult",
    "RankResult",
    "RankRule",
    "ResizeResult",
    "module_rank",
    "module_resize",
    "rank",
    "resize",
    "suggest_ranks",
    "SimilarityResult",
    "SpectrumResult",
    "amplify",
    "module_amplification",
    "module_similarity",
    "module_spectrum",
    "similarity",
    "spectrum",
    "subspace_basis",
    "weight_similarity",
]
