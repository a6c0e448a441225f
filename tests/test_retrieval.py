import itertools

import numpy as np
import pytest
import torch

from toap_kit import retrieval as R


def test_hamming_distance_hand_computed():
    q = np.array([[1, 1, -1, -1]])
    db = np.array([[1, 1, -1, -1], [1, -1, -1, -1], [-1, -1, 1, 1]])
    assert R.hamming_distance(q, db).tolist() == [[0, 1, 4]]
    assert R.hamming_distance(torch.tensor(q), torch.tensor(db)).dtype == np.int32


def test_hamming_rejects_non_sign_codes_and_length_mismatch():
    with pytest.raises(ValueError, match="-1 and \\+1"):
        R.hamming_distance(np.array([[0.3, 1]]), np.array([[1, 1]]))
    with pytest.raises(ValueError, match="lengths differ"):
        R.hamming_distance(np.ones((1, 4)), np.ones((1, 8)))


def test_map_hand_computed():
    # one query, database ranked [rel, irr, rel]: AP = (1/1 + 2/3) / 2
    dist = np.array([[0, 1, 2]])
    assert R.mean_average_precision(dist, [0], [0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # mAP@2 (hashing convention): only the relevant items within the top 2 -> 1/1
    assert R.mean_average_precision(dist, [0], [0, 1, 0], k=2) == pytest.approx(1.0)
    # mAP@1 for a query whose first item is irrelevant -> 0
    assert R.mean_average_precision(np.array([[1, 0, 2]]), [0], [0, 1, 0], k=1) == 0.0


def test_listing_breaks_ties_by_index_and_the_index_rule_is_kept_on_request():
    # all distances tie: the listing is the database order
    dist = np.zeros((1, 4), dtype=np.int32)
    assert R.rank(dist).tolist() == [[0, 1, 2, 3]]
    # ties="index": relevant item first in database order -> AP 1; last -> 1/4
    assert R.mean_average_precision(dist, [7], [7, 1, 2, 3], ties="index") == pytest.approx(1.0)
    assert R.mean_average_precision(dist, [7], [1, 2, 3, 7], ties="index") == pytest.approx(0.25)
    # tie-aware (default): both are the mean over the 4 places, (1 + 1/2 + 1/3 + 1/4) / 4
    for db in ([7, 1, 2, 3], [1, 2, 3, 7]):
        assert R.mean_average_precision(dist, [7], db) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    with pytest.raises(ValueError, match="ties"):
        R.mean_average_precision(dist, [7], [7, 1, 2, 3], ties="random")


def _brute_force(dist, q_labels, db_labels, k, p_k):
    """Every metric with ties by index, averaged over all orders of the database: each order
    of the tied items is equally likely, so this is the exact tie-aware expectation."""
    rows = []
    for perm in itertools.permutations(range(dist.shape[1])):
        perm = list(perm)
        d, lab = dist[:, perm], np.asarray(db_labels)[perm]
        rows.append([R.mean_average_precision(d, q_labels, lab, ties="index"),
                     R.mean_average_precision(d, q_labels, lab, k=k, ties="index"),
                     R.precision_at_k(d, q_labels, lab, k=p_k, ties="index"),
                     R.found_at_k(d, q_labels, lab, k=p_k, ties="index").mean()])
    return np.mean(rows, axis=0)


@pytest.mark.parametrize("seed", range(12))
def test_tie_aware_metrics_equal_the_average_over_every_tie_order(seed):
    rng = np.random.default_rng(seed)
    n_db = int(rng.integers(3, 8))
    dist = rng.integers(0, 3, size=(3, n_db))  # few distinct values: many ties
    db_labels = rng.integers(0, 3, size=n_db)
    q_labels = rng.integers(0, 3, size=3)
    q_labels[0] = db_labels[0]  # at least one query has a relevant item
    k, p_k = int(rng.integers(1, n_db + 1)), int(rng.integers(1, n_db + 1))
    want = _brute_force(dist, q_labels, db_labels, k, p_k)
    got = [R.mean_average_precision(dist, q_labels, db_labels), R.mean_average_precision(dist, q_labels, db_labels, k=k),
           R.precision_at_k(dist, q_labels, db_labels, k=p_k), R.found_at_k(dist, q_labels, db_labels, k=p_k).mean()]
    assert got == pytest.approx(want, abs=1e-12)


def test_tie_aware_metrics_do_not_depend_on_database_order():
    rng = np.random.default_rng(0)
    codes_q = np.sign(rng.standard_normal((20, 16))) + 0
    codes_db = np.sign(rng.standard_normal((300, 16))) + 0
    q_labels, db_labels = rng.integers(0, 10, 20), rng.integers(0, 10, 300)
    dist = R.hamming_distance(codes_q, codes_db)
    base = R.evaluate(dist, q_labels, db_labels, k=50, p_k=10)
    base_found = R.found_at_k(dist, q_labels, db_labels, k=5)
    by_index = []
    for _ in range(3):
        perm = rng.permutation(300)
        res = R.evaluate(dist[:, perm], q_labels, db_labels[perm], k=50, p_k=10)
        assert (res.map_all, res.map_k, res.precision_k) == pytest.approx((base.map_all, base.map_k, base.precision_k))
        assert R.found_at_k(dist[:, perm], q_labels, db_labels[perm], k=5) == pytest.approx(base_found)
        by_index.append(R.mean_average_precision(dist[:, perm], q_labels, db_labels[perm], ties="index"))
    assert len(set(by_index)) > 1  # the index rule does depend on it
    prec, rec = R.pr_curve(dist, q_labels, db_labels)
    perm = rng.permutation(300)
    assert np.allclose(R.pr_curve(dist[:, perm], q_labels, db_labels[perm]), (prec, rec))


def test_float_distances_and_bad_k():
    dist = np.array([[0.1, 0.1, 0.3]])
    # the relevant item shares first place with an irrelevant one: AP = (1 + 1/2) / 2
    assert R.mean_average_precision(dist, [0], [0, 1, 1]) == pytest.approx(0.75)
    assert R.found_at_k(dist, [0], [0, 1, 1], k=1) == pytest.approx([0.5])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            R.precision_at_k(dist, [0], [0, 1, 1], k=bad)


def test_query_without_relevant_item_is_skipped_and_counted():
    dist = np.array([[0, 1], [0, 1]])
    res = R.evaluate(dist, [0, 5], [1, 0], k=2, p_k=1)
    # query 0: relevant at rank 2 -> AP 0.5; query 1 (label 5) has none -> skipped, not 0
    assert res.map_all == pytest.approx(0.5)
    assert res.n_skipped == 1 and res.n_queries == 2
    assert res.precision_k == 0.0
    with pytest.raises(ValueError, match="undefined"):
        R.mean_average_precision(dist, [8, 9], [1, 0])


def test_precision_at_k_and_pr_curve():
    dist = np.array([[0, 1, 1, 2]])
    # place 2 is a tie of a relevant and an irrelevant item: expected P@2 = (1 + 1/2) / 2
    assert R.precision_at_k(dist, [0], [0, 0, 1, 1], k=2) == pytest.approx(0.75)
    assert R.precision_at_k(dist, [0], [0, 0, 1, 1], k=2, ties="index") == pytest.approx(1.0)
    prec, rec = R.pr_curve(dist, [0], [0, 0, 1, 1])
    # radius 0: {0} -> P 1, R 1/2; radius 1: {0,1,2} -> P 2/3, R 1; radius 2: all -> P 1/2
    assert prec.tolist() == pytest.approx([1, 2 / 3, 0.5])
    assert rec.tolist() == pytest.approx([0.5, 1, 1])


def test_pack_codes_bit_order():
    code = -np.ones((1, 16))
    code[0, 0] = 1   # bit 0 -> least significant bit of byte 0
    code[0, 9] = 1   # bit 9 -> bit 1 of byte 1
    assert R.pack_codes(code).tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="multiple of 8"):
        R.pack_codes(np.ones((1, 12)))


@pytest.mark.parametrize("bits", [16, 64])
def test_faiss_index_matches_numpy_reference(bits):
    rng = np.random.default_rng(0)
    db = np.where(rng.random((500, bits)) > 0.5, 1, -1)
    q = np.where(rng.random((20, bits)) > 0.5, 1, -1)
    fa, nu = R.HammingIndex(bits, "faiss"), R.HammingIndex(bits, "numpy")
    fa.add(db)
    nu.add(db)
    assert fa.ntotal == nu.ntotal == 500
    df, idf = fa.search(q, 500)
    dn, idn = nu.search(q, 500)
    assert (df == dn).all()          # exact distances agree
    assert (idf == idn).all()        # full ranking: the tie rule makes them identical
    assert (dn == np.take_along_axis(R.hamming_distance(q, db), idn, 1)).all()
    d10, _ = fa.search(q, 10)
    assert (d10 == dn[:, :10]).all()
    with pytest.raises(ValueError):
        fa.search(q, 0)
