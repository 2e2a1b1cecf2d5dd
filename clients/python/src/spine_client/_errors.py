"""Typed exceptions for the answers of Spine's HTTP API.

Every error the dispatcher produces is a JSON body ``{"error": condition, "message", "field"?}``
with an HTTP status (docs/dispatcher.md §6, "Errors"); a job that ends badly is not an HTTP
error but carries its own ``error`` object. Both become one of the classes below, so that a
web view can ``except UnknownCapability`` or ``except JobFailed`` instead of comparing strings.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

__all__ = [
    "SpineError",
    "BadRequest",
    "BadArguments",
    "UnknownCapability",
    "QueueFull",
    "RateLimited",
    "NotFound",
    "UnknownJob",
    "NoOutput",
    "NotAuthorized",
    "Unauthorized",
    "Forbidden",
    "TooLarge",
    "StorageFull",
    "RequestTimeout",
    "TooManyStreams",
    "Unavailable",
    "ConnectionFailed",
    "JobError",
    "JobFailed",
    "JobBadArguments",
    "JobCancelled",
    "JobTimedOut",
    "WaitTimeout",
]


class SpineError(Exception):
    """Any error from the API or about a job.

    ``condition`` is the API's ``error`` string (``"unknown-capability"``), or the job's
    ``error.condition``; ``field`` names the request field or job argument at fault when the
    dispatcher named one; ``status`` is the HTTP status (``None`` for job outcomes and for
    errors raised by this client itself).
    """

    def __init__(
        self,
        condition: str,
        message: str,
        field: Optional[str] = None,
        status: Optional[int] = None,
    ) -> None:
        self.condition = condition
        self.message = message
        self.field = field
        self.status = status
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = f" (field {self.field!r})" if self.field else ""
        status = f"HTTP {self.status} " if self.status is not None else ""
        return f"{status}{self.condition}{where}: {self.message}"


class BadRequest(SpineError):
    """400: the request is malformed (a field unknown, missing, of the wrong type or refused)."""


class BadArguments(BadRequest):
    """The job's arguments or bounds were refused (``bad-arguments``, ``malformed``)."""


class UnknownCapability(SpineError):
    """422: no agent has ever offered the capability named in ``field``.

    The message lists the known capabilities, closest first; submit with
    ``wait_for_agent=True`` to queue the job until an agent offers it.
    """


class QueueFull(SpineError):
    """429: the capability's queue, or this token's share of it, is full. Try again later."""


class RateLimited(QueueFull):
    """429 ``rate-limited``: this token is over its rate limit (the message names it).
    ``retry_after`` is the dispatcher's ``Retry-After``: seconds until a submission fits."""

    retry_after: Optional[int] = None


class NotFound(SpineError):
    """404: no such endpoint (``not-found``)."""


class UnknownJob(NotFound):
    """404: no job has that id (it may have passed its retention)."""


class NoOutput(NotFound):
    """404: the job has no output (it has not succeeded)."""


class NotAuthorized(SpineError):
    """401 or 403 (``not-authorized``)."""


class Unauthorized(NotAuthorized):
    """401: the dispatcher has tokens and none, or an unknown one, was given."""


class Forbidden(NotAuthorized):
    """403: the token may not run this capability or see this job, or the client is not
    loopback and the dispatcher has no tokens."""


class TooLarge(SpineError):
    """413: the input or the request body is over the dispatcher's limit."""


class StorageFull(SpineError):
    """507: the blob store is at its quota."""


class RequestTimeout(SpineError):
    """408: the request took longer than the dispatcher's ``http_request_timeout``."""


class TooManyStreams(SpineError):
    """429 or 503: too many event streams are open (for this token, or in all)."""


class Unavailable(SpineError):
    """503: the dispatcher is stopping or has no connection left, or (``standby``) it is one
    of several dispatchers and does not lead: the message names the leader's URL."""


class ConnectionFailed(SpineError):
    """The dispatcher could not be reached after every retry (the cause is chained)."""


