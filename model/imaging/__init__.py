"""Images in and out: decoding user uploads, target regions, AnyDoor's pre- and post-processing (numpy/OpenCV)."""
