"""``anydoor batch`` and ``anydoor merge``: a manifest in, a labelled dataset out; the top layer, beside the service.

- :mod:`.manifest`: reading and validating the manifest (the request spec's codecs), shards;
- :mod:`.dataset`: the output directory (images, results.jsonl, COCO, YOLO), written crash-safe;
- :mod:`.report`: counts, progress bar, summary;
- :mod:`.local`: the in-process engine; :mod:`.remote`: the engine over HTTP (:mod:`client`);
- :mod:`.cli`: the commands.
"""
