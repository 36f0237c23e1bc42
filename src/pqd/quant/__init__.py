"""Quantization machinery: the PT2E scheme, quantizer and prepare, range calibration, layer
sensitivity. The quantize stage (:mod:`pqd.stages.quantize`) is a thin layer over it."""
