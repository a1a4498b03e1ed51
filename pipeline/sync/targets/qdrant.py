"""Qdrant: qdrant://host:port/collection (a server, through qdrant-client), or
qdrant+local:///dir with --table as the collection (qdrant-client's local mode: no server).

A point's id is a UUID derived from the row's key, which the payload keeps as `id` beside the
provenance, so an upsert of the same key always lands on the same point. Before writing, a batch's
points are looked up to leave unchanged ones alone (and to count what changed). Deletions select by
payload (generation, shard). The position is the payload of the one point of <collection>__neobert_sync.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import pyarrow as pa
from qdrant_client import QdrantClient, models

from pipeline.errors import SettingsError, TargetConflictError, TargetUnreachableError
from pipeline.faults import failpoint
from pipeline.sync.log import Position, Versions, shard_batches
from pipeline.sync.rows import CHANGED_WHEN
from pipeline.sync.targets.base import Target, Upserted

POINT_IDS = uuid.UUID("6f1c1b7e-4a53-4e0e-9a4c-2f4f0b8c9d10")
"""The namespace of point ids: uuid5(POINT_IDS, key)."""
SHARDS_PER_DELETE = 1_000
TIMEOUT_S = 30


def point_id(key: str) -> str:
    return str(uuid.uuid5(POINT_IDS, key))


class QdrantTarget(Target):
    def __init__(self, url: str, collection: str | None) -> None:
        parts = urlsplit(url)
        if parts.scheme == "qdrant+local":
            self._client = QdrantClient(path=parts.path or ".")
            name = collection or "embeddings"
        else:
            name = collection or parts.path.strip("/")
            if not name:
                raise SettingsError(f"--to {url}: name the collection, qdrant://host:port/collection")
            self._client = QdrantClient(host=parts.hostname, port=parts.port or 6333, timeout=TIMEOUT_S)
        self.description = f"{parts.scheme}://{parts.hostname or ''}{parts.path} collection {name}"
        self._name = name
        self._state = f"{name}__neobert_sync"

    def prepare(self, schema: pa.Schema, *, unique_ids: bool = False) -> None:
        embedding = schema.field("embedding").type
        self._payload = [f.name for f in schema if f.name != "embedding"]
        wanted = models.VectorParams(
            size=embedding.list_size,
            distance=models.Distance.COSINE,
            datatype=models.Datatype.FLOAT16 if embedding.value_type == pa.float16() else models.Datatype.FLOAT32,
        )
        try:
            exists = self._client.collection_exists(self._name)
        except Exception as err:  # qdrant-client raises transport errors of several libraries
            raise TargetUnreachableError(f"{self.description} could not be reached ({err}); check the URL") from None
        if exists:
            found = self._client.get_collection(self._name).config.params.vectors
            if not isinstance(found, models.VectorParams) or found.size != wanted.size:
                raise TargetConflictError(
                    f"{self.description} exists with vectors {found}; this output needs {wanted.size} dimensions: "
                    "sync into another collection"
                )
        else:
            self._client.create_collection(self._name, vectors_config=wanted)
            for field_name, kind in (
                ("shard", models.PayloadSchemaType.KEYWORD),
                ("generation", models.PayloadSchemaType.INTEGER),
            ):
                self._client.create_payload_index(self._name, field_name, kind)
        if not self._client.collection_exists(self._state):
            self._client.create_collection(
                self._state, vectors_config=models.VectorParams(size=1, distance=models.Distance.DOT)
            )

    def position(self) -> Position | None:
        found = self._client.retrieve(self._state, [point_id("position")], with_payload=True)
        return Position.from_json(found[0].payload["position"]) if found else None

    def upsert(self, rows: pa.Table) -> Upserted:
        keys = rows.column("id").to_pylist()
        ids = [point_id(key) for key in keys]
        stored = {
            point.id: point.payload
            for point in self._client.retrieve(self._name, ids, with_payload=list(CHANGED_WHEN), with_vectors=False)
        }
        payloads = rows.select(self._payload).to_pylist()
        write = [
            i
            for i, (id_, payload) in enumerate(zip(ids, payloads, strict=True))
            if id_ not in stored or any(stored[id_].get(name) != payload[name] for name in CHANGED_WHEN)
        ]
        if write:
            vectors = rows.column("embedding").combine_chunks()
            dim = vectors.type.list_size
            values = vectors.values.to_numpy(zero_copy_only=False).reshape(len(vectors), dim)
            self._client.upsert(
                self._name,
                models.Batch(
                    ids=[ids[i] for i in write],
                    vectors=values[write].astype("float32").tolist(),
                    payloads=[payloads[i] for i in write],
                ),
                wait=True,
            )
        failpoint("sync.in_batch")  # written, not yet counted or recorded
        inserted = sum(1 for i in write if ids[i] not in stored)
        return Upserted(inserted, len(write) - inserted, len(ids) - len(write))

    def delete_versions(self, versions: Versions) -> int:
        deleted = 0
        for generation, shards in shard_batches(versions, SHARDS_PER_DELETE):
            selected = models.Filter(
                must=[
                    models.FieldCondition(key="generation", match=models.MatchValue(value=generation)),
                    models.FieldCondition(key="shard", match=models.MatchAny(any=shards)),
                ]
            )
            deleted += self._client.count(self._name, count_filter=selected, exact=True).count
            self._client.delete(self._name, models.FilterSelector(filter=selected), wait=True)
        return deleted

    def save_position(self, position: Position) -> None:
        point = models.PointStruct(id=point_id("position"), vector=[0.0], payload={"position": position.to_json()})
        self._client.upsert(self._state, [point], wait=True)

    def count(self) -> int:
        return self._client.count(self._name, exact=True).count

    def close(self) -> None:
        self._client.close()
