"""The queue that feeds warm worker groups, as plain Python: hand-out order, a restarted group
getting its subject back, retries of a failing subject, and a group that cannot start."""

from dreambooth.training.subject_queue import SubjectQueue, SubjectWork


def _queue(names, max_retries=1, max_restarts=2):
    return SubjectQueue([SubjectWork(n, config=None, model_path="m", prior_set=None) for n in names], max_retries,
                        max_restarts)


def test_slots_take_subjects_in_order_until_none_is_left():
    queue = _queue(["a", "b", "c"])
    assert queue.take(0).name == "a" and queue.take(1).name == "b"
    queue.finished(0, "a", {"ok": 1})
    assert queue.take(0).name == "c"
    queue.finished(1, "b", {})
    assert queue.take(1) is None
    queue.finished(0, "c", {})
    states = queue.snapshot()
    assert [states[n].status for n in "abc"] == ["succeeded"] * 3
    cursor, changes = queue.changes_since(0)  # every transition, in order, however fast
    assert [(c.name, c.status) for c in changes] == [("a", "running"), ("b", "running"), ("a", "succeeded"),
                                                     ("c", "running"), ("b", "succeeded"), ("c", "succeeded")]
    assert queue.changes_since(cursor) == (cursor, [])
    assert states["a"].record == {"ok": 1} and states["c"].slot == 0 and states["b"].slot == 1


def test_a_restarted_group_gets_back_the_subject_it_held():
    queue = _queue(["a", "b"])
    assert queue.take(0).name == "a"
    queue.resumed("a", 8)
    assert queue.take(0).name == "a"  # Ray Train restarted slot 0's group mid-subject
    state = queue.snapshot()["a"]
    assert (state.status, state.attempts, state.restarts, state.resumed_from) == ("running", 1, 1, 8)
    queue.finished(0, "a", {})
    assert queue.take(0).name == "b"


def test_a_failing_subject_is_retried_then_failed_while_others_go_on():
    queue = _queue(["bad", "good"], max_retries=1)
    assert queue.take(0).name == "bad"
    queue.failed(0, "bad", "RuntimeError: broke")
    assert queue.snapshot()["bad"].status == "retrying"
    assert queue.take(0).name == "good"
    queue.finished(0, "good", {})
    assert queue.take(0).name == "bad"
    queue.failed(0, "bad", "RuntimeError: broke again")
    assert queue.take(0) is None
    bad = queue.snapshot()["bad"]
    assert (bad.status, bad.attempts, bad.error) == ("failed", 2, "RuntimeError: broke again")


def test_a_lost_group_fails_its_subject_and_one_that_never_took_one_says_so():
    queue = _queue(["a", "b", "c"], max_retries=0)
    queue.take(0)
    assert queue.slot_lost(0, "RayActorError: gone") is True
    assert queue.snapshot()["a"].status == "failed"
    assert queue.slot_lost(1, "never started") is False  # held nothing: would die again
    queue.fail_pending("no worker group could start (never started)")
    states = queue.snapshot()
    assert [states[n].status for n in "bc"] == ["failed", "failed"] and "could start" in states["b"].error
    assert not queue.has_pending()


def test_a_subject_that_keeps_killing_its_group_fails_that_attempt_and_the_slot_goes_on():
    queue = _queue(["crashes", "next"], max_retries=0, max_restarts=2)
    assert queue.take(0).name == "crashes"
    assert queue.take(0).name == "crashes" and queue.take(0).name == "crashes"  # two restarts allowed
    assert queue.take(0).name == "next"  # the third restart: give up on it
    crashes = queue.snapshot()["crashes"]
    assert (crashes.status, crashes.restarts) == ("failed", 3) and "failed 3 times" in crashes.error


def test_a_subject_that_fails_for_good_names_the_first_error_its_group_raised_not_a_lost_worker():
    queue = _queue(["crashes"], max_retries=0, max_restarts=1)
    queue.take(0)
    queue.group_raised(0, "crashes", "rank 0: OSError: could not claim")
    queue.take(0)  # restarted once
    queue.group_raised(0, "crashes", "rank 1: RuntimeError: step-000004 is unreadable")
    queue.group_raised(0, "crashes", "rank 0: RuntimeError: Connection closed by peer")  # its peer, after it
    queue.take(0)  # over the limit: this attempt fails
    crashes = queue.snapshot()["crashes"]
    assert crashes.status == "failed" and "last: rank 1: RuntimeError: step-000004 is unreadable" in crashes.error


def test_a_group_that_died_without_a_word_is_reported_as_a_lost_worker():
    queue = _queue(["lost"], max_retries=0, max_restarts=0)
    queue.take(0)
    queue.take(0)
    assert "(last: a lost worker)" in queue.snapshot()["lost"].error


def test_an_earlier_attempts_error_is_not_blamed_for_a_retry_that_lost_a_worker():
    queue = _queue(["flaky"], max_retries=1, max_restarts=0)
    queue.take(0)
    queue.group_raised(0, "flaky", "rank 0: OSError: the first attempt's error")
    assert queue.slot_lost(0, "its worker group gave up")  # retried
    assert queue.take(0).name == "flaky"  # the second attempt
    queue.take(0)  # its group died without a word, past its restarts
    assert "(last: a lost worker)" in queue.snapshot()["flaky"].error


def test_a_late_report_from_a_subjects_group_is_not_pinned_on_the_next_subject_of_its_slot():
    queue = _queue(["first", "second"], max_retries=0, max_restarts=0)
    queue.take(0)
    queue.failed(0, "first", "SubjectFailed: photos unreadable")
    assert queue.take(0).name == "second"
    queue.group_raised(0, "first", "rank 1: RuntimeError: Connection closed by peer")  # first's group, late
    queue.take(0)  # second's group died without a word
    assert "(last: a lost worker)" in queue.snapshot()["second"].error
