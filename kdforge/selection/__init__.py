"""Wild-pool scoring and selection (Attention Probe, ICASSP 2022; DFND, CVPR 2021).

Score once, select many times::

    from kdforge.selection import score_pool, select, write_selection
    table = score_pool(teacher, UnlabeledFolder(pool, transform), blocks=(3, 7), out="runs/scores")
    idx = select(table, n=650_000, mode="combined")          # α·(s_3 + s_7) + β·s_out, smallest kept
    write_selection("runs/scores/combined_650000.txt", table, idx, mode="combined")

Pure functions: :func:`confidence_scores`, :func:`attention_probe_scores`, :func:`combined_scores`,
:func:`select`.
"""
from kdforge.selection.scores import HEAD_MODES, attention_probe_scores, combined_scores, confidence_scores
from kdforge.selection.select import MODES, balanced_quotas, select, selection_value
from kdforge.selection.selection_file import (SelectionDataset, materialize_selection, read_selection,
                                              selection_indices, write_selection)
from kdforge.selection.store import ScoreTable, load_scores, read_meta, teacher_fingerprint, write_scores
from kdforge.selection.scoring import score_batch, score_pool

__all__ = ["confidence_scores", "attention_probe_scores", "combined_scores", "select", "selection_value",
           "balanced_quotas", "MODES", "HEAD_MODES", "score_pool", "score_batch", "ScoreTable", "load_scores",
           "read_meta", "write_scores", "teacher_fingerprint", "write_selection", "read_selection",
           "selection_indices", "SelectionDataset", "materialize_selection"]
