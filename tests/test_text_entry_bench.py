"""bench.text_entry_cfr (the FLUX-sized text-entry CFR rows of the GPU suite) runs, at a toy size."""
from bench.text_entry_cfr import EntryScale, text_entry_rows


def test_text_entry_rows_time_cfr_per_concept_count():
    rows = text_entry_rows(EntryScale(dim=64, out_dim=48, window=16, counts=(1, 2), templates=2))
    assert [r["case"] for r in rows] == ["1 concepts", "2 concepts"]
    assert all(r["section"] == "text_entry" and r["projection"] == "64 -> 48" and r["seconds"] >= 0 for r in rows)
    assert rows[1]["token_pairs"] > rows[0]["token_pairs"] > 0
