"""Redis ACL auth: the password comes from a file (never argv); a wrong one is a clear error, not a retry loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from bus.config import BusConfig
from bus.transport import BusError, setup_transport


def test_password_file_authenticates_and_a_wrong_password_fails_fast(redis_server, tmp_path: Path) -> None:  # noqa: ANN001
    admin = redis.Redis.from_url(redis_server.url)
    admin.acl_setuser("producer", enabled=True, passwords=["+s3cret"], keys=["*"], commands=["+@all"])
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("s3cret\n")
    bad.write_text("guess\n")
    transport = setup_transport(BusConfig(url=redis_server.url, username="producer", password_file=str(good)))
    assert transport.publish("s", [b"x"])
    transport.close()
    wrong = setup_transport(
        BusConfig(url=redis_server.url, username="producer", password_file=str(bad), reconnect_timeout_s=60)
    )
    with pytest.raises(BusError, match="username/password: Redis at .* refused them"):
        wrong.publish("s", [b"x"])
    wrong.close()
    admin.close()
