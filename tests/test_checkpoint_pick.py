"""engine.checkpoint.available: which checkpoint of a run folder is read."""
from kdforge.engine.checkpoint import available


def test_available_prefers_best_then_last(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"x")
    assert available(run, "best") == "last"          # never validated: only last.pt
    (run / "best.pt").write_bytes(b"x")
    assert available(run, "best") == "best"
    assert available(run, "last") == "last"
    f = run / "some.pt"
    f.write_bytes(b"x")
    assert available(f, "best") == "best"            # a file path is used as given
