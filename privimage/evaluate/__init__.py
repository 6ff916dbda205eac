"""privimage.evaluate: how good and how useful the synthetic images are, and what they cost in privacy.

Fidelity: FID with the standard FID Inception-v3 (weights from a local file, :mod:`.inception`), or a proxy
FID on the project's own classifier features when that file is absent (:mod:`.features`; always labelled
``proxy_*``); Inception Score and k-NN precision/recall (:mod:`.metrics`); Fréchet distance and the
``mu``/``sigma`` statistics files (:mod:`.fid`). Utility: classification accuracy of classifiers trained on
synthetic data and tested on real data (:mod:`.classify`). :func:`evaluate_run` reads a run directory and
writes the publishable report into ``release/`` and the private one into ``private/`` (:mod:`.report`, with
:mod:`.privacy` for the ledgers and each metric's coverage, :mod:`.figures`, :mod:`.markdown`, :mod:`.plots`).
"""

from privimage.evaluate.classify import OFFICIAL, SMALL, CAConfig, classification_accuracy, dpimagebench_accuracy
from privimage.evaluate.features import FeatureNet, extract_features, inception_feature_net, proxy_feature_net
from privimage.evaluate.fid import FeatureStats, frechet_distance, load_stats, save_stats
from privimage.evaluate.inception import FIDInceptionV3, load_fid_inception
from privimage.evaluate.metrics import inception_score, precision_recall
from privimage.evaluate.report import EvaluateOptions, evaluate_run

__all__ = [
    "CAConfig",
    "EvaluateOptions",
    "FIDInceptionV3",
    "FeatureNet",
    "FeatureStats",
    "OFFICIAL",
    "SMALL",
    "classification_accuracy",
    "dpimagebench_accuracy",
    "evaluate_run",
    "extract_features",
    "frechet_distance",
    "inception_feature_net",
    "inception_score",
    "load_fid_inception",
    "load_stats",
    "precision_recall",
    "proxy_feature_net",
    "save_stats",
]
