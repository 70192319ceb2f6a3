"""Each actor keeps its parallel torch work on one thread (workers.device.ComputeThread): a second
long-lived thread with an OpenMP team stops libgomp's spinning between regions for the whole process."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from workers.device import ComputeThread, on_passing_thread


def test_work_from_any_thread_runs_on_the_one_compute_thread() -> None:
    threads = torch.get_num_threads()
    try:
        compute = ComputeThread(2, "test-compute")
        with ThreadPoolExecutor(4) as callers:
            ran_on = set(callers.map(lambda _: compute.run(threading.get_ident), range(16)))
        assert len(ran_on) == 1 and threading.get_ident() not in ran_on
        assert compute.run(torch.get_num_threads) == 2
        assert compute.run(lambda a, b: a + b, 2, 3) == 5  # arguments pass through
        assert compute.run(lambda: compute.run(threading.get_ident)) in ran_on  # from itself: run there, not wait on itself
    finally:
        torch.set_num_threads(threads)


def test_with_one_thread_work_runs_in_the_caller() -> None:
    threads = torch.get_num_threads()
    try:
        assert ComputeThread(1, "test-compute").run(threading.get_ident) == threading.get_ident()
    finally:
        torch.set_num_threads(threads)


def test_a_passing_thread_has_ended_when_its_result_is_back() -> None:
    thread = on_passing_thread(threading.current_thread)
    assert thread is not threading.current_thread() and not thread.is_alive()


def test_errors_reach_the_caller() -> None:
    def fail() -> None:
        raise ValueError("no such expert")

    threads = torch.get_num_threads()
    try:
        for run in (on_passing_thread, ComputeThread(1, "test-compute").run, ComputeThread(2, "test-compute").run):
            with pytest.raises(ValueError, match="no such expert"):
                run(fail)
    finally:
        torch.set_num_threads(threads)
