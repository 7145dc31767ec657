"""What the routes get from the app: its :class:`~service.inference.InferenceService`."""

from __future__ import annotations

from fastapi import Request

from service.inference import InferenceService


def get_service(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.service
    return service
