"""Model compression: pruning, quantization, quantization-aware training, budget search.

    from edgeops.compress import CompressService, quantize, prune, cluster, load_profiles

TensorFlow is imported inside the functions that need it, so importing this package is
cheap. See docs/compression.md.
"""

from edgeops.compress.errors import (
    CompressError,
    NotCompressibleError,
    NothingFitsError,
    ProfileError,
    PruningError,
    QuantizationError,
    UnknownProfileError,
    UnknownQuantizationError,
)
from edgeops.compress.pareto import pareto_front
from edgeops.compress.policy import Attempt, Decision, decide, next_variant
from edgeops.compress.profiles import DeviceProfile, Needs, get_profile, load_profiles
from edgeops.compress.prune import cluster, kernel_sparsity, prune, quantization_aware
from edgeops.compress.quantize import QUANTIZATION_MODES, quantize, tflite_tensor_bytes
from edgeops.compress.search import Candidate, SearchResult, mark_candidates
from edgeops.compress.service import CompressService

__all__ = [
    "QUANTIZATION_MODES",
    "Attempt",
    "Candidate",
    "CompressError",
    "CompressService",
    "Decision",
    "DeviceProfile",
    "Needs",
    "NotCompressibleError",
    "NothingFitsError",
    "ProfileError",
    "PruningError",
    "QuantizationError",
    "SearchResult",
    "UnknownProfileError",
    "UnknownQuantizationError",
    "cluster",
    "decide",
    "get_profile",
    "kernel_sparsity",
    "load_profiles",
    "mark_candidates",
    "next_variant",
    "pareto_front",
    "prune",
    "quantization_aware",
    "quantize",
    "tflite_tensor_bytes",
]
