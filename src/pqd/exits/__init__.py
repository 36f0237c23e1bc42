"""Early-exit machinery: exit heads, thresholds and losses (heads); the exit files
(export, graph), their runtime (runtime) and measurement (measure).
The early_exit stage (:mod:`pqd.stages.early_exit`) is a thin layer over it."""
