"""Small edges of the HTTP surface, through a real client: which routes are public, 401 versus 403,
error bodies that name a real field and never echo the request body, and ids with ``+`` in a query."""

from __future__ import annotations

import httpx
from tests.integration.server.conftest import ADMIN


def test_docs_pages_are_off_and_the_schema_is_public(live):
    for path in ("/docs", "/redoc"):
        r = httpx.get(live.url + path)
        assert r.status_code == 404 and "<script" not in r.text
    r = httpx.get(live.url + "/openapi.json")
    assert r.status_code == 200 and "/v1/chat/completions" in r.json()["paths"]
    assert "/openapi.json" in httpx.get(live.url + "/no-such-route").json()["error"]["message"]


def test_key_routes_answer_401_to_an_unknown_key_and_403_to_a_tenant_key(live):
    tenant = live.new_key("edges")
    for method, path in (("POST", "/v1/keys"), ("GET", "/v1/keys"), ("DELETE", "/v1/keys/k1")):
        kw = {"json": {"name": "x"}} if method == "POST" else {}
        bad = httpx.request(method, live.url + path, headers={"Authorization": "Bearer not-a-key"}, **kw)
        assert bad.status_code == 401, (path, bad.text)
        assert bad.json()["error"]["code"] == "invalid_api_key"
        other = httpx.request(method, live.url + path, headers={"Authorization": f"Bearer {tenant}"}, **kw)
        assert other.status_code == 403, (path, other.text)
    assert httpx.get(live.url + "/v1/keys", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200


def test_a_missing_or_non_json_body_names_no_blank_field_and_is_not_echoed(live):
    with live.client(live.new_key("edges2")) as c:
        for path in ("/v1/feedback", "/v1/profiles", "/v1/chat/completions"):
            r = c.post(path)
            e = r.json()["error"]
            assert r.status_code == 400 and "``" not in e["message"] and "JSON object" in e["message"], e
            secret = "my-private-text-" + "z" * 40
            r = c.post(path, content=secret, headers={"Content-Type": "text/plain"})
            assert r.status_code == 400 and secret[:16] not in r.text, r.text
        r = c.post("/v1/profiles", json={})  # a real field is still named
        assert r.json()["error"]["param"] == "user" and "`user` is required" in r.json()["error"]["message"]


def test_an_id_with_a_plus_round_trips_through_a_query(live):
    with live.client(live.new_key("edges3")) as c:
        assert c.post("/v1/profiles", json={"user": "a+b"}).status_code == 201
        body = {"id": "x+1", "user": "a+b", "prompt": "tell me", "chosen": "the cat was happy", "rejected": "no"}
        assert c.post("/v1/feedback", json=body).status_code == 201
        for query in ("user=a+b", "user=a%2Bb"):
            got = c.get(f"/v1/feedback?{query}").json()["data"]
            assert [f["id"] for f in got] == ["x+1"], query
        assert c.get("/v1/feedback?user=a+b&after=x+1").json()["data"] == []
        assert [p["user"] for p in c.get("/v1/profiles").json()["data"]] == ["a+b"]
        r = c.get("/v1/feedback?user=a/b")
        assert r.status_code == 400 and r.json()["error"]["param"] == "user"


def test_rows_an_earlier_release_stored_under_unsafe_ids_are_reachable_after_the_migration(live_factory, tmp_path):
    """Profiles ``a/b``, ``..`` and ``.`` as the previous release stored them: DELETE answered 404, 404
    and 405. Renamed when the store opens, every one of them can be read and deleted."""
    from tests.unit.server.test_store import _earlier_release_db

    url, kid = _earlier_release_db(tmp_path / "old.db")
    lv = live_factory(db=url)
    key = lv.store.create_key("reader")[1]
    import sqlalchemy as sa

    with lv.store.engine.begin() as conn:  # hand the earlier rows to a key we hold
        for table in ("profiles", "feedback", "completions"):
            conn.execute(sa.text(f"UPDATE {table} SET owner = (SELECT id FROM api_keys WHERE name = 'reader')"))
    with lv.client(key) as c:
        assert {p["user"] for p in c.get("/v1/profiles").json()["data"]} == {"a_b-2", "id..", "id.", "ok", "a_b"}
        assert c.get("/v1/feedback/f_1").json()["user"] == "a_b-2"
        for user in ("a_b-2", "id..", "id."):
            assert c.delete(f"/v1/profiles/{user}").status_code == 200
        assert {p["user"] for p in c.get("/v1/profiles").json()["data"]} == {"ok", "a_b"}
