"""The Milvus documentation's quickstart through pymilvus's MilvusClient (gRPC), against a
running Shoal, with every result checked against a brute-force oracle computed here.

Usage: pymilvus_quickstart.py URI [--token USER:PASSWORD] [--flush-after-writes]

--flush-after-writes: through a router, rows are searched once the writer has sealed them
(Bounded staleness, see the README's Milvus compatibility table), so the script flushes after
each write before reading it back, as a Milvus user reading their own writes under Bounded
consistency would; against standalone every acknowledged write is read back at once.

Run by node-engine/tests/milvus_grpc.rs (standalone) and e2e/tests/local_stack.rs (router);
exits non-zero (with the reason) on any mismatch.
"""

import argparse
import math
import random

from pymilvus import MilvusClient, MilvusException

ARGS = argparse.ArgumentParser()
ARGS.add_argument("uri")
ARGS.add_argument("--token", default="")
ARGS.add_argument("--flush-after-writes", action="store_true")
ARGS = ARGS.parse_args()
URI = ARGS.uri
TOKEN = ARGS.token
DIM = 8
N = 200
NAME = "demo_collection"


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def cosine(a, b):
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def oracle(rows, q, k, pred=lambda r: True):
    scored = [(cosine(r["vector"], q), r["id"]) for r in rows if pred(r)]
    scored.sort(key=lambda s: (-s[0], s[1]))
    return scored[:k]


def check_hits(hits, expected, what):
    got = [h["id"] for h in hits]
    want = [i for _, i in expected]
    # Ties at the boundary may order differently; compare scores where ids differ.
    check(len(got) == len(want), f"{what}: {len(got)} hits, expected {len(want)}")
    for h, (s, i) in zip(hits, expected):
        check(
            h["id"] == i or abs(h["distance"] - s) < 1e-5,
            f"{what}: got id {h['id']} score {h['distance']}, expected id {i} score {s}",
        )
        check(abs(h["distance"] - s) < 1e-4, f"{what}: score {h['distance']} vs oracle {s}")


