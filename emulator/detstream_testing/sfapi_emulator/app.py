"""ASGI app speaking the Superfacility API (v1.2) the way sfapi_client 0.6.0 uses it.

Routes: the OAuth2 token endpoint (private-key JWT client credentials), ``status``,
``account/``, ``compute/jobs`` (submit, squeue/sacct queries, cancel), ``tasks``, and an
unauthenticated ``/_emulator`` admin API for fault injection and debugging.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from typing import Dict, List, Optional
from urllib.parse import parse_qsl

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from .state import PUBLIC_HOSTS, AuthError, EmulatorState

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1.2"
TOKEN_PATH = "/c2id/token"
ADMIN_PREFIX = "/_emulator"
_REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


async def _form(request: Request) -> Dict[str, str]:
    """Fields of an application/x-www-form-urlencoded body (last value wins, like most servers)."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return dict(parse_qsl(body, keep_blank_values=True))


async def _form_multi(request: Request) -> Dict[str, List[str]]:
    body = (await request.body()).decode("utf-8", errors="replace")
    out: Dict[str, List[str]] = {}
    for k, v in parse_qsl(body, keep_blank_values=True):
        out.setdefault(k, []).append(v)
    return out


def _bool(value: Optional[str], default: bool = False) -> bool:
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _require_token(state: EmulatorState, request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    client_id = state.check_token(token.strip()) if scheme.lower() == "bearer" else None
    if client_id is None:
        raise HTTPException(401, detail="Could not validate credentials: token missing, invalid or expired",
                            headers={"WWW-Authenticate": "Bearer"})
    return client_id


def _check_host(machine: str) -> None:
    if machine not in PUBLIC_HOSTS:
        raise HTTPException(422, detail=[{
            "loc": ["path", "machine"], "type": "enum",
            "msg": f"Input should be {', '.join(repr(h) for h in PUBLIC_HOSTS)}"}])


def create_app(state: EmulatorState) -> FastAPI:
    """The emulator's FastAPI app over ``state``; shutting the app down cancels every job."""

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await run_in_threadpool(state.shutdown)

    app = FastAPI(title="Superfacility API emulator", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.emulator = state

    @app.middleware("http")
    async def faults_and_accounting(request: Request, call_next):
        path = request.url.path
        if path.startswith(ADMIN_PREFIX):
            return await call_next(request)
        scope = "token" if path == TOKEN_PATH else "api"
        fault = state.take_http_error(scope)
        if fault is not None:
            status, retry_after = fault
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            reason = _REASONS.get(status, "Error")
            response = PlainTextResponse(f"<html><body><h1>{status} {reason}</h1></body></html>",
                                         status_code=status, headers=headers, media_type="text/html")
        else:
            response = await call_next(request)
        state.record_request(request.method, path, response.status_code)
        return response

    # -- OAuth2 token endpoint ---------------------------------------------------------------

    @app.post(TOKEN_PATH)
    async def token(request: Request):
        form = await _form(request)
        audiences = [str(request.url.replace(query="")), getattr(app.state, "token_url", None)]
        try:
            client_id = await run_in_threadpool(state.authenticate_client, form, audiences)
        except AuthError as exc:
            return JSONResponse({"error": exc.error, "error_description": exc.description},
                                status_code=exc.status, headers={"Cache-Control": "no-store"})
        return JSONResponse(state.issue_token(client_id),
                            headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    # -- status (public, as in the real API) -------------------------------------------------

    @app.get(API_PREFIX + "/status")
    def status_all():
        return state.machine_status()

    @app.get(API_PREFIX + "/status/outages/planned")
    def planned_outages_all():
        return [[] for _ in state.machine_status()]

    @app.get(API_PREFIX + "/status/outages/planned/{name}")
    def planned_outages(name: str):
        return []

    @app.get(API_PREFIX + "/status/outages")
    def outages_all():
        return [state.outages(m["name"]) for m in state.machine_status()]

    @app.get(API_PREFIX + "/status/outages/{name}")
    def outages(name: str):
        return state.outages(name)

    @app.get(API_PREFIX + "/status/notes")
    def notes_all():
        return [[{"name": m["name"], "notes": n, "active": True, "timestamp": m["updated_at"]}
                 for n in m["notes"]] for m in state.machine_status()]

    @app.get(API_PREFIX + "/status/notes/{name}")
    def notes(name: str):
        m = state.machine_status(name) or {"notes": [], "updated_at": None}
        return [{"name": name, "notes": n, "active": True, "timestamp": m["updated_at"]} for n in m["notes"]]

    @app.get(API_PREFIX + "/status/{name}")
    def status_one(name: str):
        m = state.machine_status(name)
        if m is None:
            raise HTTPException(404, detail=f"Resource {name} not found")
        return m

    # -- account -----------------------------------------------------------------------------

    @app.get(API_PREFIX + "/account/")
    @app.get(API_PREFIX + "/account")
    def account(request: Request, username: Optional[str] = None):
        _require_token(state, request)
        return {"uid": os.getuid(), "name": username or state.user, "firstname": None,
                "lastname": None, "middlename": None, "workphone": None, "otherPhones": [],
                "email": None}

    # -- compute -----------------------------------------------------------------------------

    @app.post(API_PREFIX + "/compute/jobs/{machine}")
    async def submit(machine: str, request: Request):
        _require_token(state, request)
        _check_host(machine)
        form = await _form_multi(request)
        script = (form.get("job") or [""])[-1]
        if not script:
            raise HTTPException(422, detail=[{"loc": ["body", "job"], "msg": "Field required",
                                              "type": "missing"}])
        is_path = _bool((form.get("isPath") or ["true"])[-1], default=True)
        task_id = await run_in_threadpool(state.submit_job, machine, script, is_path,
                                          form.get("args", []))
        return {"task_id": task_id, "status": "OK", "error": None}

    @app.get(API_PREFIX + "/compute/jobs/{machine}")
    def jobs(machine: str, request: Request, sacct: Optional[str] = None,
             cached: Optional[str] = None, index: Optional[int] = None):
        _require_token(state, request)
        _check_host(machine)
        down = state._unavailable(machine)
        if down:
            return {"status": "ERROR", "output": [], "error": down}
        filters: Dict[str, str] = {}
        for kw in request.query_params.getlist("kwargs"):
            key, _, value = kw.partition("=")
            filters[key.strip()] = value.strip()
        jobids = filters["jobid"].split(",") if filters.get("jobid") else None
        rows = state.job_records(machine, _bool(sacct), jobids=jobids, user=filters.get("user"),
                                 partition=filters.get("partition"))  # ``index`` is accepted, unused
        return {"status": "OK", "output": rows, "error": None}

    @app.get(API_PREFIX + "/compute/jobs/{machine}/{jobid}")
    def job(machine: str, jobid: str, request: Request, sacct: Optional[str] = None,
            cached: Optional[str] = None):
        _require_token(state, request)
        _check_host(machine)
        down = state._unavailable(machine)
        if down:
            return {"status": "ERROR", "output": [], "error": down}
        rows = state.job_records(machine, _bool(sacct), jobids=[jobid])
        return {"status": "OK", "output": rows, "error": None}

    @app.delete(API_PREFIX + "/compute/jobs/{machine}/{jobid}")
    def cancel(machine: str, jobid: str, request: Request):
        _require_token(state, request)
        _check_host(machine)
        down = state._unavailable(machine)
        error = down or state.cancel_job(machine, jobid)
        return {"status": "ERROR" if error else "OK", "output": "", "error": error}

    # -- tasks -------------------------------------------------------------------------------

    @app.get(API_PREFIX + "/tasks/")
    @app.get(API_PREFIX + "/tasks")
    def tasks(request: Request):
        _require_token(state, request)
        return {"tasks": state.tasks()}

    @app.get(API_PREFIX + "/tasks/{task_id}")
    def task(task_id: str, request: Request):
        _require_token(state, request)
        t = state.task(task_id)
        if t is None:
            raise HTTPException(404, detail=f"Task {task_id} not found")
        return t

    # -- admin API (loopback only; no auth) ---------------------------------------------------

    @app.get(ADMIN_PREFIX + "/state")
    def admin_state():
        return state.snapshot()

    @app.post(ADMIN_PREFIX + "/faults")
    async def admin_faults(request: Request):
        """Set any of: token_lifetime, start_delay, never_start, hide_new_jobs_polls, task_delay,
        kill_grace; ``http_errors: {status, count, scope, retry_after}``; ``clear_http_errors``."""
        body = await request.json()
        for name, cast in (("token_lifetime", float), ("start_delay", float), ("never_start", bool),
                           ("hide_new_jobs_polls", int), ("task_delay", float), ("kill_grace", float)):
            if name in body:
                setattr(state, name, cast(body[name]))
        if body.get("clear_http_errors"):
            state.clear_http_errors()
        if body.get("http_errors"):
            e = body["http_errors"]
            try:
                state.inject_http_errors(int(e.get("status", 503)), int(e.get("count", 1)),
                                         e.get("scope", "api"), e.get("retry_after"))
            except ValueError as exc:
                raise HTTPException(400, detail=str(exc)) from exc
        return state.snapshot()

    @app.post(ADMIN_PREFIX + "/machines/{name}")
    async def admin_machine(name: str, request: Request):
        body = await request.json()
        try:
            state.set_machine_status(name, body.get("status", "active"), body.get("notes", []),
                                     body.get("description"))
        except ValueError as exc:
            raise HTTPException(400, detail=str(exc)) from exc
        return state.machine_status(name)

    @app.post(ADMIN_PREFIX + "/tokens/revoke")
    def admin_revoke():
        return {"revoked": state.revoke_tokens()}

    @app.post(ADMIN_PREFIX + "/clients")
    async def admin_client(request: Request):
        body = await request.json()
        try:
            state.register_client(body["client_id"], body["public_key_pem"])
        except (KeyError, ValueError) as exc:
            raise HTTPException(400, detail=f"bad client registration: {exc}") from exc
        return {"client_id": body["client_id"]}

    @app.get(ADMIN_PREFIX + "/jobs")
    def admin_jobs():
        return [j.to_dict() for j in state.runner.jobs()]

    @app.get(ADMIN_PREFIX + "/jobs/{jobid}")
    def admin_job(jobid: str):
        job = state.runner.get(jobid)
        if job is None:
            raise HTTPException(404, detail="no such job")
        return dict(job.to_dict(), live_pids=sorted(state.runner.live_pids(jobid)))

    @app.get(ADMIN_PREFIX + "/jobs/{jobid}/output")
    def admin_job_output(jobid: str):
        out = state.job_output(jobid)
        if out is None:
            raise HTTPException(404, detail="no such job")
        return out

    @app.post(ADMIN_PREFIX + "/jobs/{jobid}/release")
    def admin_release(jobid: str):
        if not state.release_job(jobid):
            raise HTTPException(404, detail="no such job")
        return {"released": jobid}

    @app.get(ADMIN_PREFIX + "/requests")
    def admin_requests():
        return [{"time": t, "method": m, "path": p, "status": s} for t, m, p, s in list(state.request_log)]

    return app
