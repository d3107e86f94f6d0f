"""Metric names: one set of strings for MLflow, DVC metrics.json, KFP metrics and the web page.

Per-condition values use ``f"{KEY}/{class_name}"``; real-vs-real references (validation vs
test) use ``f"{KEY}{REF_SUFFIX}"``. A metric that cannot be computed honestly (e.g. Inception
weights absent) is left out of the dict and listed under ``UNAVAILABLE`` with the reason.
"""

FID_INCEPTION = "fid_inception"          # FID, standard InceptionV3 pool3 features
KID_INCEPTION = "kid_inception"          # KID, standard InceptionV3 features
FID_DOMAIN = "fid_domain"                # FID in the domain classifier's feature space
KID_DOMAIN = "kid_domain"                # KID in the domain classifier's feature space
PRECISION = "precision"                  # k-NN manifold precision (fidelity), domain features
RECALL = "recall"                        # k-NN manifold recall (coverage), domain features
SSIM_NEAREST = "ssim_nearest"            # SSIM of each generated image to its nearest real test image
MS_SSIM_NEAREST = "ms_ssim_nearest"      # MS-SSIM, same pairing
MS_SSIM_DIVERSITY = "ms_ssim_diversity"  # MS-SSIM among generated images of one condition (high = collapse)
COND_ACC = "cond_acc"                    # classifier accuracy on generated images of the requested condition
COND_CONF = "cond_conf"                  # classifier mean confidence in the requested condition
REAL_ACC = "real_acc"                    # the same classifier on real test images
TSTR_ACC = "tstr_acc"                    # train-synthetic-test-real accuracy
TRTR_ACC = "trtr_acc"                    # train-real-test-real accuracy (same classifier recipe)
MEMORISATION_SHARE = "memorisation_share"  # share of generated images closer to a training image than the test set's 1st percentile
MEMORISATION_SHARE_FEATURE = "memorisation_share_feature"  # the same in the domain feature space
NN_TRAIN_DIST_PIXEL = "nn_train_dist_pixel"      # median distance (per-pixel RMS) of a generated image to its nearest training image
NN_TRAIN_DIST_FEATURE = "nn_train_dist_feature"  # the same in the domain feature space
GATE_PASSED = "gate_passed"              # 1.0 when every check passed

REF_SUFFIX = "_ref"
UNAVAILABLE = "unavailable"


def per_class(key: str, class_name: str) -> str:
    """Key of a per-condition value, e.g. ``fid_domain/NORMAL``."""
    return f"{key}/{class_name}"
