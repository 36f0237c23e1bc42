"""Pruning machinery: importance criteria, masks and N:M patterns, channel surgery
(Torch-Pruning). The prune stages (:mod:`pqd.stages.prune`, ``prune_channels``) are thin
layers over it."""
