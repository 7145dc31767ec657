"""The networks, one per file, attributes named as in the upstream checkpoint: UNet, ControlNet, KL-VAE, DINOv2
ViT, the reference-mask refiner, and :class:`~model.nn.anydoor.AnyDoorModel`, which holds the first four."""
