"""Tenant isolation over HTTP: two accounts, A and B, each a reseller with sub-keys.

Every route that reads or changes something that belongs to a key is tried with B's keys
against A's objects (usage, summaries, statements, sub-keys, jobs, their results and items,
idempotent replays); B gets 404 or its own data, and no response body B receives holds any of
A's names, client references, request or job ids. A sub-key sees only its own usage and jobs,
never its parent's or a sibling's (docs/api.md: "a sub-key only its own calls"); the parent
sees its whole account. The admin API answers only to the admin token.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.utils import Server, linked_weights, start_server, stop_server

ADMIN_TOKEN = "tenants-admin-token-0123456789"
ALL_SCOPES = ["remove-background", "upscale", "inpaint", "keys:children"]
ERASE = {"mask_boxes": "[[4, 4, 8, 8]]", "model": "opencv-telea"}


def small_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 40, 40)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tenants_server(
    tmp_path_factory: pytest.TempPathFactory, repo_weights: Path
) -> Iterator[Server]:
    """A real server; erasing with OpenCV needs no model, so nothing is preloaded."""
    tmp = tmp_path_factory.mktemp("tenants")
    srv = start_server(
        tmp,
        linked_weights(tmp / "weights", repo_weights, None),
        IMGSVC_ADMIN_TOKEN=ADMIN_TOKEN,
        IMGSVC_PRELOAD_MODELS="false",
        IMGSVC_DEFAULT_RATE_LIMIT="100000/minute",
        IMGSVC_KEY_CACHE_SECONDS="0",
        IMGSVC_JOBS_DIR=str(tmp / "jobs"),
        IMGSVC_JOB_SWEEP_SECONDS="0.5",
    )
    yield srv
    stop_server(srv)


@dataclass
class Key:
    secret: str
    id: int
    name: str


@dataclass
class Tenant:
    root: Key
    children: list[Key]
    request_ids: list[str] = field(default_factory=list)
    client_refs: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    item_names: list[str] = field(default_factory=list)

    @property
    def key_ids(self) -> set[int]:
        return {self.root.id, *(c.id for c in self.children)}

    def secrets(self) -> list[str]:
        """Strings that must never reach another tenant."""
        names = [self.root.name, *(c.name for c in self.children)]
        return [
            *names,
            *self.request_ids,
            *self.client_refs,
            *self.job_ids,
            *self.item_names,
            self.root.secret[:10],
            *(c.secret[:10] for c in self.children),
        ]


def client(server: Server, key: str) -> httpx.Client:
    return server.client(key)


def admin(server: Server) -> httpx.Client:
    return server.client(ADMIN_TOKEN)


def make_tenant(server: Server, tag: str) -> Tenant:
    with admin(server) as a:
        r = a.post(
            "/v1/admin/keys",
            json={"name": f"tenant-{tag}-root", "credits": 10_000, "scopes": ALL_SCOPES},
        )
        assert r.status_code == 201, r.text
    root = Key(r.json()["key"], r.json()["info"]["id"], f"tenant-{tag}-root")
    children = []
    with client(server, root.secret) as c:
        for n in (1, 2):
            name = f"tenant-{tag}-client-{n}"
            made = c.post("/v1/keys", json={"name": name, "monthly_cap": 5000})
            assert made.status_code == 201, made.text
            children.append(Key(made.json()["key"], made.json()["info"]["id"], name))
    return Tenant(root, children)


def erase_call(
    server: Server, key: str, ref: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    with client(server, key) as c:
        return c.post(
            "/v1/inpaint",
            data=ERASE,
            files={"image": ("x.png", small_png(), "image/png")},
            headers={"X-Client-Ref": ref, **(headers or {})},
        )


def submit_job(server: Server, key: str, names: list[str], ref: str) -> str:
    with client(server, key) as c:
        r = c.post(
            "/v1/jobs",
            data={"operation": "inpaint", **ERASE},
            files=[("files", (name, small_png(), "image/png")) for name in names],
            headers={"X-Client-Ref": ref},
        )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def wait_job(server: Server, key: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    with client(server, key) as c:
        while time.monotonic() < deadline:
            job: dict[str, Any] = c.get(f"/v1/jobs/{job_id}").json()
            if job["status"] not in ("queued", "running"):
                return job
            time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


@dataclass
class World:
    server: Server
    a: Tenant
    b: Tenant
    a_job: str  # finished
    a_child_job: str  # a sub-key's, finished
    a_idem_key: str
    month: str


@pytest.fixture(scope="module")
def world(tenants_server: Server) -> World:
    server = tenants_server
    a, b = make_tenant(server, "a"), make_tenant(server, "b")
    idem = "a-idempotency-key-0001"
    for key, ref, headers in (
        (a.root, "a-ref-root", {"Idempotency-Key": idem}),
        (a.children[0], "a-ref-client-1", {}),
        (a.children[1], "a-ref-client-2", {}),
    ):
        r = erase_call(server, key.secret, ref, headers)
        assert r.status_code == 200, r.text
        a.request_ids.append(r.headers["x-request-id"])
        a.client_refs.append(ref)
    b_call = erase_call(server, b.root.secret, "b-ref-root")
    assert b_call.status_code == 200, b_call.text
    a.item_names = ["a-secret-photo.png", "a-child-secret.png"]
    a_job = submit_job(server, a.root.secret, a.item_names[:1], "a-ref-job")
    a_child_job = submit_job(server, a.children[0].secret, a.item_names[1:], "a-ref-child-job")
    a.job_ids = [a_job, a_child_job]
    a.client_refs += ["a-ref-job", "a-ref-child-job"]
    for key, job_id in ((a.root, a_job), (a.children[0], a_child_job)):
        assert wait_job(server, key.secret, job_id)["status"] == "succeeded"
    month = datetime.now(UTC).strftime("%Y-%m")
    return World(server, a, b, a_job, a_child_job, idem, month)


def b_keys(w: World) -> list[Key]:
    return [w.b.root, *w.b.children]


def assert_nothing_of(tenant: Tenant, r: httpx.Response, *, allowed: tuple[str, ...] = ()) -> None:
    text = r.text
    for secret in tenant.secrets():
        if secret not in allowed:
            assert secret not in text, f"{r.request.method} {r.request.url.path} shows {secret!r}"


def usage_rows(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    rows: list[dict[str, Any]] = r.json()["data"]
    return rows


# --- B against A ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs/{job}"),
        ("DELETE", "/v1/jobs/{job}"),
        ("POST", "/v1/jobs/{job}/cancel"),
        ("GET", "/v1/jobs/{job}/result"),
        ("GET", "/v1/jobs/{job}/items/1"),
    ],
)
def test_another_tenants_job_is_not_found(world: World, method: str, path: str) -> None:
    for job in (world.a_job, world.a_child_job):
        for key in b_keys(world):
            with client(world.server, key.secret) as c:
                r = c.request(method, path.format(job=job))
            assert r.status_code == 404, (key.name, r.text)
            assert r.json()["error"]["code"] == "not_found"
            assert_nothing_of(world.a, r, allowed=(job,))
    with client(world.server, world.a.root.secret) as c:  # still A's, and untouched
        job = c.get(f"/v1/jobs/{world.a_job}").json()
        assert job["status"] == "succeeded" and job["progress"]["canceled"] == 0
        assert c.get(f"/v1/jobs/{world.a_job}/items/1").status_code == 200


def test_a_queued_job_cannot_be_canceled_by_another_tenant(world: World) -> None:
    names = [f"a-batch-{n}.png" for n in range(8)]
    job_id = submit_job(world.server, world.a.root.secret, names, "a-ref-batch")
    world.a.job_ids.append(job_id)
    world.a.item_names += names
    with client(world.server, world.b.root.secret) as c:
        assert c.delete(f"/v1/jobs/{job_id}").status_code == 404
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
    done = wait_job(world.server, world.a.root.secret, job_id)
    assert done["status"] == "succeeded" and done["progress"]["succeeded"] == len(names)


def test_job_lists_hold_only_the_callers_jobs(world: World) -> None:
    for key in b_keys(world):
        with client(world.server, key.secret) as c:
            r = c.get("/v1/jobs", params={"limit": 100})
        assert r.status_code == 200
        assert not {j["id"] for j in r.json()["jobs"]} & set(world.a.job_ids)
        assert_nothing_of(world.a, r)
    with client(world.server, world.a.root.secret) as c:  # the check can fail: A sees its own
        assert world.a_job in {j["id"] for j in c.get("/v1/jobs").json()["jobs"]}


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"format": "csv"},
        {"client_ref": "a-ref-root"},
        {"operation": "inpaint", "limit": 100_000},
    ],
)
def test_usage_shows_only_the_callers_account(world: World, params: dict[str, Any]) -> None:
    a_ids = [world.a.root.id, *(k.id for k in world.a.children)]
    for key in b_keys(world):
        for extra in ({}, *({"key_id": i} for i in a_ids)):
            with client(world.server, key.secret) as c:
                r = c.get("/v1/usage", params={**params, **extra})
            assert r.status_code == 200, r.text
            assert_nothing_of(world.a, r)
            if params.get("format") != "csv":
                assert not {row["key_id"] for row in usage_rows(r)} & world.a.key_ids


@pytest.mark.parametrize("group_by", ["day", "operation", "client_ref", "key"])
def test_usage_summary_counts_only_the_callers_account(world: World, group_by: str) -> None:
    for key in b_keys(world):
        with client(world.server, key.secret) as c:
            r = c.get("/v1/usage/summary", params={"group_by": group_by})
            by_a_key = c.get(
                "/v1/usage/summary", params={"group_by": group_by, "key_id": world.a.root.id}
            )
        assert r.status_code == 200 and by_a_key.status_code == 200
        assert_nothing_of(world.a, r)
        own = usage_rows(c_get(world.server, key.secret, "/v1/usage"))
        assert r.json()["total_calls"] == len(own), r.json()
        assert by_a_key.json()["total_calls"] == 0
        if group_by == "key":
            assert not {int(g["group"]) for g in r.json()["data"]} & world.a.key_ids


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_statements_hold_only_the_callers_calls(world: World, fmt: str) -> None:
    for key in b_keys(world):
        with client(world.server, key.secret) as c:
            r = c.get(f"/v1/statements/{world.month}", params={"format": fmt})
        assert r.status_code == 200, r.text
        assert_nothing_of(world.a, r)
        if fmt == "json":
            own = usage_rows(c_get(world.server, key.secret, "/v1/usage"))
            assert r.json()["total_calls"] == len(own)


def test_sub_keys_of_another_tenant_cannot_be_seen_or_revoked(world: World) -> None:
    with client(world.server, world.b.root.secret) as c:
        listed = c.get("/v1/keys")
        assert listed.status_code == 200
        assert {k["id"] for k in listed.json()} == {k.id for k in world.b.children}
        assert_nothing_of(world.a, listed)
        for target in (*world.a.children, world.a.root):
            r = c.delete(f"/v1/keys/{target.id}")
            assert r.status_code == 404, r.text
            assert_nothing_of(world.a, r)
            usage = c.get(f"/v1/keys/{target.id}/usage")
            assert usage.status_code == 404, usage.text
            assert_nothing_of(world.a, usage)
    for target in (*world.a.children, world.a.root):  # still working
        with client(world.server, target.secret) as c:
            assert c.get("/v1/account").status_code == 200


def test_account_is_the_callers_own(world: World) -> None:
    for key in b_keys(world):
        with client(world.server, key.secret) as c:
            r = c.get("/v1/account")
        assert r.status_code == 200 and r.json()["id"] == key.id
        assert_nothing_of(world.a, r)


def test_an_idempotency_key_is_per_api_key(world: World) -> None:
    """B sending A's Idempotency-Key with A's very request gets its own call, not A's answer."""
    before = balance(world.server, world.b.root.secret)
    r = erase_call(
        world.server,
        world.b.root.secret,
        "a-ref-root",
        {"Idempotency-Key": world.a_idem_key},
    )
    assert r.status_code == 200, r.text
    assert "idempotent-replayed" not in r.headers
    assert r.headers["x-request-id"] not in world.a.request_ids
    assert balance(world.server, world.b.root.secret) == before - int(
        r.headers["x-credits-charged"]
    )


