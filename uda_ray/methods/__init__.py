"""Every UDA method, by name. Adding a method = its file + one line here."""

from uda_ray.methods.advent import AdvEnt, MinEnt
from uda_ray.methods.adversarial import Adversarial
from uda_ray.methods.base import Method
from uda_ray.methods.contrastive import Contrastive
from uda_ray.methods.cpsl import CPSL
from uda_ray.methods.cpsl_distill import CPSLDistill
from uda_ray.methods.fda import FDA
from uda_ray.methods.mpl import MPL
from uda_ray.methods.self_training import SelfTraining
from uda_ray.methods.source_only import SourceOnly
from uda_ray.methods.target_only import TargetOnly

METHODS: dict[str, type[Method]] = {
    "source_only": SourceOnly,
    "target_only": TargetOnly,
    "adversarial": Adversarial,
    "minent": MinEnt,
    "advent": AdvEnt,
    "fda": FDA,
    "self_training": SelfTraining,
    "mpl": MPL,
    "contrastive": Contrastive,
    "cpsl": CPSL,
    "cpsl_distill": CPSLDistill,
}
