"""Training in every label setting: plain torch loops here, Ray (jobs, Train, Data) at the edges
(``distributed``, ``jobs``). Importing the package registers the settings."""

from flawline.train import supervised, unsupervised  # noqa: F401  (registration)
from flawline.train import fewshot, semisupervised  # noqa: F401  (registration)
from flawline.train import mixed, weakly  # noqa: F401  (registration)
from flawline.train.settings import TrainingSetting, get_setting, setting_names
from flawline.train.spec import TrainSpec

__all__ = ["TrainSpec", "TrainingSetting", "get_setting", "setting_names"]
