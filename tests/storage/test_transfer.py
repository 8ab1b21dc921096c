"""The concurrency helpers: what runs on which thread, in which order, and whose error wins."""

from __future__ import annotations

import threading

import pytest

from ckptio.storage.transfer import run_alongside, run_both


def test_run_both_without_concurrency_runs_the_foreground_first() -> None:
    order: list[str] = []
    result = run_both(lambda: order.append("background") or 1, lambda: order.append("foreground") or 2,
                      concurrently=False)
    assert order == ["foreground", "background"]  # a collective in the foreground never waits on the other
    assert result == (1, 2)


def test_run_both_concurrently_overlaps_and_keeps_the_foreground_here() -> None:
    started = threading.Event()
    here = threading.current_thread()

    def background() -> str:
        started.set()
        return threading.current_thread().name

    def foreground() -> bool:
        assert started.wait(10)  # would time out if the background waited for the foreground
        return threading.current_thread() is here

    name, on_caller = run_both(background, foreground, concurrently=True)
    assert on_caller and name != here.name


@pytest.mark.parametrize("concurrently", [True, False])
def test_run_both_raises_the_foregrounds_error_first(concurrently: bool) -> None:
    def background() -> None:
        raise KeyError("background")

    def foreground() -> None:
        raise ValueError("foreground")

    with pytest.raises(ValueError):
        run_both(background, foreground, concurrently=concurrently)
    with pytest.raises(KeyError):
        run_both(background, lambda: None, concurrently=concurrently)


def test_run_alongside_returns_the_main_result_after_both_finish() -> None:
    done: list[str] = []
    assert run_alongside(lambda: done.append("side"), lambda: "main") == "main"
    assert done == ["side"]