def test_a_request_id_of_another_tenant_is_not_reused(world: World) -> None:
    """B sending one of A's request ids as X-Request-Id: the call works and A's usage row stays
    A's (request ids are unique in the ledger)."""
    stolen = world.a.request_ids[0]
    r = erase_call(world.server, world.b.root.secret, "b-ref-stolen", {"X-Request-Id": stolen})
    assert r.status_code == 200, r.text
    with client(world.server, world.a.root.secret) as c:
        rows = usage_rows(c.get("/v1/usage", params={"client_ref": "a-ref-root"}))
    assert [row["request_id"] for row in rows] == [stolen]
    assert {row["key_id"] for row in rows} == {world.a.root.id}


def c_get(server: Server, key: str, path: str) -> httpx.Response:
    with client(server, key) as c:
        return c.get(path)


def balance(server: Server, key: str) -> int:
    with client(server, key) as c:
        return int(c.get("/v1/account").json()["credits"])


# --- a sub-key against its parent and its siblings -----------------------------------------


def test_a_sub_key_sees_only_its_own_usage(world: World) -> None:
    child, sibling = world.a.children
    with client(world.server, child.secret) as c:
        rows = usage_rows(c.get("/v1/usage"))
        by_sibling = usage_rows(c.get("/v1/usage", params={"key_id": sibling.id}))
        by_parent = usage_rows(c.get("/v1/usage", params={"key_id": world.a.root.id}))
        summary = c.get("/v1/usage/summary", params={"group_by": "key"}).json()
        statement = c.get(f"/v1/statements/{world.month}", params={"format": "csv"})
    assert rows and {r["key_id"] for r in rows} == {child.id}
    # a sub-key's key_id filter cannot widen its view: it still gets its own rows only
    assert {r["key_id"] for r in by_sibling + by_parent} <= {child.id}
    assert {g["group"] for g in summary["data"]} == {str(child.id)}
    assert "a-ref-client-2" not in statement.text and "a-ref-root" not in statement.text
    assert "a-ref-client-1" in statement.text
    with client(world.server, world.a.root.secret) as c:  # the parent sees its whole account
        seen = {r["key_id"] for r in usage_rows(c.get("/v1/usage"))}
    assert world.a.key_ids <= seen


