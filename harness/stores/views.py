"""The MLflow UI view of one matrix invocation: the link `kimi-bench run` and `status` print.

What MLflow 3.17's experiment page takes from outside (read from its JS bundle, mlflow/server/js/build):
- the URL: the search facets (`searchFilter`, `orderByKey`, `orderByAsc`, `startTime`, `lifecycleFilter`,
  `datasetsFilter`, `modelVersionFilter`), the view mode (`compareRunsMode=TABLE|CHART|...`), the workflow
  type (`workflowType=machine_learning`, else the GenAI view) and `viewStateShareKey`;
- everything else of the page (columns, grouping, charts, which runs the charts draw) lives in the browser's
  localStorage, except for a *saved view*: an experiment tag `mlflow.sharedViewState.<key>` whose value is
  `{"name", "createdAt", "state"}` with `state` the JSON of the page state. `?viewStateShareKey=<key>` opens
  it (a banner offers to keep it), and the page's "Views" menu lists it by name.

An experiment tag is stored by every tracking store, so the same view works on a local sqlite file under
`mlflow ui` and on a tracking server. The view groups the runs by `kb.arm` (MLflow then draws one mean line
with a min-max band per arm, over its seeds, and lists each trial under its arm) and flattens the
parent/child nesting, which otherwise hides every trial under a collapsed "matrix NAME" row and leaves the
charts empty. Without grouping, the nesting cannot be undone from outside (the expanded rows are among the
state a saved view does not carry).

Which runs: each trial or speed run carries `kb.matrix_run` = the parent run of the invocation that last ran
or reused it (harness.stores.tracking); the view's filter is that tag while the matrix runs (new runs appear live),
and the explicit run ids once it ends (so a later rerun that reuses a run leaves this view as it was).
"""

from __future__ import annotations

import json
import time
import urllib.parse

from harness import schema

TAG_PREFIX = "mlflow.sharedViewState."  # MLflow's constant EXPERIMENT_PAGE_VIEW_STATE_SHARE_TAG_PREFIX
KEY_PREFIX = "kb-"
MAX_TAG_CHARS = 20_000  # MLflow's limit on an experiment tag value (MAX_EXPERIMENT_TAG_VAL_LENGTH)
SECTION_ID = "kimi-bench"

# the table's columns: what a reader compares first
COLUMNS = (
    schema.VAL_LOSS_FINAL,
    schema.VAL_BPB_FINAL,
    schema.PARAMS_TOTAL,
    schema.PARAMS_ACTIVE,
    schema.TRAIN_TOKENS_PER_S,
)
LINE_CHARTS = (schema.TRAIN_LOSS, schema.VAL_LOSS)
BAR_CHARTS = (schema.VAL_BPB_FINAL, schema.TRAIN_TOKENS_PER_S)


def view_key(parent_run_id: str) -> str:
    return f"{KEY_PREFIX}{parent_run_id}"


def view_url(server: str, experiment_id: str, key: str | None = None) -> str:
    """The experiment's page in the MLflow UI at `server`: the training-runs view (MLflow 3.17 opens the
    GenAI one unless the URL asks), and with `key` the saved view's charts."""
    query = {"workflowType": "machine_learning"}
    if key:
        query |= {"compareRunsMode": "CHART", "viewStateShareKey": key}
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(query)}"


def live_filter(parent_run_id: str) -> str:
    return f"tags.`{schema.TAG_MATRIX_RUN}` = '{parent_run_id}'"


def ids_filter(run_ids: list[str]) -> str:
    return "attributes.run_id IN (" + ", ".join(f"'{i}'" for i in run_ids) + ")"


def _column(key: str) -> str:
    return f"metrics.`{key}`"  # MLflow's canonical column key (makeCanonicalSortKey)


def _chart(kind: str, metric: str) -> dict:
    card = {
        "uuid": f"kb-{metric}",
        "type": kind,
        "metricKey": metric,
        "metricSectionId": SECTION_ID,
        "runsCountToCompare": 1000,
        "deleted": False,
        "isGenerated": False,
    }
    if kind == "LINE":
        card |= {
            "xAxisKey": "step",
            "scaleType": "linear",
            "xAxisScaleType": "linear",
            "lineSmoothness": 0,
            "useGlobalXaxisKey": True,
            "useGlobalLineSmoothing": True,
            "selectedXAxisMetricKey": "",
            "yAxisKey": "metric",
            "yAxisExpressions": [],
        }
    return card


