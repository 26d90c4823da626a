"""Evaluation protocols on features: few-shot episodes, Best-NN kNN, linear probe, instance
retrieval, alignment/uniformity, t-SNE (specs: methods/smkd.md §3, methods/sslsmall.md §2).

Every function takes tensors and follows their device; accuracies are percentages in [0, 100] and
95% intervals are 1.96·std/√E with the population std. Feature extraction and its cache live in
:mod:`kdforge.eval.features`; transfer through the trainer in :mod:`kdforge.eval.transfer` (imported
on demand: it registers the ``linear_transfer`` method).
"""
from kdforge.eval.features import TAPS, cached_features, extract_features, load_backbone, tap_features
from kdforge.eval.fewshot import EpisodeResult, evaluate_episodes, fit_cosine_classifier, sample_episodes
from kdforge.eval.geometry import alignment, class_alignment, uniformity
from kdforge.eval.instdisc import instdisc_topk
from kdforge.eval.knn import KNNResult, best_nn, knn_search, vote_accuracies
from kdforge.eval.linear import LINEAR_PROTOCOL, LinearProbeResult, linear_probe
from kdforge.eval.logreg import fit_logistic_batched
from kdforge.eval.tsne import tsne_embed, tsne_plot

__all__ = [
    "sample_episodes", "evaluate_episodes", "EpisodeResult", "fit_cosine_classifier", "fit_logistic_batched",
    "best_nn", "knn_search", "vote_accuracies", "KNNResult",
    "alignment", "uniformity", "class_alignment", "instdisc_topk",
    "linear_probe", "LinearProbeResult", "LINEAR_PROTOCOL",
    "tsne_plot", "tsne_embed",
    "extract_features", "cached_features", "load_backbone", "tap_features", "TAPS",
]
