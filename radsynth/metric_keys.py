"""Metric names: one set of strings for MLflow, DVC metrics.json, KFP metrics and the web page.

Per-condition values use ``f"{KEY}/{class_name}"``. Real-vs-real references use
``f"{KEY}{REF_SUFFIX}"``: real *training* images drawn with the generated set's count per
condition, compared with the real test split exactly as the generated images are (mean over
``eval.reference_draws`` draws; their sd under ``REF_SD_SUFFIX``). Utility figures are means
over seeds, their sd under ``SD_SUFFIX``. A metric that cannot be computed honestly (e.g.
Inception weights absent) is left out of the dict and listed under ``UNAVAILABLE`` with the reason.
"""

FID_INCEPTION = "fid_inception"          # FID, standard InceptionV3 pool3 features
KID_INCEPTION = "kid_inception"          # KID, standard InceptionV3 features
FID_INCEPTION_UNITS = "fid_inception_units"  # fid_inception / its size-matched real reference
FID_DOMAIN = "fid_domain"                # FID in the domain classifier's (the judge's) feature space
FID_DOMAIN_UNITS = "fid_domain_units"    # fid_domain / its size-matched real reference (the gate's unit)
KID_DOMAIN = "kid_domain"                # KID in the domain classifier's feature space
PRECISION = "precision"                  # k-NN manifold precision (fidelity), domain features
RECALL = "recall"                        # k-NN manifold recall (coverage), domain features
SSIM_NEAREST = "ssim_nearest"            # SSIM of each generated image to its nearest real test image
MS_SSIM_NEAREST = "ms_ssim_nearest"      # MS-SSIM, same pairing
MS_SSIM_DIVERSITY = "ms_ssim_diversity"  # MS-SSIM among generated images of one condition (high = collapse)
COND_ACC = "cond_acc"                    # classifier accuracy on generated images of the requested condition
COND_CONF = "cond_conf"                  # classifier mean confidence in the requested condition
REAL_ACC = "real_acc"                    # the same classifier on real test images
REAL_BALANCED_ACC = "real_balanced_acc"  # the judge's balanced (mean per-condition) accuracy on real test images
TSTR_ACC = "tstr_acc"                    # train-synthetic-test-real accuracy on real test (per condition: recall)
TRTR_ACC = "trtr_acc"                    # train-real-test-real accuracy (same recipe, size-matched real set)
TSTR_BALANCED_ACC = "tstr_balanced_acc"  # TSTR balanced accuracy (mean per-condition recall)
TRTR_BALANCED_ACC = "trtr_balanced_acc"  # TRTR balanced accuracy
TRTR_GAP = "trtr_gap"                    # judge's real balanced accuracy minus TRTR's (the utility sanity check)
AUG_BALANCED_ACC = "augment_balanced_acc"              # real subset + class-balancing synthetic images: balanced accuracy
AUG_REAL_BALANCED_ACC = "augment_real_only_balanced_acc"  # the same real subset alone
AUG_MINORITY_RECALL = "augment_minority_recall"        # real + synthetic: recall of the rarest training condition
AUG_REAL_MINORITY_RECALL = "augment_real_only_minority_recall"  # real subset alone: that recall
MEMORISATION_SHARE = "memorisation_share"  # share of generated images closer to a training image than the test set's 1st percentile
MEMORISATION_SHARE_FEATURE = "memorisation_share_feature"  # the same in the domain feature space
NN_TRAIN_DIST_PIXEL = "nn_train_dist_pixel"      # median distance (per-pixel RMS) of a generated image to its nearest training image
NN_TRAIN_DIST_FEATURE = "nn_train_dist_feature"  # the same in the domain feature space
GATE_PASSED = "gate_passed"              # 1.0 when every check passed at the profile's gate level
GATE_RELEASE_PASSED = "gate_release_passed"  # 1.0 when every check passed at release level

REF_SUFFIX = "_ref"
REF_SD_SUFFIX = "_ref_sd"
SD_SUFFIX = "_sd"
UNAVAILABLE = "unavailable"


def per_class(key: str, class_name: str) -> str:
    """Key of a per-condition value, e.g. ``fid_domain/NORMAL``."""
    return f"{key}/{class_name}"
