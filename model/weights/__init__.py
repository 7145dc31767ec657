"""Weights on disk: safe checkpoint reading and conversion (:mod:`.checkpoint`, needs torch) and the download
cache (:mod:`.download`, standard library only, so it imports without torch)."""
