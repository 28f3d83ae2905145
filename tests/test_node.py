"""The contract from a second language: the Node.js example calls every RPC against a live server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from server.config import Settings
from tests.conftest import start_service, stop_service
from tests.data import add_comment, add_post, add_user

NODE_DIR = Path(__file__).resolve().parent.parent / "examples" / "node"
ADMIN = "node-admin-token"


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, with the example's packages installed from its lock file."""
    found = shutil.which("node")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node is not installed; CI must run the Node.js client test")
        pytest.skip("node is not installed")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm = shutil.which("npm")
        assert npm is not None, "npm is needed to install the Node.js example's packages"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300)
    return found


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_the_node_client_calls_every_rpc_and_gets_the_right_answers(
    node: str, settings: Settings, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    await add_user(db_engine, "bob", full=False)
    await add_post(db_engine, "p1", "alice", title="from node", views=10)
    await add_post(db_engine, "p2", "alice", archived=True, published=False)
    await add_comment(db_engine, "c1", "p1", "bob")
    running = await start_service(settings, admin_token=SecretStr(ADMIN))
    try:
        process = await asyncio.create_subprocess_exec(
            node,
            str(NODE_DIR / "smoke.js"),
            running.target,
            ADMIN,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        await stop_service(running)
    assert process.returncode == 0, err.decode()
    got = json.loads(out)

    user = got["GetUser"]
    assert (user["response"]["user"]["id"], user["response"]["user"]["settings"]["theme"]) == (
        "alice",
        "dark",
    )
    assert (user["cache"], user["tier"], user["requestId"]) == ("miss", "warm", "node-GetUser")
    assert got["GetPost"]["response"]["post"]["title"] == "from node"
    assert got["GetPost"]["response"]["post"]["views"] == "10"  # int64 as a string: no precision lost
    assert [p["id"] for p in got["GetTrending"]["response"]["posts"]] == ["p1"]
    assert [p["id"] for p in got["GetArchived"]["response"]["posts"]] == ["p2"]
    assert [p["id"] for p in got["ListPostsByAuthor"]["response"]["posts"]] == ["p1", "p2"]
    assert [c["id"] for c in got["ListCommentsByAuthor"]["response"]["comments"]] == []  # alice wrote none
    assert [u["id"] for u in got["BatchGetUsers"]["response"]["users"]] == ["alice", "bob"]
    assert [p["id"] for p in got["BatchGetPosts"]["response"]["posts"]] == ["p2", "p1"]
    assert int(got["Invalidate"]["response"]["keys_invalidated"]) >= 3
    warmed = got["Warm"]["response"]
    assert (warmed["posts_warmed"], warmed["users_warmed"]) == ("1", "2")
    assert got["GetPostAgain"]["cache"] == "hit", "Warm cached the popular post"
    assert "tier" not in got["GetPostAgain"], "not asked for: no x-cache-tier"
    progress = got["WarmWithProgress"]["responses"]
    assert progress[-1]["done"] is True
    assert (progress[-1]["posts_warmed"], progress[-1]["users_warmed"]) == ("1", "2")
    assert got["NotFound"]["code"] == 5  # NOT_FOUND
    assert "nope" in got["NotFound"]["details"]
    assert got["NotFound"]["requestId"], "errors carry the request id to Node too"