def main():
    rng = random.Random(7)
    client = MilvusClient(uri=URI, token=TOKEN)

    def written():
        if ARGS.flush_after_writes:
            client.flush(NAME)
    check(client.get_server_version().startswith("v2."), "server version")

    if client.has_collection(collection_name=NAME):
        client.drop_collection(collection_name=NAME)
    client.create_collection(collection_name=NAME, dimension=DIM)
    check(client.has_collection(NAME), "has_collection after create")
    check(NAME in client.list_collections(), "list_collections")
    desc = client.describe_collection(NAME)
    names = [f["name"] for f in desc["fields"]]
    check(names[:2] == ["id", "vector"], f"describe fields {names}")
    check(desc["enable_dynamic_field"], "dynamic field on")
    state = client.get_load_state(NAME)
    check(str(state["state"]).endswith("Loaded"), f"load state {state}")

    subjects = ["history", "biology", "math"]
    rows = [
        {
            "id": i,
            "vector": [rng.uniform(-1, 1) for _ in range(DIM)],
            "text": f"document {i}",
            "subject": subjects[i % 3],
        }
        for i in range(N)
    ]
    res = client.insert(collection_name=NAME, data=rows)
    check(res["insert_count"] == N, f"insert count {res}")
    check(list(res["ids"]) == list(range(N)), "insert ids")
    written()

    # Vector search.
    queries = [[rng.uniform(-1, 1) for _ in range(DIM)] for _ in range(3)]
    res = client.search(
        collection_name=NAME, data=queries, limit=5, output_fields=["text", "subject"]
    )
    check(len(res) == 3, "nq")
    for qi, q in enumerate(queries):
        check_hits(res[qi], oracle(rows, q, 5), f"search q{qi}")
        for h in res[qi]:
            row = rows[h["id"]]
            check(h["entity"]["text"] == row["text"], f"text of {h['id']}: {h['entity']}")
            check(h["entity"]["subject"] == row["subject"], "subject")

    # Search with offset.
    res = client.search(collection_name=NAME, data=[queries[0]], limit=3, offset=2)
    check_hits(res[0], oracle(rows, queries[0], 5)[2:], "search with offset")

    # Filtered search.
    res = client.search(
        collection_name=NAME,
        data=[queries[1]],
        filter="subject == 'history'",
        limit=4,
        output_fields=["text", "subject"],
    )
    check_hits(
        res[0], oracle(rows, queries[1], 4, lambda r: r["subject"] == "history"), "filtered"
    )
    check(all(h["entity"]["subject"] == "history" for h in res[0]), "filtered subjects")

    # Range search (radius only): similarity above 0.5.
    res = client.search(
        collection_name=NAME,
        data=[queries[2]],
        limit=50,
        search_params={"metric_type": "COSINE", "params": {"radius": 0.5}},
    )
    want = [s for s in oracle(rows, queries[2], 50) if s[0] > 0.5]
    check_hits(res[0], want, "range search")

    # Query.
    res = client.query(
        collection_name=NAME, filter="subject == 'history'", output_fields=["text", "subject"]
    )
    want = sorted(r["id"] for r in rows if r["subject"] == "history")
    check(sorted(r["id"] for r in res) == want, "query ids")
    check(all(r["text"] == f"document {r['id']}" for r in res), "query text")
    res = client.query(collection_name=NAME, filter="id < 10", limit=3, offset=2)
    check(len(res) == 3, f"query limit/offset {res}")
    res = client.query(collection_name=NAME, filter="", output_fields=["count(*)"])
    check(res[0]["count(*)"] == N, f"count {res}")
    res = client.query(
        collection_name=NAME, filter="subject == 'math'", output_fields=["count(*)"]
    )
    check(res[0]["count(*)"] == sum(r["subject"] == "math" for r in rows), "filtered count")

    # Get by id, with the vector.
    res = client.get(collection_name=NAME, ids=[0, 2], output_fields=["vector", "text", "subject"])
    check(sorted(r["id"] for r in res) == [0, 2], f"get ids {res}")
    for r in res:
        want = rows[r["id"]]
        check(r["text"] == want["text"], "get text")
        check(
            all(abs(a - b) < 1e-6 for a, b in zip(r["vector"], want["vector"])), "get vector"
        )

    # Upsert replaces a row.
    new_vec = [0.5] * DIM
    client.upsert(collection_name=NAME, data=[{"id": 1, "vector": new_vec, "text": "changed"}])
    written()
    res = client.get(collection_name=NAME, ids=[1], output_fields=["text", "subject"])
    check(res[0]["text"] == "changed" and "subject" not in res[0], f"upsert {res}")
    rows[1] = {"id": 1, "vector": new_vec, "text": "changed", "subject": None}

    # Delete by ids and by filter.
    res = client.delete(collection_name=NAME, ids=[0, 2])
    check(res["delete_count"] == 2, f"delete by ids {res}")
    res = client.delete(collection_name=NAME, filter="subject == 'biology'")
    biology = [r["id"] for r in rows if r["subject"] == "biology" and r["id"] not in (0, 2)]
    check(res["delete_count"] == len(biology), f"delete by filter {res}, want {len(biology)}")
    written()
    live = [r for r in rows if r["id"] not in (0, 2) and r["subject"] != "biology"]
    res = client.query(collection_name=NAME, filter="", output_fields=["count(*)"])
    check(res[0]["count(*)"] == len(live), f"count after delete {res}")
    res = client.search(collection_name=NAME, data=[queries[0]], limit=10)
    check_hits(res[0], oracle(live, queries[0], 10), "search after delete")

    # Flush, indexes, release/load.
    client.flush(NAME)
    # As in Milvus, the statistics count flushed rows (the router counts sealed segments).
    stats = client.get_collection_stats(NAME)
    check(int(stats["row_count"]) == len(live), f"row count {stats}, want {len(live)}")
    idx = client.list_indexes(NAME)
    check(len(idx) >= 1, f"indexes {idx}")
    info = client.describe_index(NAME, idx[0])
    check(info["metric_type"] == "COSINE", f"describe_index {info}")
    client.release_collection(NAME)
    try:
        client.search(collection_name=NAME, data=[queries[0]], limit=1)
        raise AssertionError("search on a released collection succeeded")
    except MilvusException as e:
        check(e.code == 101, f"released search code {e.code}: {e.message}")
    client.load_collection(NAME)
    res = client.search(collection_name=NAME, data=[queries[0]], limit=10)
    check_hits(res[0], oracle(live, queries[0], 10), "search after flush and reload")

    # Errors a user sees.
    try:
        client.insert(collection_name=NAME, data=[{"id": 9999, "vector": [0.1] * (DIM + 1)}])
        raise AssertionError("wrong dimension accepted")
    except MilvusException as e:
        check("dim" in e.message, f"wrong-dim message: {e.message}")
    try:
        client.search(collection_name="no_such_collection", data=[queries[0]], limit=1)
        raise AssertionError("unknown collection accepted")
    except MilvusException as e:
        check(e.code == 100 or "not" in e.message, f"unknown collection: {e.code} {e.message}")
    try:
        client.create_alias(collection_name=NAME, alias="a1")
        raise AssertionError("create_alias accepted")
    except MilvusException as e:
        check("not supported by Shoal" in e.message, f"create_alias: {e.message}")
    check(client.list_partitions(NAME) == ["_default"], "partitions")
    check(client.list_databases() == ["default"] if hasattr(client, "list_databases") else True, "dbs")

    # The quick setup with L2 (the metric comes with the index).
    client.drop_collection(NAME)
    client.create_collection(collection_name=NAME, dimension=DIM, metric_type="L2")
    client.insert(collection_name=NAME, data=rows[3:50])
    written()
    q = queries[0]
    res = client.search(collection_name=NAME, data=[q], limit=3)
    l2 = sorted((sum((a - b) ** 2 for a, b in zip(r["vector"], q)), r["id"]) for r in rows[3:50])
    check([h["id"] for h in res[0]] == [i for _, i in l2[:3]], f"L2 search {res[0]}")
    client.drop_collection(NAME)
    check(not client.has_collection(NAME), "dropped")
    print("pymilvus quickstart: all checks passed")


if __name__ == "__main__":
    main()
