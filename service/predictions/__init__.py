"""Async predictions (the Cog/Replicate prediction API), webhooks and the durable job store.

- :mod:`.routes`: ``/predictions`` (create, idempotent ``PUT``, poll, cancel);
- :mod:`.service`: :class:`PredictionService`, the life cycle on the service's GPU queue;
- :mod:`.store`: the SQLite job store;
- :mod:`.webhooks`: the non-blocking, coalescing, signed webhook sender;
- :mod:`.urlguard` and :mod:`.fetch`: the SSRF guard, and input images from data URIs and URLs;
- :mod:`.decode`: ``input`` through the request spec's JSON codecs.
"""
