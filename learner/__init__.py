"""Training: DeepSpeed (ZeRO) ranks in Ray actors that turn sample groups into policy updates.

`LearnerGroup` holds the `LearnerWorker` ranks (one DeepSpeed process group) and fans calls out;
each rank computes group advantages (`learner.advantages`), a policy loss with its off-policy
correction (`learner.losses`, `learner.off_policy`) and exports weights in the `buffer.weight_buckets`
format. `learner.config` holds `LearnerConfig`. Depends on buffer/ only.

Importing this package is light: torch, DeepSpeed and Ray load inside the modules and functions that
need them (`learner.advantages` and `learner.losses` import torch).
"""

from learner.config import LearnerConfig
from learner.group import LearnerGroup
from learner.worker import LearnerWorker

__all__ = ["LearnerConfig", "LearnerGroup", "LearnerWorker"]
