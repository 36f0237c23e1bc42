"""Early-exit machinery: exit heads, thresholds and losses; the exit export and runtime.
The early_exit stage (:mod:`pqd.stages.early_exit`) is a thin layer over it."""
