"""A Python client of AnyDoor Serve, standard library only (no torch, numpy or web stack).

    from client import AnyDoorClient

    anydoor = AnyDoorClient("http://127.0.0.1:8000", api_key=None)
    result = anydoor.predict(reference="object.png", background="room.jpg", box=["120,80,200,260"], steps=20, seed=1)
    result.save("out.png"); result.seed, result.boxes, result.timings_ms

Requests are encoded by the request spec's codecs (:func:`model.spec.codecs.encode_form`), the same code the
server decodes them with, so the client and the server cannot drift; a bad parameter fails before anything is
sent. Errors raise :class:`AnyDoorError` with the server's :class:`~model.errors.ErrorCode`.
"""

from client.api import AnyDoorClient, Result
from client.errors import AnyDoorError
from model.errors import ErrorCode

__all__ = ["AnyDoorClient", "AnyDoorError", "ErrorCode", "Result"]
