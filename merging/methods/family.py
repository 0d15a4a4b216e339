"""Parameters of the task-arithmetic family (task arithmetic, TIES, DARE, Breadcrumbs, DELLA),
declared once and shared by its method files.

Library defaults (``merging.merge``) and mergekit 0.1.5's (YAML) differ only in ``density``
(mergekit: 1.0, i.e. no sparsification unless a config sets it) and, for ``dare_ties`` and
``breadcrumbs_ties``, ``normalize`` (mergekit: false; here every sign-consensus method divides
by the summed weights of the agreeing models, as mergekit's ``ties`` does, so that K models
with weight 1 do not add up to K times a task vector).
"""

from __future__ import annotations

from .common import COMBINES
from .registry import _SAME, Parameter, finite, in_range, is_bool, one_of

__all__ = ["COMBINE", "EPSILON", "GAMMA", "INT8_MASK", "LAMBDA", "density", "normalize", "rescale"]

LAMBDA = Parameter("lambda", 1.0, check=finite, doc="scales the merged delta")
INT8_MASK = Parameter("int8_mask", False, check=is_bool,
                      doc="accepted for mergekit configs: a memory option of mergekit's that never changes a number; no effect here")
COMBINE = Parameter("combine", None, check=one_of(None, *COMBINES),
                    doc="disjoint combine: 'mergekit', 'mean' or 'sum'; when set, it overrides normalize (this project's addition)")
GAMMA = Parameter("gamma", 0.01, per_model=True, check=in_range(0, 1), doc="fraction of largest magnitudes dropped as outliers")
EPSILON = Parameter("epsilon", 0.15, per_model=True, check=in_range(0, 1, high_open=True),
                    doc="spread of keep probabilities around density, by magnitude rank")


def density(default: float, doc: str) -> Parameter:
    return Parameter("density", default, per_model=True, check=in_range(0, 1, low_open=True), doc=doc, mergekit_default=1.0)


def normalize(default: bool, *, consensus: bool, mergekit_default: bool | object = _SAME) -> Parameter:
    doc = ("divide by the summed weights of the models agreeing with the elected sign, else sum" if consensus
           else "divide the weighted sum by the sum of the weights")
    return Parameter("normalize", default, check=is_bool, doc=doc, mergekit_default=mergekit_default)


def rescale(default: bool) -> Parameter:
    return Parameter("rescale", default, check=is_bool, doc="scale kept entries back to the undropped L1 norm")