def test_a_sub_key_cannot_manage_keys_nor_see_other_jobs(world: World) -> None:
    child, sibling = world.a.children
    with client(world.server, child.secret) as c:
        assert c.get("/v1/keys").status_code == 403
        assert c.delete(f"/v1/keys/{sibling.id}").status_code == 403
        assert c.get(f"/v1/keys/{sibling.id}/usage").status_code == 403
        assert c.post("/v1/keys", json={"name": "grandchild"}).status_code == 403
        assert c.get(f"/v1/jobs/{world.a_job}").status_code == 404  # the parent's job
        listed = {j["id"] for j in c.get("/v1/jobs").json()["jobs"]}
    assert listed == {world.a_child_job}
    with client(world.server, sibling.secret) as c:
        for path in ("", "/result", "/items/1"):
            assert c.get(f"/v1/jobs/{world.a_child_job}{path}").status_code == 404
        assert c.delete(f"/v1/jobs/{world.a_child_job}").status_code == 404


# --- the admin API -------------------------------------------------------------------------

ADMIN_CALLS = [
    ("GET", "/v1/admin/keys", None),
    ("POST", "/v1/admin/keys", {"name": "intruder", "credits": 10**6}),
    ("GET", "/v1/admin/usage", None),
    ("GET", "/v1/admin/usage/summary", None),
    ("POST", "/v1/admin/keys/{a}/topup", {"credits": 10**6}),
    ("POST", "/v1/admin/keys/{a}/revoke", None),
    ("POST", "/v1/admin/keys/{a}/rotate", {"old_valid_for_seconds": 0}),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS)
def test_the_admin_api_answers_only_the_admin_token(
    world: World, method: str, path: str, body: dict[str, Any] | None
) -> None:
    url = path.format(a=world.a.root.id)
    before = balance(world.server, world.a.root.secret)
    attempts: list[dict[str, str]] = [
        {},
        {"Authorization": f"Bearer {world.b.root.secret}"},
        {"X-API-Key": world.b.root.secret},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
        {"Authorization": ADMIN_TOKEN},
        {"X-API-Key": ADMIN_TOKEN},
    ]
    with httpx.Client(base_url=world.server.url, timeout=60) as c:
        for headers in attempts:
            r = c.request(method, url, json=body, headers=headers)
            assert r.status_code == 401, (headers.keys(), r.text)
            assert r.json()["error"]["code"] == "unauthorized"
            assert_nothing_of(world.a, r)
    assert balance(world.server, world.a.root.secret) == before  # not revoked, not topped up
    with admin(world.server) as c:
        names = {k["name"] for k in c.get("/v1/admin/keys").json()}
    assert "intruder" not in names
    assert {world.a.root.name, world.b.root.name} <= names  # the token itself works
