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


def test_ties_are_broken_by_database_index():
    # all distances tie: ranking must be the database order
    dist = np.zeros((1, 4), dtype=np.int32)
    assert R.rank(dist).tolist() == [[0, 1, 2, 3]]
    # relevant item first in database order -> AP 1; last -> 1/4
    assert R.mean_average_precision(dist, [7], [7, 1, 2, 3]) == pytest.approx(1.0)
    assert R.mean_average_precision(dist, [7], [1, 2, 3, 7]) == pytest.approx(0.25)


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
    assert R.precision_at_k(dist, [0], [0, 0, 1, 1], k=2) == pytest.approx(1.0)
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
