"""The train stage: the loop, model building, kernels, checkpoints, launching ranks under torchrun, sharding, telemetry."""
