"""SemDeDup: planted semantic duplicates are marked, results are deterministic and do not depend on
the backend, the input order, the part layout or the memory budget."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from imagegen.semdedup import (OUTPUT_SCHEMA, SemDedupConfig, semdedup, semdedup_parts,
                               write_embedding_part)


def _clustered(n_centres: int = 30, per: int = 60, d: int = 64, n_dups: int = 80, seed: int = 0):
    """Unit embeddings around well-separated centres (as CLIP embeddings of a crawl are), plus planted
    near copies (cosine ~0.99 to their source); everything else is below 0.9 to everything."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, d))
    base = np.repeat(centres, per, axis=0) + 1.2 * rng.normal(size=(n_centres * per, d))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    src = rng.choice(len(base), n_dups, replace=False)
    dup = base[src] + 0.012 * rng.normal(size=(n_dups, d))
    emb = np.concatenate([base, dup]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keys = [f"{i:06d}" for i in range(len(emb))]
    return emb, keys, src, len(base)


def _frame(table) -> pd.DataFrame:
    return table.to_pandas().set_index("key")


def test_planted_duplicates_are_marked_and_one_representative_kept():
    emb, keys, src, n_base = _clustered()
    cfg = SemDedupConfig(threshold=0.95, target_cluster_size=200)
    table, counts = semdedup(emb, keys, cfg)
    assert table.schema == OUTPUT_SCHEMA and table.num_rows == len(keys)
    df = _frame(table)
    assert counts["clusters"] == 10 and counts["marked_duplicates"] == (~df["is_representative"]).sum()
    caught = 0
    for j, s in enumerate(src):
        a, b = df.loc[f"{s:06d}"], df.loc[f"{n_base + j:06d}"]
        if a["sem_cluster"] == b["sem_cluster"]:
            caught += 1
            assert a["sem_group"] == b["sem_group"]
            assert a["is_representative"] != b["is_representative"]  # exactly one kept
            loser = b if a["is_representative"] else a
            assert loser["duplicate_of"] == loser["sem_group"] and loser["sim_to_rep"] > 0.95
    assert caught >= 0.95 * len(src)  # a pair split across clusters is the method's known miss
    assert counts["marked_duplicates"] == caught  # and nothing else is marked
    reps = df[df["is_representative"]]
    assert reps["duplicate_of"].isna().all() and (reps["sim_to_rep"] == 1.0).all()
    assert (df.loc[df["max_sim"].notna(), "max_sim"] <= 1.0 + 1e-6).all()


def test_keep_rules_choose_the_representative():
    emb, keys, src, n_base = _clustered(n_dups=40)
    far = _frame(semdedup(emb, keys, SemDedupConfig(target_cluster_size=200))[0])
    near = _frame(semdedup(emb, keys, SemDedupConfig(target_cluster_size=200, keep="closest_to_centroid"))[0])
    prio = np.zeros(len(keys))
    prio[n_base:] = 1.0  # prefer the copies
    pr = _frame(semdedup(emb, keys, SemDedupConfig(target_cluster_size=200, keep="priority"), priority=prio)[0])
    groups = far[~far["is_representative"]]["sem_group"].unique()
    for g in groups:
        members = far[far["sem_group"] == g]
        rep = members[members["is_representative"]].index[0]
        assert far.loc[rep, "sim_to_centroid"] == members["sim_to_centroid"].min()
        nm = near[near.index.isin(members.index)]
        assert nm.loc[nm["is_representative"], "sim_to_centroid"].iloc[0] == members["sim_to_centroid"].max()
        pm = pr[pr.index.isin(members.index)]
        assert int(pm[pm["is_representative"]].index[0]) >= n_base
    with pytest.raises(ValueError, match="needs a priority"):
        semdedup(emb, keys, SemDedupConfig(keep="priority"))


def test_chain_components_vs_the_papers_rule():
    # a, b, c on a great circle: cos(a,b) = cos(b,c) = 0.96 > 0.95, cos(a,c) = cos(2 theta) ~ 0.84
    t = np.arccos(0.96)
    pts = np.array([[np.cos(k * t), np.sin(k * t), 0.0] for k in (0, 1, 2)], dtype=np.float32)
    far = np.array([[0, 0, 1.0]], dtype=np.float32)
    emb, keys = np.concatenate([pts, far]), ["a", "b", "c", "z"]
    prio = np.array([3.0, 1.0, 2.0, 0.0])  # ranks: a, c, b
    comp = _frame(semdedup(emb, keys, SemDedupConfig(n_clusters=1, keep="priority"), priority=prio)[0])
    assert comp["is_representative"].to_dict() == {"a": True, "b": False, "c": False, "z": True}
    assert comp.loc["c", "duplicate_of"] == "a"  # transitively, through b
    paper = _frame(semdedup(emb, keys, SemDedupConfig(n_clusters=1, keep="priority", grouping="paper"),
                            priority=prio)[0])
    # c is ranked before b and a is not its duplicate: kept; b is a duplicate of a (and of c)
    assert paper["is_representative"].to_dict() == {"a": True, "b": False, "c": True, "z": True}
    assert paper.loc["b", "duplicate_of"] == "a"


def test_deterministic_and_independent_of_order_backend_parts_and_memory(tmp_path):
    emb, keys, *_ = _clustered(seed=3)
    cfg = SemDedupConfig(threshold=0.95, target_cluster_size=150, seed=7)
    ref, counts = semdedup(emb, keys, cfg)
    again, _ = semdedup(emb, keys, cfg)
    assert ref.equals(again)
    perm = np.random.default_rng(1).permutation(len(keys))
    assert semdedup(emb[perm], [keys[i] for i in perm], cfg)[0].equals(ref)
    # streaming over per-part files, with a memory budget far below the data
    parts = [write_embedding_part(tmp_path, f"part-{p:03d}", [keys[i] for i in idx], emb[idx], dtype="float32")
             for p, idx in enumerate(np.array_split(perm, 5))]
    small = cfg.model_copy(update={"max_rows_in_memory": 300})
    streamed, scounts = semdedup_parts(parts, small)
    assert streamed.equals(ref) and scounts == counts
    assert semdedup(emb, keys, small)[0].equals(ref)
    # another seed is another k-means, still deterministic
    other = semdedup(emb, keys, cfg.model_copy(update={"seed": 8}))[0]
    assert not other.column("sem_cluster").equals(ref.column("sem_cluster"))


def test_faiss_backend_gives_the_numpy_result():
    pytest.importorskip("faiss")
    emb, keys, *_ = _clustered(seed=5, n_dups=120)
    cfg = SemDedupConfig(threshold=0.95, target_cluster_size=100)
    np_res = semdedup(emb, keys, cfg)
    fs_res = semdedup(emb, keys, cfg.model_copy(update={"backend": "faiss"}))
    assert np_res[0].equals(fs_res[0]) and np_res[1] == fs_res[1]


def test_float16_parts_and_bad_input(tmp_path):
    emb, keys, *_ = _clustered(n_centres=5, per=20, n_dups=10)
    half = write_embedding_part(tmp_path, "p", keys, emb)  # float16 on disk by default
    assert np.load(half.embeddings).dtype == np.float16
    streamed = semdedup_parts([half], SemDedupConfig(n_clusters=2))[0]
    assert streamed.equals(semdedup(emb.astype(np.float16), keys, SemDedupConfig(n_clusters=2))[0])
    with pytest.raises(ValueError, match="not unique"):
        semdedup(emb[:2], ["x", "x"])
    with pytest.raises(ValueError, match="zero or non-finite rows"):
        semdedup(np.zeros((3, 4)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="3 keys for 2 embeddings"):
        semdedup(emb[:2], ["a", "b", "c"])
    other = write_embedding_part(tmp_path, "q", ["zz"], np.ones((1, 3)))
    with pytest.raises(ValueError, match="is 3-d, earlier parts 64-d"):
        semdedup_parts([half, other])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        semdedup_parts([type(half)(tmp_path / "nope.npy", half.keys)])
    empty, c = semdedup(np.zeros((0, 4), np.float32), [])
    assert empty.num_rows == 0 and c == {"images": 0}
