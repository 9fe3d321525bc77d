"""The merge entry point: YAML text -> query -> models resolved (paths ingested) -> plan -> execution."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from mpstore.errors import AmbiguousRefError, NotFoundError
from mpstore.folders import known_snapshot

from .execute import execute_plan as run_merge  # noqa: F401  (the entry point's public name)
from .methods import QueryError
from .plan import MergePlan, build_plan
from .query import MergeQuery, parse_query

if TYPE_CHECKING:
    from mpstore import Store


def resolve_models(
    store: "Store",
    query: MergeQuery,
    config_dir: Path | None,
    ingest: bool,
    on_ingest: Callable[[str], None] | None = None,
) -> dict[str, bytes]:
    """Each model string -> snapshot id: a ref, a snapshot id prefix, or a model folder.

    A folder is taken as the snapshot its last ingest made while its files are unchanged
    (mpstore.folders); else it is ingested first (its base detected with --base auto) unless `ingest`
    is False (EXPLAIN reads no data), in which case it is an error.
    """
    models: dict[str, bytes] = {}
    for model in query.referenced_models():
        try:
            models[model] = store.resolve(model)
            continue
        except AmbiguousRefError:
            raise
        except NotFoundError:
            pass
        path = Path(model)
        if not path.is_absolute() and config_dir is not None and not path.exists():
            path = config_dir / path
        if not path.is_dir():
            raise QueryError(f"model {model}: not a ref, a snapshot id or a model folder (see `mpstore ls`)")
        known = known_snapshot(store, path)
        if known is not None:  # ingested before and unchanged since: nothing to read
            models[model] = known
            continue
        if not ingest:
            raise QueryError(
                f"model {model}: folder not in the store, or changed since its ingest; ingest it first "
                f"(`mpstore ingest {model} --name NAME --base auto`) or run without --explain"
            )
        if on_ingest:
            on_ingest(model)
        models[model] = store.ingest(path, base="auto").id
    return models


def plan_merge(
    store: "Store",
    text: str,
    source: str = "config",
    config_dir: Path | None = None,
    ingest: bool = True,
    on_ingest: Callable[[str], None] | None = None,
) -> MergePlan:
    """Parse and plan a merge; raises QueryError (one line) before any tensor data is read."""
    query = parse_query(text, source)
    from .methods import get_method

    get_method(query.merge_method)  # an unknown method fails before any model is resolved
    models = resolve_models(store, query, config_dir, ingest, on_ingest)
    return build_plan(store, query, models)
