"""The RabbitMQ management HTTP API, for per-test vhosts and looking inside queues."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

API = "http://127.0.0.1:15672/api"
AMQP = "amqp://guest:guest@127.0.0.1:5672"


class Management:
    def __init__(self, api: str = API, user: str = "guest", password: str = "guest") -> None:
        self.api = api
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._auth = f"Basic {token}"

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.api}{path}", data=data, method=method)
        req.add_header("Authorization", self._auth)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def available(self) -> bool:
        try:
            self.request("GET", "/overview")
        except (urllib.error.URLError, OSError):
            return False
        return True

    def create_vhost(self, vhost: str) -> None:
        self.request("PUT", f"/vhosts/{quote(vhost, safe='')}", {})
        self.request(
            "PUT",
            f"/permissions/{quote(vhost, safe='')}/guest",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )

    def delete_vhost(self, vhost: str) -> None:
        try:
            self.request("DELETE", f"/vhosts/{quote(vhost, safe='')}")
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise

    def delete_users(self, prefix: str) -> list[str]:
        """Delete every broker user whose name starts with ``prefix``; their names."""
        doomed = [u["name"] for u in self.request("GET", "/users") if u["name"].startswith(prefix)]
        for name in doomed:
            try:
                self.request("DELETE", f"/users/{quote(name, safe='')}")
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
        return doomed

    def get_messages(self, vhost: str, name: str, count: int = 50) -> list[dict[str, Any]]:
        """Read messages without removing them (they are requeued)."""
        result: list[dict[str, Any]] = self.request(
            "POST",
            f"/queues/{quote(vhost, safe='')}/{quote(name, safe='')}/get",
            {"count": count, "ackmode": "ack_requeue_true", "encoding": "auto"},
        )
        return result

    def bound(self, vhost: str, exchange: str, queue: str) -> bool:
        """Whether the queue is bound to the exchange now (bindings, unlike consumer counts,
        are not the management plugin's periodic statistics, so this is never stale)."""
        v, e, q = (quote(name, safe="") for name in (vhost, exchange, queue))
        path = f"/bindings/{v}/e/{e}/q/{q}"
        try:
            return bool(self.request("GET", path))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return False
            raise

    def publish(
        self, vhost: str, exchange: str, routing_key: str, payload: str, **properties: Any
    ) -> bool:
        result = self.request(
            "POST",
            f"/exchanges/{quote(vhost, safe='')}/{quote(exchange, safe='')}/publish",
            {
                "properties": {"delivery_mode": 2, **properties},
                "routing_key": routing_key,
                "payload": payload,
                "payload_encoding": "string",
            },
        )
        return bool(result["routed"])


def amqp_url(vhost: str) -> str:
    return f"{AMQP}/{quote(vhost, safe='')}"