def view_state(search_filter: str) -> dict:
    """The page state: runs grouped by arm (mean line and min-max band per arm in the charts), every group
    drawn, the loss curves first, the headline columns in the table. MLflow adds a chart per other metric
    below, in sections named by the metric's prefix."""
    columns = [_column(k) for k in COLUMNS]
    return {
        "searchFilter": search_filter,
        "orderByKey": "attributes.start_time",
        "orderByAsc": True,
        "selectedColumns": columns,
        "columnOrder": columns,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": schema.TAG_ARM}]},
        "groupsExpanded": {},
        "useGroupedValuesInCharts": True,
        "runsHiddenMode": "SHOW_ALL",  # MLflow's default draws only the first 10 rows (groups here)
        "compareRunCharts": [_chart("LINE", m) for m in LINE_CHARTS] + [_chart("BAR", m) for m in BAR_CHARTS],
        "compareRunSections": [
            {
                "uuid": SECTION_ID,
                "name": "kimi-bench: loss curves and headline numbers",
                "display": True,
                "isReordered": True,
            }
        ],
        "isAccordionReordered": True,  # keep this section first (MLflow sorts the sections otherwise)
        "hideEmptyCharts": True,
    }


def view_tag_value(name: str, search_filter: str, created_ms: int | None = None) -> str:
    """The experiment tag's value: MLflow's saved-view envelope around the state's JSON."""
    return json.dumps(
        {
            "name": name,
            "createdAt": created_ms or int(time.time() * 1000),
            "state": json.dumps(view_state(search_filter)),
        }
    )


def save_view(client, experiment_id: str, parent_run_id: str, name: str, run_ids: list[str] | None = None) -> None:
    """Write (or rewrite) the invocation's view: live (the tag filter) without `run_ids`, else the ids, unless
    they would not fit MLflow's tag limit."""
    value = view_tag_value(name, live_filter(parent_run_id))
    if run_ids:
        frozen = view_tag_value(name, ids_filter(run_ids))
        if len(frozen) <= MAX_TAG_CHARS:
            value = frozen
    client.set_experiment_tag(experiment_id, TAG_PREFIX + view_key(parent_run_id), value)


def freeze_view(client, experiment_id: str, parent_run_id: str, name: str) -> None:
    """At the end of an invocation: the view lists the runs it ran or reused, by id."""
    runs = client.search_runs([experiment_id], filter_string=live_filter(parent_run_id), max_results=5000)
    save_view(client, experiment_id, parent_run_id, name, [r.info.run_id for r in runs])


def newest_view_key(experiment_tags: dict[str, str]) -> str | None:
    """The key of the newest kimi-bench view among an experiment's tags (None: a store from before views)."""
    best: tuple[int, str] | None = None
    for tag, value in experiment_tags.items():
        if not tag.startswith(TAG_PREFIX + KEY_PREFIX):
            continue
        try:
            created = int(json.loads(value)["createdAt"])
        except (ValueError, KeyError, TypeError):
            continue
        if best is None or created > best[0]:
            best = (created, tag.removeprefix(TAG_PREFIX))
    return best[1] if best else None


def sqlite_experiment(db: str, name: str) -> tuple[str, dict[str, str]] | None:
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("SELECT experiment_id FROM experiments WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        tags = con.execute(
            "SELECT key, value FROM experiment_tags WHERE experiment_id = ? AND key LIKE ?",
            (row[0], TAG_PREFIX + KEY_PREFIX + "%"),
        ).fetchall()
        return str(row[0]), dict(tags)
    finally:
        con.close()


def rest_experiment(uri: str, name: str, timeout_s: float = 10.0) -> tuple[str, dict[str, str]] | None:
    """experiments/get-by-name through MLflow's REST API with the standard library (importing MLflow takes
    seconds); the same token / basic-auth environment variables as MLflow's client."""
    import base64
    import os
    import urllib.request

    headers = {}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif user and password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    query = urllib.parse.urlencode({"experiment_name": name})
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as resp:
        exp = json.loads(resp.read()).get("experiment")
    if not exp:
        return None
    return str(exp["experiment_id"]), {t["key"]: t.get("value", "") for t in exp.get("tags", [])}
