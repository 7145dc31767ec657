"""AnyDoor model core: networks, weights, sampler, pre/post-processing and pipeline."""
