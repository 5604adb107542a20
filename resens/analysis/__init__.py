"""The paper's analyses, in pure torch: lesion protocols, the variant engine (deletion,
reordering, duplication), paths, the headline numbers of a run and the order analyses run in."""

from resens.analysis.catalog import run_order
from resens.analysis.paths import (
    PathGradientsByLength,
    effective_path_survival,
    effective_paths,
    path_gradient_by_length,
    path_gradient_norms,
    path_gradient_norms_naive,
    path_input_gradients,
    path_length_distribution,
    path_survival,
    path_survival_by_length,
    sample_paths,
    share_of_paths,
)
from resens.analysis.protocol import PROTOCOLS, LesionProtocol, Rules, resolve_protocol
from resens.analysis.stochastic_depth import compare_deletion, summarize_stochastic_depth
from resens.analysis.summary import headline
from resens.analysis.variants import (
    apply_swaps,
    count_variant_errors,
    deletion_variant,
    duplication_variant,
    evaluate_variants,
    evaluate_variants_naive,
    kendall_tau,
    sample_deletions,
    sample_duplications,
    sample_swaps,
    total_displacement,
)

__all__ = [
    "PROTOCOLS", "LesionProtocol", "PathGradientsByLength", "Rules", "apply_swaps",
    "compare_deletion", "count_variant_errors", "deletion_variant", "duplication_variant",
    "effective_path_survival", "effective_paths", "evaluate_variants", "evaluate_variants_naive",
    "headline", "kendall_tau", "path_gradient_by_length", "path_gradient_norms",
    "path_gradient_norms_naive", "path_input_gradients", "path_length_distribution",
    "path_survival", "path_survival_by_length", "resolve_protocol", "run_order",
    "sample_deletions", "sample_duplications", "sample_paths", "sample_swaps", "share_of_paths",
    "summarize_stochastic_depth", "total_displacement",
]
