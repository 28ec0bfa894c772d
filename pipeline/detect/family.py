"""What a detector family is: the alerts it raises, the state it owns, one evaluate step
over a batch.

The engine (detect/engine.py) builds one instance of each family in its FAMILIES and, for
every bus message, runs the families of the message's topic in that order: first every
family's `observe` (what one family learns from the batch and others read in the same
batch, such as a GPU's reporting interval), then every family's `evaluate`.

State: every per-entity array a family keeps (one slot per GPU, node, rack or facility
point) is declared as a `State` class attribute. `Engine.state()`, and with it the
checkpoint, finds it by walking the families: a new family's state is checkpointed,
restored and forgotten with no registration anywhere. An attribute that holds such
arrays without being declared is refused when the engine is built, so state cannot be
left out of checkpoints by accident.

Adding a detector family:
1. its alerts in detect/catalog.py (with a runbook in runbooks/);
2. a module in detect/families/ with a Family subclass: `name` (the alerts' catalog
   `family`), `topic`, `raises` (the alertnames), its `State`s, and `evaluate`, which
   calls `self.judge(out, alertname, entities, hit, t, score, evidence)`;
3. the class in engine.FAMILIES, after the families whose results it reads.
The engine refuses to start if a catalog alert is raised by no family or by two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from pipeline.config import DetectConfig
from pipeline.detect.state import SlotArrays

if TYPE_CHECKING:
    from pipeline.detect.batch import Output
    from pipeline.detect.engine import Engine

SCOPES = ("gpu", "node", "rack", "point")  # what a state slot indexes


class State:
    """Per-entity state of a family, declared as a class attribute; each family instance
    gets its own, made by `make(detect config)` (or, with `fields`, a SlotArrays of
    them). It is checkpointed as columns `<checkpoint>.<field>` (the attribute's name
    unless given) for entities of `scope`. `make` may return a SlotArrays, a stateful
    detector holding one as `.arrays` (detect/state.py), or a dict of either
    (checkpointed as `<checkpoint>.<key>.<field>`)."""

    def __init__(self, scope: str, make: Callable[[DetectConfig], Any] | None = None,
                 fields: dict[str, tuple[type, float]] | None = None, checkpoint: str | None = None) -> None:
        if scope not in SCOPES or (make is None) == (fields is None):
            raise ValueError(f"State({scope!r}): scope one of {SCOPES}, and either make or fields")
        self.scope = scope
        self.make = make if make is not None else (lambda _: SlotArrays(dict(fields)))
        self.checkpoint = checkpoint
        self.attr = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = name
        self.checkpoint = self.checkpoint or name

    def containers(self, value: Any) -> Iterator[tuple[str, SlotArrays]]:
        """(checkpoint name, arrays) of the value this declaration made."""
        items = ((f"{self.checkpoint}.{key}", item) for key, item in value.items()) if isinstance(value, dict) \
            else ((self.checkpoint, value),)
        for name, item in items:
            arrays = _arrays_of(item)
            if arrays is None:
                raise TypeError(f"state {name!r} ({self.attr}) is no SlotArrays nor holds one as `.arrays`")
            yield name, arrays


def _arrays_of(value: Any) -> SlotArrays | None:
    if isinstance(value, SlotArrays):
        return value
    inner = getattr(value, "arrays", None)
    return inner if isinstance(inner, SlotArrays) else None


class Family:
    """Base of the detector families (detect/families/). A subclass sets `name`, `topic`
    and `raises`, declares its `State`s, and implements `evaluate(batch, out)`;
    `observe(batch)` when other families read what it learns from the batch before
    they judge."""

    name: str = ""                 # the catalog's `family` of the alerts it raises
    topic: str = ""                # the bus topic it evaluates
    raises: tuple[str, ...] = ()   # the catalog alerts it owns (detector and fire-after: the catalog's); a
                                   # family may also judge another's (an XID event latches GpuUncorrectableEcc)

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config = engine.cfg.detect  # the detect.* settings
        self.inventory = engine.inventory
        for attr, decl in self.declared_state().items():
            setattr(self, attr, decl.make(self.config))

    @classmethod
    def declared_state(cls) -> dict[str, State]:
        out: dict[str, State] = {}
        for klass in reversed(cls.__mro__):
            out.update({name: v for name, v in vars(klass).items() if isinstance(v, State)})
        return out

    def state(self) -> Iterator[tuple[str, str, SlotArrays]]:
        """(scope, checkpoint name, arrays) of every declared state."""
        for attr, decl in self.declared_state().items():
            for name, arrays in decl.containers(getattr(self, attr)):
                yield decl.scope, name, arrays

    def check_declared(self) -> None:
        """Refuse per-entity arrays held outside a State declaration: the checkpoint
        would not know them."""
        declared = self.declared_state()
        for attr, value in vars(self).items():
            values = value.values() if isinstance(value, dict) else (value,)
            if attr not in declared and any(_arrays_of(v) is not None for v in values):
                raise TypeError(f"{type(self).__name__}.{attr} holds per-entity state that is not declared as a "
                                f"State class attribute: it would be left out of checkpoints")

    def observe(self, batch: Any) -> None:
        """Learn from the batch what other families read while evaluating it."""

    def evaluate(self, batch: Any, out: Output) -> None:
        raise NotImplementedError

    def judge(self, out: Output, name: str, entities: np.ndarray, hit: np.ndarray, t: float, score: np.ndarray,
              evidence: Callable[[int], dict]) -> None:
        """Hand one alert's condition over `entities` to its tracker (hysteresis)."""
        out.alerts.extend(self.engine.trackers[name].update(entities, hit, t, score, evidence))

    def alerted(self, name: str, n: int) -> np.ndarray:
        """Per entity of the alert's scope (the first n): pending or firing."""
        return self.engine.trackers[name].pending_or_firing(n)


class JoinedArrays:
    """Arrays of several families checkpointed under one name (columns `<name>.<field>`),
    as one SlotArrays to the checkpoint."""

    def __init__(self, parts: list[SlotArrays]) -> None:
        self._parts = parts
        self._owner = {f: arrays for arrays in parts for f in arrays.fields}
        if len(self._owner) != sum(len(arrays.fields) for arrays in parts):
            raise ValueError(f"two families checkpoint a field of the same name: {[a.fields for a in parts]}")

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self._owner)

    def ensure(self, n: int) -> None:
        for arrays in self._parts:
            arrays.ensure(n)

    def reset(self, slots: np.ndarray, fields: tuple[str, ...]) -> None:
        for arrays in self._parts:
            arrays.reset(slots, tuple(f for f in fields if f in arrays.fields))

    def __getattr__(self, name: str) -> np.ndarray:
        owner = self.__dict__.get("_owner", {}).get(name)
        if owner is None:
            raise AttributeError(name)
        return getattr(owner, name)


def lag(prev: np.ndarray, x: np.ndarray, a: np.ndarray) -> np.ndarray:
    """A first-order lag of x with weight a per sample: it starts at x and holds through NaN."""
    return np.where(np.isnan(prev), x, np.where(np.isnan(x), prev, prev + a * (x - prev)))


def evidence(**values):
    """Evidence for row i: arrays are read at i, scalars taken as they are."""
    return lambda i: {k: (float(v[i]) if isinstance(v, np.ndarray) else v) for k, v in values.items()}
