"""The model's evaluation metrics as the page shows them: a name, a value and one plain sentence.

Keys come from :mod:`radsynth.metric_keys`; nothing is renamed or substituted. A metric the
run does not hold is shown as "unavailable" with the reason the evaluation recorded, if any.
"""

from __future__ import annotations

import dataclasses

from radsynth import metric_keys as mk

# key -> (label, meaning, format, direction)
METRICS: tuple[tuple[str, str, str, str], ...] = (
    (mk.FID_INCEPTION, "FID (Inception)",
     "Distance between real and generated images in the standard InceptionV3 feature space; lower is better, 0 means indistinguishable.", "{:.2f}"),
    (mk.KID_INCEPTION, "KID (Inception)",
     "Like FID but unbiased for small samples; lower is better.", "{:.4f}"),
    (mk.FID_DOMAIN, "FID (chest X-ray features)",
     "The same distance in the feature space of a classifier trained on this project's X-rays; compare it with the real-vs-real reference.", "{:.2f}"),
    (mk.KID_DOMAIN, "KID (chest X-ray features)",
     "KID in the X-ray classifier's feature space; lower is better.", "{:.4f}"),
    (mk.PRECISION, "Precision",
     "Share of generated images that look like some real image (fidelity); higher is better.", "{:.2f}"),
    (mk.RECALL, "Recall",
     "Share of real images the generator can produce something like (coverage); higher is better.", "{:.2f}"),
    (mk.COND_ACC, "Condition accuracy",
     "How often the X-ray classifier recognises the requested condition in generated images; compare with its accuracy on real images.", "{:.1%}"),
    (mk.REAL_ACC, "Classifier accuracy on real images",
     "The same classifier on real test images: the ceiling for condition accuracy.", "{:.1%}"),
    (mk.SSIM_NEAREST, "SSIM to nearest real image",
     "Structural similarity of each generated image to its closest real test image (1 = identical structure).", "{:.3f}"),
    (mk.MS_SSIM_DIVERSITY, "Diversity (MS-SSIM among generated)",
     "How alike generated images of one condition are to each other; high values warn of mode collapse.", "{:.3f}"),
    (mk.MEMORISATION_SHARE, "Memorisation check",
     "Share of generated images closer to a training image than real test images usually are; near 0 means no copying of patients.", "{:.1%}"),
)

PER_CLASS = {mk.FID_DOMAIN, mk.KID_DOMAIN, mk.FID_INCEPTION, mk.KID_INCEPTION, mk.COND_ACC, mk.PRECISION, mk.RECALL}


@dataclasses.dataclass(frozen=True)
class MetricRow:
    key: str
    label: str
    meaning: str
    value: str                                 # formatted, or "unavailable"
    condition_value: str | None                # the requested condition's own value, when recorded
    reference: str | None                      # real-vs-real reference, when recorded
    reason: str | None                         # why it is unavailable


def rows(metrics: dict[str, float], unavailable: dict[str, str], condition: str | None) -> list[MetricRow]:
    """One row per known metric, honest about what is missing."""
    out = []
    for key, label, meaning, fmt in METRICS:
        value = metrics.get(key)
        per = metrics.get(mk.per_class(key, condition)) if condition and key in PER_CLASS else None
        ref = metrics.get(key + mk.REF_SUFFIX)
        reason = None
        if value is None:
            reason = unavailable.get(key) or "not recorded for this model version"
        out.append(MetricRow(
            key=key, label=label, meaning=meaning,
            value="unavailable" if value is None else fmt.format(value),
            condition_value=None if per is None else fmt.format(per),
            reference=None if ref is None else fmt.format(ref),
            reason=reason,
        ))
    return out
