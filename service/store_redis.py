"""The prediction store on Redis, so several api processes (replicas, uvicorn workers) share one set of ids.

Layout, under one hash tag so every key lands in the same slot: ``{cxr-store}:item:ID`` holds one encoded
:class:`StoredPrediction` and expires by Redis TTL (``PX``); ``:order`` (a sorted set of ids by arrival),
``:sizes`` (id -> bytes) and ``:bytes`` (their sum) keep the item and byte bounds. One Lua script per ``put``
makes eviction and insertion atomic across processes: ids whose item Redis has expired are forgotten, then the
oldest go until the new item fits. Every key also expires ``ttl_s`` after the last ``put``, so an idle store
leaves nothing behind. Redis down: :class:`NotReady` (503), and the next call reconnects by itself.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from service.errors import NotReady, Overloaded
from service.store import ID_BYTES, StoredPrediction, prediction_not_found

logger = logging.getLogger(__name__)

KEY_PREFIX = "{cxr-store}"
# Forget ids from the front of the arrival order whose item Redis has already expired (or evicted).
_FORGET_EXPIRED = """
local order, sizes, total, seq, item_prefix = KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1]
local function forget(id)
  redis.call('DECRBY', total, tonumber(redis.call('HGET', sizes, id) or '0'))
  redis.call('HDEL', sizes, id)
  redis.call('ZREM', order, id)
  redis.call('DEL', item_prefix .. id)
end
local function count() return redis.call('ZCARD', order) end
local function held() return tonumber(redis.call('GET', total) or '0') end
while count() > 0 do
  local oldest = redis.call('ZRANGE', order, 0, 0)[1]
  if redis.call('EXISTS', item_prefix .. oldest) == 1 then break end
  forget(oldest)
end
"""
_PUT = (
    _FORGET_EXPIRED
    + """
local id, payload, nbytes, ttl_ms = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local max_items, max_bytes = tonumber(ARGV[6]), tonumber(ARGV[7])
while count() > 0 and (count() >= max_items or held() + nbytes > max_bytes) do
  forget(redis.call('ZRANGE', order, 0, 0)[1])
end
redis.call('SET', item_prefix .. id, payload, 'PX', ttl_ms)
redis.call('ZADD', order, redis.call('INCR', seq), id)
redis.call('HSET', sizes, id, nbytes)
redis.call('INCRBY', total, nbytes)
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl_ms) end
"""
)
_COUNT = _FORGET_EXPIRED + "return {count(), held()}\n"


def encode_prediction(item: StoredPrediction) -> bytes:
    """Every dataclass field of ``item``: arrays in NumPy's .npy format (dtype and shape kept), the rest as JSON."""
    values = {field.name: getattr(item, field.name) for field in dataclasses.fields(item)}
    arrays = [name for name, value in values.items() if isinstance(value, np.ndarray)]
    header = {"arrays": arrays, "values": {name: v for name, v in values.items() if name not in arrays}}
    buffer = io.BytesIO()
    buffer.write(json.dumps(header).encode() + b"\n")
    for name in arrays:
        np.save(buffer, values[name], allow_pickle=False)
    return buffer.getvalue()


def decode_prediction(payload: bytes) -> StoredPrediction:
    """The inverse of :func:`encode_prediction`."""
    buffer = io.BytesIO(payload)
    header = json.loads(buffer.readline())
    arrays = {name: np.load(buffer, allow_pickle=False) for name in header["arrays"]}
    return StoredPrediction(**header["values"], **arrays)


class RedisPredictionStore:
    """A :class:`~service.store.PredictionStore` on a Redis server (``redis://host:port/db``, ``rediss://``,
    ``unix://``): TTL by Redis expiry, item and byte bounds kept atomically for all processes sharing it."""

    in_process = False

    def __init__(self, url: str, ttl_s: float, max_items: int, max_bytes: int) -> None:
        if ttl_s <= 0 or max_items < 1 or max_bytes < 1:
            raise ValueError("ttl_s, max_items and max_bytes must be positive.")
        self.ttl_s = ttl_s
        self.max_items = max_items
        self.max_bytes = max_bytes
        # Short timeouts and two quick retries: with Redis down a request fails in well under a second.
        self._redis = redis.Redis.from_url(
            url,
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.05), 2),
            health_check_interval=30,
        )
        self._keys = [f"{KEY_PREFIX}:{name}" for name in ("order", "sizes", "bytes", "seq")]
        self._item_prefix = f"{KEY_PREFIX}:item:"
        self._put = self._redis.register_script(_PUT)
        self._count = self._redis.register_script(_COUNT)
        self.where = _where(self._redis.connection_pool.connection_kwargs)

    def put(self, item: StoredPrediction) -> str:
        """Keep ``item`` (evicting expired, then oldest entries to make room) and return its id."""
        if item.nbytes > self.max_bytes:
            raise ValueError(f"An item of {item.nbytes} bytes never fits a store of {self.max_bytes} bytes.")
        prediction_id = secrets.token_urlsafe(ID_BYTES)
        ttl_ms = max(1, round(self.ttl_s * 1000))
        payload = encode_prediction(item)
        args: list[bytes | str | int] = [self._item_prefix, prediction_id, payload, item.nbytes, ttl_ms]
        args += [self.max_items, self.max_bytes]
        with self._reachable():
            self._put(keys=self._keys, args=args)
        return prediction_id

    def get(self, prediction_id: str) -> StoredPrediction:
        """The item with this id; raises PredictionNotFound if it is unknown or has expired."""
        with self._reachable():
            payload = self._redis.get(self._item_prefix + prediction_id)
        if payload is None:
            raise prediction_not_found(self.ttl_s)
        return decode_prediction(cast(bytes, payload))  # bytes: the client does not decode responses

    def unavailable_reason(self) -> str | None:
        """None while Redis answers a PING, else a sentence saying why the store cannot be used."""
        try:
            self._redis.ping()
        except redis.RedisError as err:
            return f"{self._unreachable_detail()} ({type(err).__name__})."
        return None

    def close(self) -> None:
        """Close the connections to Redis."""
        self._redis.close()

    def __len__(self) -> int:
        return int(self._counts()[0])

    @property
    def nbytes(self) -> int:
        """Bytes of image data held now."""
        return int(self._counts()[1])

    def _counts(self) -> list[Any]:
        with self._reachable():
            return list(self._count(keys=self._keys, args=[self._item_prefix]))

    def _unreachable_detail(self) -> str:
        return f"The prediction store (Redis at {self.where}) cannot be reached; it is retried on every request"

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as err:
            logger.warning("prediction store unreachable: %s", type(err).__name__)
            raise NotReady(f"{self._unreachable_detail()}. Try again shortly.") from err
        except redis.ResponseError as err:
            if not str(err).startswith("OOM"):
                raise
            raise Overloaded("The prediction store is full (Redis maxmemory reached). Try again shortly.") from err


def _where(kwargs: dict[str, Any]) -> str:
    # host:port/db or the socket path: never the password or user name of the URL.
    if "path" in kwargs:
        return f"{kwargs['path']}/{kwargs.get('db', 0)}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
