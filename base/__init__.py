"""Shared infrastructure below every other package: what the rollout, learner and orchestrator
sides all need that is not training data.

- `base.config.StrictConfig`: the base of every config section (unknown fields rejected, frozen).
- `base.storage`: run storage through fsspec (local path, shared filesystem, ``s3://``, ...).
- `base.model_source.ModelSource`: distribution of the policy's model files to every node.
- `base.adapter`: the LoRA adapter spec and its on-disk format.
- `base.weight_buckets`: the weight wire format (bucketed safetensors).
- `base.weight_delta`: delta weight pushes (changed tensors only, rebuilt bit-exactly on the worker).
- `base.weight_group.WeightGroup`: a collective group that broadcasts weight buckets.

It depends on no other relayrl package (the import-linter contract in pyproject.toml keeps it so).
Left out on purpose: anything about samples or the replay buffer (`buffer`).
"""

from base.config import StrictConfig

__all__ = ["StrictConfig"]
