"""How the fleet-side routes turn the services' errors into HTTP answers.

    with answers():
        ctx.rollouts.pause(rollout_id)

:class:`~edgeops.errors.NotFoundError` is 404. A state that does not allow the operation
(:class:`~edgeops.rollout.RolloutError`, an enrollment of a device enrolled already, a
pipeline run that already ended) and a hub without a release repository are 409. A rollout
spec error is 422 (its message starts with the field's path); any other
:class:`~edgeops.errors.ConfigError` (a value the service refused, named in its message) is
400. Every answer is ``{"detail": message}`` with the service's own one-line message.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException, status

from edgeops.errors import ConfigError, NotFoundError

__all__ = ["answers", "not_found"]


def not_found(message: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=message)


@contextmanager
def answers() -> Iterator[None]:
    """Translate the services' errors raised inside the block (see the module docstring)."""
    from edgeops.fleet.identity import EnrollmentError
    from edgeops.pipelines.errors import PipelineError
    from edgeops.rollout import RolloutError, RolloutSpecError
    from edgeops.trust.errors import TrustNotInitialisedError

    try:
        yield
    except NotFoundError as exc:
        raise not_found(str(exc)) from None
    except RolloutSpecError as exc:
        raise HTTPException(422, detail=str(exc)) from None
    except TrustNotInitialisedError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    except ConfigError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(exc)) from None
    except (RolloutError, EnrollmentError, PipelineError) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
