"""Metrics against matrices computed by hand."""

import pytest

from src.continual import metrics

# R[i][j]: accuracy on task j after training task i; b: untrained model.
R_FORGETS = [
    [0.90, 0.10, 0.20],
    [0.60, 0.80, 0.30],
    [0.50, 0.70, 0.95],
]
B = [0.10, 0.20, 0.25]


def test_average_accuracy_final_and_per_step():
    assert metrics.average_accuracy(R_FORGETS) == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    assert metrics.average_accuracy_per_step(R_FORGETS) == pytest.approx(
        [0.90, (0.60 + 0.80) / 2, (0.50 + 0.70 + 0.95) / 3]
    )


def test_negative_bwt_and_forgetting_by_hand():
    # BWT = mean(R[2][0]-R[0][0], R[2][1]-R[1][1]) = mean(-0.40, -0.10)
    assert metrics.backward_transfer(R_FORGETS) == pytest.approx(-0.25)
    # forgetting: task 0 best before the end max(0.90, 0.60) = 0.90 → 0.40; task 1 max(0.10, 0.80) → 0.10
    assert metrics.forgetting(R_FORGETS) == pytest.approx(0.25)


def test_positive_fwt_by_hand():
    # FWT = mean(R[0][1]-b1, R[1][2]-b2) = mean(0.10-0.20, 0.30-0.25) = -0.025
    assert metrics.forward_transfer(R_FORGETS, B) == pytest.approx(-0.025)
    R_helps = [[0.9, 0.6, 0.5], [0.9, 0.9, 0.7], [0.9, 0.9, 0.9]]
    # mean(0.6-0.2, 0.7-0.25) = 0.425 > 0
    assert metrics.forward_transfer(R_helps, B) == pytest.approx(0.425)
    assert metrics.backward_transfer(R_helps) == pytest.approx(0.0)
    assert metrics.forgetting(R_helps) == pytest.approx(0.0)


def test_forgetting_uses_best_earlier_accuracy_not_just_diagonal():
    # Task 0 improves after task 1 (0.7 → 0.9) and then drops to 0.5: forgetting 0.4, but BWT only -0.2.
    R = [[0.7, 0.0, 0.0], [0.9, 0.8, 0.0], [0.5, 0.8, 0.9]]
    assert metrics.forgetting(R) == pytest.approx((0.4 + 0.0) / 2)
    assert metrics.backward_transfer(R) == pytest.approx((-0.2 + 0.0) / 2)


def test_positive_bwt():
    R = [[0.6, 0.1], [0.8, 0.9]]
    assert metrics.backward_transfer(R) == pytest.approx(0.2)
    assert metrics.forgetting(R) == pytest.approx(-0.2)


def test_single_task_has_no_transfer_metrics():
    summary = metrics.summarize([[0.7]], [0.1])
    assert summary["avg_acc"] == pytest.approx(0.7)
    assert summary["forgetting"] is None and summary["bwt"] is None and summary["fwt"] is None


def test_non_square_matrix_is_rejected():
    with pytest.raises(ValueError, match="square"):
        metrics.average_accuracy([[0.1, 0.2]])


# eval.tasks=seen_and_next: row i evaluated on tasks 0…i+1 only (None = not evaluated)
R_SEEN_AND_NEXT = [
    [0.90, 0.10, None, None],
    [0.60, 0.80, 0.30, None],
    [0.50, 0.70, 0.95, 0.40],
    [0.45, 0.65, 0.90, 0.85],
]
B4 = [0.10, 0.20, 0.25, 0.30]


def test_metrics_of_seen_and_next_by_hand():
    R = R_SEEN_AND_NEXT
    assert metrics.average_accuracy(R) == pytest.approx((0.45 + 0.65 + 0.90 + 0.85) / 4)
    assert metrics.average_accuracy_per_step(R) == pytest.approx([0.90, 0.70, (0.50 + 0.70 + 0.95) / 3, 0.7125])
    # BWT = mean(0.45-0.90, 0.65-0.80, 0.90-0.95); FWT = mean(0.10-0.20, 0.30-0.25, 0.40-0.30): every cell there
    assert metrics.backward_transfer(R) == pytest.approx((-0.45 - 0.15 - 0.05) / 3)
    assert metrics.forward_transfer(R, B4) == pytest.approx((-0.10 + 0.05 + 0.10) / 3)
    # forgetting over the evaluated cells of rows 0..2: task 0 max .90 → .45; task 1 max(.10,.80,.70) → .15;
    # task 2 max(.30,.95) (R[0][2] not evaluated) → .05
    assert metrics.forgetting(R) == pytest.approx((0.45 + 0.15 + 0.05) / 3)
    assert metrics.forgetting_is_exact(R) is False
    assert metrics.summarize(R, B4)["forgetting_exact"] is False
    assert metrics.summarize(R_FORGETS, B)["forgetting_exact"] is True


def test_metrics_with_skipped_rows_are_none_where_not_exact():
    # eval.every_n_tasks=2 over 4 tasks: rows 0 and 2 skipped, rows 1 and 3 on every task
    R = [
        [None, None, None, None],
        [0.60, 0.80, 0.30, 0.20],
        [None, None, None, None],
        [0.45, 0.65, 0.90, 0.85],
    ]
    assert metrics.average_accuracy(R) == pytest.approx(0.7125)
    assert metrics.average_accuracy_per_step(R) == [None, pytest.approx(0.70), None, pytest.approx(0.7125)]
    assert metrics.backward_transfer(R) is None  # R[0][0], R[2][2] missing
    assert metrics.forward_transfer(R, B4) is None  # R[0][1], R[2][3] missing
    # forgetting from the rows there are: task 0 .60 → .45, task 1 .80 → .65, task 2 .30 → .90 (its best, R[2][2],
    # was skipped: the approximation)
    assert metrics.forgetting(R) == pytest.approx((0.15 + 0.15 - 0.60) / 3)
    assert metrics.forgetting_is_exact(R) is False
    # the last row incomplete: no final metric at all
    R[3][1] = None
    assert metrics.average_accuracy(R) is None and metrics.forgetting(R) is None
