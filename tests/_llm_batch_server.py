"""The batch endpoints of the test LLM server: OpenAI Files + Batches, Anthropic Message Batches.

``server.batches`` is a :class:`BatchJobs`.  A job stays in progress until the test ends it
(``finish``), unless ``auto`` is set, in which case it ends completed as it is created::

    job = server.batches.wait_for_jobs(1)[0]  # blocks a thread: run it in one
    server.batches.finish(job.id, errored={"cid": (400, "bad")}, order="shuffled")
    server.batches.finish(job.id, ran=half, status="expired")

Results come out in the order the test asks for (shuffled by default, as the providers give
them).  Each line is answered by ``batches.answer`` (default: the server's ``default``,
an echo).  ``submitted`` lists every custom id of every job, so a test can check that no
request was submitted twice.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import random
from collections.abc import Callable, Collection, Mapping
from email.parser import BytesParser
from email.policy import HTTP
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from _llm_server import Answer, LLMServer, Request

__all__ = ["BatchJobs", "Job"]

_OPENAI_ENDED = {"completed", "expired", "cancelled", "failed"}


@attrs.define
class Job:
    """One job as the server keeps it."""

    id: str
    protocol: str  # "openai" or "anthropic"
    requests: list[tuple[str, dict[str, Any]]]  # (custom_id, body), in input order
    input_file_id: str | None = None
    status: str = "in_progress"  # in_progress, cancelling, completed, expired, cancelled, failed
    failure: str | None = None
    lines: list[dict[str, Any]] = attrs.field(factory=list)  # the results, in output order
    errors: list[dict[str, Any]] = attrs.field(factory=list)  # OpenAI's error file

    @property
    def custom_ids(self) -> list[str]:
        return [cid for cid, _ in self.requests]

    @property
    def ended(self) -> bool:
        return self.status in _OPENAI_ENDED


class BatchJobs:
    """The batch state of one :class:`LLMServer` (guarded by its lock)."""

    def __init__(self, owner: LLMServer) -> None:
        self.owner = owner
        self.reset()

    def reset(self) -> None:
        with self.owner._lock:
            self.jobs: list[Job] = []
            self.files: dict[str, bytes] = {}
            self.submitted: list[str] = []
            self.calls: list[tuple[str, str]] = []  # (method, path) of every batch request
            self.cancelled: list[str] = []  # job ids a client asked to cancel
            self.auto = False
            self.cancel_ends = True
            self.answer: Callable[[Request], Answer] | None = None
            self._ids = itertools.count(1)
            self._random = random.Random(18)

    # --- what a test does -----------------------------------------------------------------

    def wait_for_jobs(self, n: int, timeout: float = 20.0) -> list[Job]:
        """Block this thread until *n* jobs exist; the jobs."""
        self.owner.wait_for(lambda s: len(self.jobs) >= n, timeout)
        with self.owner._lock:
            return list(self.jobs)

    def job(self, job_id: str) -> Job:
        with self.owner._lock:
            return next(j for j in self.jobs if j.id == job_id)

    def finish(
        self,
        job_id: str,
        *,
        ran: Collection[str] | None = None,
        errored: Mapping[str, tuple[int, str]] | None = None,
        status: str = "completed",
        order: str = "shuffled",
    ) -> None:
        """End a job: the requests in *ran* (default all) are answered, those in *errored*
        fail with (status, message), the rest did not run (the job *status* is expired or
        cancelled); results come out ``shuffled``, in ``input`` order or ``reversed``."""
        with self.owner._changed:
            job = next(j for j in self.jobs if j.id == job_id)
            self._finish(job, ran, errored or {}, status, order)
            self.owner._changed.notify_all()

    def fail(self, job_id: str, message: str) -> None:
        """End a job as failed as a whole (OpenAI's validation failure)."""
        with self.owner._changed:
            job = next(j for j in self.jobs if j.id == job_id)
            job.status, job.failure = "failed", message
            self.owner._changed.notify_all()

    # --- the finished job's lines -----------------------------------------------------------

    def _finish(
        self,
        job: Job,
        ran: Collection[str] | None,
        errored: Mapping[str, tuple[int, str]],
        status: str,
        order: str,
    ) -> None:
        from _llm_server import Request, _AnthropicReply, _OpenAIReply

        requests = list(job.requests)
        if order == "shuffled":
            self._random.shuffle(requests)
        elif order == "reversed":
            requests.reverse()
        answer = self.answer or self.owner.default
        lines, errors = [], []
        for n, (cid, body) in enumerate(requests):
            if cid in errored:
                code, message = errored[cid]
                lines.append(_error_line(job.protocol, cid, n, code, message))
                continue
            if ran is not None and cid not in ran:
                if job.protocol == "anthropic":
                    kind = "expired" if status == "expired" else "canceled"
                    lines.append({"custom_id": cid, "result": {"type": kind}})
                elif status == "expired":  # a cancelled job's lines are in neither file
                    errors.append(
                        {
                            "id": f"batch_req_{n}",
                            "custom_id": cid,
                            "response": None,
                            "error": {
                                "code": "batch_expired",
                                "message": "This request could not be executed before the "
                                "completion window expired.",
                            },
                        }
                    )
                continue
            path = "/v1/messages" if job.protocol == "anthropic" else "/v1/chat/completions"
            request = Request("POST", path, {}, body)
            if job.protocol == "anthropic":
                reply: Any = _AnthropicReply(None, request, answer(request), n)  # type: ignore[arg-type]
                lines.append(
                    {"custom_id": cid, "result": {"type": "succeeded", "message": reply.body()}}
                )
            else:
                reply = _OpenAIReply(None, request, answer(request), n)  # type: ignore[arg-type]
                lines.append(
                    {
                        "id": f"batch_req_{n}",
                        "custom_id": cid,
                        "response": {
                            "status_code": 200,
                            "request_id": f"req_{n}",
                            "body": reply.body(),
                        },
                        "error": None,
                    }
                )
        if job.protocol == "openai":
            # Failed requests go to the error file, with the lines that did not run.
            errors = [line for line in lines if line["response"]["status_code"] != 200] + errors
            lines = [line for line in lines if line["response"]["status_code"] == 200]
        job.lines, job.errors, job.status = lines, errors, status

    # --- the wire ----------------------------------------------------------------------------

    def handles(self, path: str) -> bool:
        return path.startswith(("/v1/files", "/v1/batches", "/v1/messages/batches"))

    def post(self, handler: Any, path: str, raw: bytes) -> None:
        with self.owner._changed:
            self.calls.append(("POST", path))
            status, body = self._post(handler, path, raw)
            self.owner._changed.notify_all()
        handler.send_json(status, body)

    def get(self, handler: Any, path: str) -> None:
        with self.owner._changed:
            self.calls.append(("GET", path))
            content_path = path.startswith("/v1/files/") and path.endswith("/content")
            results_path = path.startswith("/v1/messages/batches/") and path.endswith("/results")
            if content_path or results_path:
                data = self._content(path)
            else:
                status, body = self._show(path)
            self.owner._changed.notify_all()
        if content_path or results_path:
            if data is None:
                handler.send_json(404, _openai_error("no such file"))
                return
            handler.send_response(200)
            handler.send_header("content-type", "application/octet-stream")
            handler.send_header("content-length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        handler.send_json(status, body)

    def _post(self, handler: Any, path: str, raw: bytes) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if path == "/v1/files":
            fields = _multipart(handler.headers.get("content-type", ""), raw)
            file_id = f"file-{next(self._ids)}"
            self.files[file_id] = fields["file"]
            return 200, {
                "id": file_id,
                "object": "file",
                "bytes": len(fields["file"]),
                "created_at": 1700000000,
                "filename": "batch.jsonl",
                "purpose": fields.get("purpose", b"").decode(),
                "status": "processed",
            }
        body = json.loads(raw) if raw else {}
        if path == "/v1/batches":
            data = self.files.get(body.get("input_file_id", ""))
            if data is None:
                return 404, _openai_error("no such input file")
            requests = []
            for text in data.decode().splitlines():
                line = json.loads(text)
                if line["url"] != body["endpoint"] or line["method"] != "POST":
                    return 400, _openai_error(f"line {line['custom_id']} is not for the endpoint")
                requests.append((line["custom_id"], line["body"]))
            return self._create("openai", requests, body["input_file_id"])
        if path == "/v1/messages/batches":
            requests = [(r["custom_id"], r["params"]) for r in body["requests"]]
            return self._create("anthropic", requests, None)
        if len(parts) in (4, 5) and parts[-1] == "cancel":
            return self._cancel(parts[-2])
        return 404, _openai_error(f"no route {path}")

    def _create(
        self, protocol: str, requests: list[tuple[str, dict[str, Any]]], file_id: str | None
    ) -> tuple[int, Any]:
        ids = [cid for cid, _ in requests]
        if len(set(ids)) != len(ids):
            return 400, _openai_error("custom_id values must be unique within a batch")
        if any(len(cid) > 64 for cid in ids):
            return 400, _openai_error("custom_id is longer than 64 characters")
        prefix = "msgbatch" if protocol == "anthropic" else "batch"
        job = Job(f"{prefix}_{next(self._ids)}", protocol, requests, file_id)
        if protocol == "openai" and len({b.get("model") for _, b in requests}) > 1:
            job.status, job.failure = "failed", "one model per batch file"
        self.jobs.append(job)
        self.submitted.extend(ids)
        if self.auto and not job.ended:
            self._finish(job, None, {}, "completed", "shuffled")
        return 200, self._describe(job)

    def _cancel(self, job_id: str) -> tuple[int, Any]:
        job = next((j for j in self.jobs if j.id == job_id), None)
        if job is None:
            return 404, _openai_error("no such batch")
        self.cancelled.append(job_id)
        if not job.ended:
            job.status = "cancelling"
            if self.cancel_ends:
                self._finish(job, (), {}, "cancelled", "shuffled")
        return 200, self._describe(job)

    def _show(self, path: str) -> tuple[int, Any]:
        job_id = path.rstrip("/").rsplit("/", 1)[-1]
        job = next((j for j in self.jobs if j.id == job_id), None)
        if job is None:
            return 404, _openai_error("no such batch")
        return 200, self._describe(job)

    def _content(self, path: str) -> bytes | None:
        if path.startswith("/v1/files/"):
            file_id = path.split("/")[3]
            return self.files.get(file_id)
        job = next((j for j in self.jobs if j.id == path.split("/")[4]), None)
        if job is None or not job.ended:
            return None
        return b"".join(json.dumps(line).encode() + b"\n" for line in job.lines)

    def _describe(self, job: Job) -> dict[str, Any]:
        if job.protocol == "anthropic":
            return self._anthropic(job)
        output = error = None
        if job.ended and job.status != "failed":
            output = self._file(job.lines)
            error = self._file(job.errors)
        failed = sum(1 for line in job.errors if line["response"] is not None)
        return {
            "id": job.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": {"object": "list", "data": [{"message": job.failure}]}
            if job.failure
            else None,
            "input_file_id": job.input_file_id,
            "completion_window": "24h",
            "status": job.status,
            "output_file_id": output,
            "error_file_id": error,
            "created_at": 1700000000,
            "request_counts": {
                "total": len(job.requests),
                "completed": len(job.lines),
                "failed": failed,
            },
        }

    def _file(self, lines: list[dict[str, Any]]) -> str | None:
        if not lines:
            return None
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        return file_id

    def _anthropic(self, job: Job) -> dict[str, Any]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if job.ended:
            for line in job.lines:
                counts[line["result"]["type"]] += 1
        else:
            counts["processing"] = len(job.requests)
        created = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
        status = {"in_progress": "in_progress", "cancelling": "canceling"}.get(job.status, "ended")
        ended = status == "ended"
        return {
            "id": job.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "created_at": created.isoformat(),
            "expires_at": (created + dt.timedelta(hours=24)).isoformat(),
            "ended_at": created.isoformat() if ended else None,
            "cancel_initiated_at": None,
            "archived_at": None,
            "results_url": f"{self.owner.url}/v1/messages/batches/{job.id}/results"
            if ended
            else None,
        }


def _error_line(protocol: str, cid: str, n: int, code: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 429: "rate_limit_error", 500: "api_error"}.get(
        code, "api_error"
    )
    if protocol == "anthropic":
        error = {"type": "error", "error": {"type": kind, "message": message}}
        return {"custom_id": cid, "result": {"type": "errored", "error": error}}
    return {
        "id": f"batch_req_{n}",
        "custom_id": cid,
        "response": {"status_code": code, "request_id": f"req_{n}", "body": _openai_error(message)},
        "error": None,
    }


def _openai_error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None}}


def _multipart(content_type: str, raw: bytes) -> dict[str, bytes]:
    """The fields of a multipart/form-data body."""
    head = f"content-type: {content_type}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + raw)
    fields: dict[str, bytes] = {}
    for part in message.iter_parts():  # type: ignore[attr-defined]
        name = part.get_param("name", header="content-disposition")
        fields[str(name)] = part.get_payload(decode=True) or b""
    return fields
