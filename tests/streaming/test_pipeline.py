"""vqdna.streaming.pipeline: short records share rows isolation_gap pad positions apart and are still coded
as each alone."""


from tests.streaming._fixtures import mismatches, model, one_thread, random_fasta  # noqa: F401 (fixtures)
from vqdna.streaming import tokenize_files


def test_short_records_are_packed_isolation_gap_apart(tmp_path, model, monkeypatch):
    """Short records share rows isolation_gap (3) pad positions apart, not halo (8) apart, and are still
    coded as each alone; with one pad position less they are not (so this test catches a gap too small)."""
    from vqdna.streaming import pipeline

    gaps = []
    real_batches = pipeline.batches
    monkeypatch.setattr(pipeline, "batches", lambda *a, **k: gaps.append(a[4]) or real_batches(*a, **k))
    fasta = random_fasta(tmp_path / "in.fa", [1, 2, 3, 5, 8, 13, 4, 7, 2, 30] * 12, seed=5)
    tokenize_files([fasta], str(tmp_path / "out"), model, window=64, batch_size=2)
    assert set(gaps) == {model.isolation_gap} == {3} and model.receptive_radius == 8
    assert mismatches(model, fasta, tmp_path / "out") <= 3  # near-ties at most (test above)
    monkeypatch.setattr(type(model), "isolation_gap", property(lambda self: 2))
    tokenize_files([fasta], str(tmp_path / "small"), model, window=64, batch_size=2)
    assert mismatches(model, fasta, tmp_path / "small") > 50
