"""privimage.evaluate: how good and how useful the synthetic images are, and what they cost in privacy.

Fidelity: FID with the standard FID Inception-v3 (weights from a local file, :mod:`.inception`); Inception
Score and k-NN precision/recall (:mod:`.metrics`); Fréchet distance and the ``mu``/``sigma`` statistics
files (:mod:`.fid`).
"""