class JobError(SpineError):
    """A job ended without success. ``job_id`` names it and ``job`` is its last view."""

    def __init__(
        self,
        condition: str,
        message: str,
        field: Optional[str] = None,
        *,
        job_id: str,
        job: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.job_id = job_id
        self.job = job or {}
        super().__init__(condition, message, field, None)

    def _describe(self) -> str:
        return f"job {self.job_id}: {super()._describe()}"


class JobFailed(JobError):
    """The job ended ``failed``: ``condition`` is the job's (``failed``, ``no-agent``,
    ``bad-arguments``, ``retryable``…), ``field`` the argument an agent refused."""


class JobBadArguments(JobFailed, BadArguments):
    """The job failed because its agent refused its arguments or input (``field`` names
    which): caught by ``except JobFailed`` and by ``except BadArguments`` alike."""


class JobCancelled(JobError):
    """The job ended ``cancelled`` (by a submitter, or its agent answered ``cancelled``)."""


class JobTimedOut(JobError):
    """The job ended ``timed-out``: its ``deadline`` passed."""


class WaitTimeout(SpineError):
    """This client stopped waiting; the job itself goes on.

    Wait again with ``job.result()``, or cancel it with ``job.cancel()``
    (``DELETE /v1/jobs/{job_id}``).
    """

    def __init__(self, job_id: str, waited: float, state: str) -> None:
        self.job_id = job_id
        self.waited = waited
        self.state = state
        super().__init__(
            "wait-timeout",
            f"job {job_id} is still {state} after {waited:g} s; it goes on: wait again with "
            f"job.result(), or cancel it with job.cancel() (DELETE /v1/jobs/{job_id})",
        )


# The API's `error` strings; a status decides where one condition has two meanings.
_BY_CONDITION: Dict[str, Type[SpineError]] = {
    "bad-request": BadRequest,
    "tls-required": BadRequest,
    "unsupported-media-type": BadRequest,
    "bad-arguments": BadArguments,
    "malformed": BadArguments,
    "unknown-capability": UnknownCapability,
    "queue-full": QueueFull,
    "rate-limited": RateLimited,
    "busy": QueueFull,
    "not-found": NotFound,
    "unknown-job": UnknownJob,
    "no-output": NoOutput,
    "too-large": TooLarge,
    "storage-full": StorageFull,
    "request-timeout": RequestTimeout,
    "too-many-streams": TooManyStreams,
    "too-many-connections": Unavailable,
    "unavailable": Unavailable,
    "standby": Unavailable,
}


def api_error(status: int, body: bytes) -> SpineError:
    """The exception for an HTTP error answer: its JSON body when it has one, otherwise
    (a proxy's page, hyper's bodiless 431) the status and the first bytes of the body."""
    import json

    condition, message, field = f"http-{status}", "", None
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        condition = doc["error"]
        message = str(doc.get("message") or "")
        field = doc.get("field") if isinstance(doc.get("field"), str) else None
    else:
        message = body[:200].decode("utf-8", "replace") or "(no body)"
    err = error_for(condition, message, field, status)
    if isinstance(err, RateLimited) and isinstance(doc, dict):
        retry = doc.get("retry_after")
        err.retry_after = retry if isinstance(retry, int) else None
    return err


def error_for(
    condition: str, message: str, field: Optional[str], status: Optional[int]
) -> SpineError:
    """The exception for an API condition (also used for the per-item errors of a batch)."""
    if condition == "not-authorized":
        cls: Type[SpineError] = {401: Unauthorized, 403: Forbidden}.get(status or 0, NotAuthorized)
    else:
        cls = _BY_CONDITION.get(condition, SpineError)
    return cls(condition, message, field, status)


def job_error(job: Dict[str, Any]) -> JobError:
    """The exception for a job that ended ``failed``, ``cancelled`` or ``timed-out``."""
    err = job.get("error") or {}
    condition = str(err.get("condition") or job.get("state") or "failed")
    message = str(err.get("message") or f"the job ended {job.get('state')}")
    field = err.get("field") if isinstance(err.get("field"), str) else None
    state = job.get("state")
    cls: Type[JobError]
    if state == "cancelled":
        cls = JobCancelled
    elif state == "timed-out":
        cls = JobTimedOut
    elif condition in ("bad-arguments", "malformed"):
        cls = JobBadArguments
    else:
        cls = JobFailed
    return cls(condition, message, field, job_id=str(job.get("id")), job=job)
