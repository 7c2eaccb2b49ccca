"""Data mixing laws (DESIGN §5): fit L(r) = c + k·exp(t·r) per validation domain, suggest r*.

Pure numerics on a points table; nothing here trains or evaluates a model.
"""

from plantmix.mixlaw.fit import Law, MixingLaw, fit_law
from plantmix.mixlaw.suggest import PoolLimit, Suggestion, suggest_critical, suggest_weighted

__all__ = ["Law", "MixingLaw", "PoolLimit", "Suggestion", "fit_law", "suggest_critical", "suggest_weighted"]
