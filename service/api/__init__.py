"""The HTTP routes: thin. They read the request, call the :class:`~service.inference.InferenceService`, shape
the reply. :data:`router` holds them all."""

from fastapi import APIRouter

from service.api import health, predict, studio

router = APIRouter()
router.include_router(predict.router)
router.include_router(health.router)
router.include_router(studio.router)

__all__ = ["router"]
