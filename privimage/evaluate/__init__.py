"""privimage.evaluate: how good and how useful the synthetic images are, and what they cost in privacy.

The measurements:

- :mod:`.inception`: the standard FID Inception-v3 (weights from a local file); :mod:`.features`: feature
  networks (that Inception, or a proxy on the project's own classifier, always labelled ``proxy_*``);
  :mod:`.fid`: Fréchet distance and the ``mu``/``sigma`` statistics files; :mod:`.metrics`: Inception Score
  and k-NN precision/recall;
- :mod:`.classify`: classification accuracy (CA) of classifiers trained on synthetic data and tested on
  real data (the classifiers, the training recipe, the DPImageBench noisy selection).

The report of a run directory (:func:`evaluate_run` in :mod:`.report`, publishable into ``release/``,
private into ``private/``), one module per concern:

- :mod:`.options`: :class:`EvaluateOptions`, what to compute and from where;
- :mod:`.real_data`: the only reader of real images (config.json's data specs or ``.npz`` files);
- :mod:`.fidelity`: FID / IS / precision-recall into the report its reference's coverage allows;
- :mod:`.utility`: CA in the report, one function per protocol (official, dpimagebench);
- :mod:`.figures` (with :mod:`.plots`): sample grids and training curves, publishable or private;
- :mod:`.privacy`: each metric's coverage, the evaluation ledger, the privacy section;
- :mod:`.markdown`: the report files (JSON and Markdown).
"""

from privimage.evaluate.classify import OFFICIAL, SMALL, CAConfig, classification_accuracy, dpimagebench_accuracy
from privimage.evaluate.features import FeatureNet, extract_features, inception_feature_net, proxy_feature_net
from privimage.evaluate.fid import FeatureStats, frechet_distance, load_stats, save_stats
from privimage.evaluate.inception import FIDInceptionV3, load_fid_inception
from privimage.evaluate.metrics import inception_score, precision_recall
from privimage.evaluate.options import EvaluateOptions
from privimage.evaluate.report import evaluate_run

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
