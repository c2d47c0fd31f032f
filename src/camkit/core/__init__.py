"""The core: one explanation call as nine stages (:mod:`camkit.core.pipeline`), the capture window, target
layers and their layouts, targets and tasks, post-processing, test-time augmentation, and the batched forwards of
the perturbation methods and metrics (:mod:`camkit.core.accel`)."""
