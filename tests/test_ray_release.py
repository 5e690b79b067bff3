"""Releasing a model's Ray workers reports what it could not release (a leaked placement group keeps its GPUs)
instead of hiding it; tested without Ray, with a stand-in whose releases raise."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from factory.pipeline.executors import _Workers, release_workers


class FakeRay:
    """`ray.kill` and `ray.util.remove_placement_group`, raising for the objects named in `broken`."""

    def __init__(self, broken: set[str]) -> None:
        self.broken, self.released = broken, []
        self.util = SimpleNamespace(remove_placement_group=self._release)

    def _release(self, obj: Any, **_: Any) -> None:
        if obj in self.broken:
            raise RuntimeError(f"{obj} is unreachable\nsecond line")
        self.released.append(obj)

    def kill(self, actor: Any, *, no_restart: bool) -> None:
        assert no_restart
        self._release(actor)


def _workers() -> _Workers:
    return _Workers(spec=None, loader=None, actors=["actor-1", "actor-2"], groups=["group-1", "group-2"])  # type: ignore[arg-type]


def test_release_failures_are_warned_and_the_rest_released(caplog: pytest.LogCaptureFixture) -> None:
    ray = FakeRay({"actor-1", "group-2"})
    with caplog.at_level(logging.WARNING, logger="factory.pipeline.executors"):
        release_workers(ray, "judge", _workers())
    assert ray.released == ["actor-2", "group-1"]  # one failure does not stop the others
    [record] = caplog.records
    message = record.getMessage()
    assert "could not release 2 Ray resource(s) of model 'judge'" in message
    assert "worker 'actor-1' (actor-1 is unreachable)" in message
    assert "placement group 'group-2' (group-2 is unreachable)" in message
    assert "second line" not in message


def test_a_clean_release_warns_nothing(caplog: pytest.LogCaptureFixture) -> None:
    ray = FakeRay(set())
    with caplog.at_level(logging.WARNING, logger="factory.pipeline.executors"):
        release_workers(ray, "judge", _workers())
    assert ray.released == ["actor-1", "actor-2", "group-1", "group-2"]
    assert not caplog.records
