"""Which model version answers a request for the alias: the running experiment or the active version.

`ABRouter.route` is called for every request naming the alias (or no model). A conversation that
already has an answer stays on the version that gave it (looked up in this process's memory,
then in the conversation log, so any replica agrees); otherwise the running experiment assigns
the user (the OpenAI `user` field, else the conversation id) to a variant by a stable hash. A
variant whose version is not loaded here sends its traffic to the control.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from rollout.experiment_spec import CONTROL, assign, bucket


@dataclass(frozen=True, slots=True)
class Route:
    version: str
    experiment: str = ""
    variant: str = ""


@dataclass(frozen=True, slots=True)
class ExperimentRoute:
    name: str
    salt: str
    # As stored: [{"name", "version", "weight", "disabled"?}], control first.
    variants: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """A snapshot; the watcher swaps in a new one, requests read whichever is current."""

    active: str
    experiment: ExperimentRoute | None = None
    # Versions this process can serve (loaded, or the base).
    servable: frozenset[str] = field(default_factory=frozenset)


class ConversationPins:
    """conversation id -> the route of its first answer, most recent last (bounded)."""

    def __init__(self, capacity: int = 200_000) -> None:
        self._items: OrderedDict[str, Route] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, conversation_id: str) -> Route | None:
        with self._lock:
            route = self._items.get(conversation_id)
            if route is not None:
                self._items.move_to_end(conversation_id)
            return route

    def put(self, conversation_id: str, route: Route) -> None:
        with self._lock:
            self._items[conversation_id] = route
            self._items.move_to_end(conversation_id)
            if len(self._items) > self._capacity:
                self._items.popitem(last=False)


# Looks up how a conversation was first answered: (model_version, experiment, variant) or None.
ConversationLookup = Callable[[str], "tuple[str, str, str] | None"]


class ABRouter:
    def __init__(self, base_name: str, lookup: ConversationLookup | None = None) -> None:
        self.table = RoutingTable(active=base_name, servable=frozenset({base_name}))
        self.pins = ConversationPins()
        self._lookup = lookup

    def update(self, table: RoutingTable) -> None:
        self.table = table

    async def route(self, user: str | None, conversation_id: str, *, existing: bool) -> Route:
        """The route of a request; `existing`: the client continues a conversation by its id."""
        table = self.table
        if existing:
            pinned = self.pins.get(conversation_id)
            if pinned is None and self._lookup is not None:
                found = await run_in_threadpool(self._lookup, conversation_id)
                if found is not None:
                    pinned = Route(*found)
                    self.pins.put(conversation_id, pinned)
            if pinned is not None:
                kept = self._keep(pinned, table)
                if kept is not None:
                    return kept
        route = self.assign(user or conversation_id, table)
        self.pins.put(conversation_id, route)
        return route

    def pair(self, key: str) -> tuple[Route, Route] | None:
        """A side-by-side pair while an experiment runs (None: none runs, or it has no candidate
        served here): the control next to the candidate `key` is assigned to, or, for a key on
        the control, one picked by the same kind of hash. Both are counted in the experiment, so
        the choice between them is evidence for the candidate or against it."""
        table = self.table
        experiment = table.experiment
        if experiment is None:
            return None
        control = next(v for v in experiment.variants if v["name"] == CONTROL)
        candidates = [
            v
            for v in experiment.variants
            if v["name"] != CONTROL and not v.get("disabled") and v["version"] in table.servable
        ]
        if not candidates or control["version"] not in table.servable:
            return None
        assigned = self.assign(key, table)
        if assigned.variant in (None, "", CONTROL):
            picked = candidates[int(bucket(f"{experiment.salt}:pair", key) * len(candidates))]
            assigned = Route(picked["version"], experiment.name, picked["name"])
        return Route(control["version"], experiment.name, CONTROL), assigned

    @staticmethod
    def assign(key: str, table: RoutingTable) -> Route:
        experiment = table.experiment
        if experiment is None:
            return Route(table.active)
        variants = [
            v if v["name"] == CONTROL or v["version"] in table.servable else {**v, "disabled": True}
            for v in experiment.variants
        ]
        chosen = assign(experiment.salt, key, variants)
        if chosen["version"] not in table.servable:
            return Route(table.active)
        return Route(chosen["version"], experiment.name, chosen["name"])

    @staticmethod
    def _keep(route: Route, table: RoutingTable) -> Route | None:
        """A pinned conversation keeps its version while it is served; a rolled-back variant's
        conversations move (None: route afresh)."""
        if route.version not in table.servable:
            return None
        if not route.experiment:
            return route
        experiment = table.experiment
        if experiment is None or experiment.name != route.experiment:
            # The experiment ended: same version, no longer counted in it.
            return Route(route.version)
        enabled = any(v["name"] == route.variant and not v.get("disabled") for v in experiment.variants)
        return route if enabled else None
