"""The paper's analyses, in pure torch: the variant engine (deletion, reordering), paths, the
headline numbers of a run and the catalog of analysis names."""

from resens.analysis.catalog import analysis_names, run_order
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
from resens.analysis.stochastic_depth import compare_deletion, summarize_stochastic_depth
from resens.analysis.summary import headline
from resens.analysis.variants import (
    count_variant_errors,
    deletable_blocks,
    deletion_variant,
    evaluate_variants,
    evaluate_variants_naive,
    kendall_tau,
    sample_deletions,
    sample_swaps,
    swappable_groups,
)

__all__ = [
    "PathGradientsByLength", "analysis_names", "compare_deletion", "count_variant_errors",
    "deletable_blocks", "deletion_variant", "effective_path_survival", "effective_paths",
    "evaluate_variants", "evaluate_variants_naive", "headline", "kendall_tau",
    "path_gradient_by_length", "path_gradient_norms", "path_gradient_norms_naive",
    "path_input_gradients", "path_length_distribution", "path_survival", "path_survival_by_length",
    "run_order", "sample_deletions", "sample_paths", "sample_swaps", "share_of_paths",
    "summarize_stochastic_depth", "swappable_groups",
]
